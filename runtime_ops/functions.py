"""The torq ops as model-local ONNX functions built from standard ops (the portable path).

Any ONNX Runtime (CPU or CUDA EP) inlines model-local functions at load time, so an
exported model runs in a plain ``onnxruntime.InferenceSession`` with no registration.
The bodies are bit-exact to the numpy reference (``reference.py``): every step after the
two rotation MatMuls is exact float32 arithmetic (power-of-two scaling, ONNX ``Round``
which is round-half-to-even), and ``floor(log2 amax)`` is computed from ``Log`` and then
corrected with exact ``Pow(2, e)`` comparisons, so it never depends on ``Log``'s rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.torq"
DOMAIN_VERSION = 1
ROTATE_QUANTIZE = "TorqRotateQuantize"
DEQUANTIZE_WEIGHT = "TorqDequantizeMXFP4"
ROTATE = "TorqRotate"
STD_OPSET = 18  # lowest default-domain opset the bodies need (ReduceMax axes input, BitwiseAnd)

# mantissa (amax / 2**floor(log2 amax), in [1, 2)) above which the scale exponent is bumped
_BUMP_THRESHOLD = {
    "floor": 2.0,  # never
    "even": float(np.nextafter(np.float32(1.75), np.float32(0))),  # mant >= 1.75
    "rceil": 1.5,  # mant > 1.5
}
_FLT_MAX = float(np.finfo(np.float32).max)


class _Body:
    """Tiny builder for function bodies: unique value names, constants as Constant nodes."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._prefix = prefix

    def _name(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self._name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        arr = np.array(value, dtype=dtype)
        return self.op("Constant", value=onnx.numpy_helper.from_array(arr))


def bump_threshold(scale_rule: str) -> float:
    if scale_rule not in _BUMP_THRESHOLD:
        raise ValueError(f"unknown scale rule {scale_rule!r}; choose one of {tuple(_BUMP_THRESHOLD)}")
    return _BUMP_THRESHOLD[scale_rule]


def _quantize_blocks(f: _Body, z: str, bump: str) -> str:
    """MXFP4 fake-quant of float32 ``z`` [..., 32] along the last axis (the reference rules)."""
    one, two, half = f.const(1.0), f.const(2.0), f.const(0.5)
    a = f.op("Abs", z)
    nonfinite = f.op("Or", f.op("IsNaN", z), f.op("IsInf", z))
    bad = f.op("Greater", f.op("ReduceMax", f.op("Cast", nonfinite, to=TensorProto.FLOAT), f.const([-1], np.int64), keepdims=1), f.const(0.0))
    amax = f.op("ReduceMax", a, f.const([-1], np.int64), keepdims=1)
    zero_or_bad = f.op("Or", bad, f.op("Equal", amax, f.const(0.0)))
    amax = f.op("Where", zero_or_bad, one, amax)
    # floor(log2 amax): estimate, then correct by exact comparisons with 2**e
    est = f.op("Floor", f.op("Div", f.op("Log", amax), f.const(float(np.log(2.0)))))
    p = f.op("Pow", two, est)
    est = f.op("Sub", est, f.op("Cast", f.op("Greater", p, amax), to=TensorProto.FLOAT))
    p = f.op("Pow", two, est)
    est = f.op("Add", est, f.op("Cast", f.op("LessOrEqual", f.op("Mul", p, two), amax), to=TensorProto.FLOAT))
    mant = f.op("Div", amax, f.op("Pow", two, est))
    e = f.op("Add", f.op("Sub", est, two), f.op("Cast", f.op("Greater", mant, bump), to=TensorProto.FLOAT))
    e = f.op("Clip", e, f.const(-127.0), f.const(127.0))
    e = f.op("Where", zero_or_bad, f.const(-127.0), e)
    scale = f.op("Pow", two, e)
    v = f.op("Div", a, scale)
    # E2M1 round-half-even: step 0.5 below 2, step 1 below 4, step 2 above; saturate at 6
    q_lo = f.op("Mul", f.op("Round", f.op("Mul", v, two)), half)
    q_mid = f.op("Round", v)
    q_hi = f.op("Mul", f.op("Round", f.op("Mul", v, half)), two)
    q = f.op("Where", f.op("Less", v, two), q_lo, f.op("Where", f.op("Less", v, f.const(4.0)), q_mid, q_hi))
    q = f.op("Min", q, f.const(6.0))
    y = f.op("Min", f.op("Mul", q, scale), f.const(_FLT_MAX))
    y = f.op("Where", f.op("Less", z, f.const(0.0)), f.op("Neg", y), y)
    return f.op("Where", bad, f.const(np.nan), y)


def _rotate(f: _Body) -> str:
    """float32 ``R_inter @ X @ R_intra`` of the function input ``x`` as [..., B, 1, 32].

    The singleton axis lets one body serve a shared ``r_intra`` [32, 32] and a per-block
    one [B, 32, 32] (MatMul broadcasts [..., B, 1, 32] against both); every output element
    is the same length-32 dot product either way."""
    xf = f.op("Cast", "x", to=TensorProto.FLOAT)
    lead = f.op("Slice", f.op("Shape", "x"), f.const([0], np.int64), f.const([-1], np.int64))
    nb = f.op("Slice", f.op("Shape", "r_inter"), f.const([0], np.int64), f.const([1], np.int64))
    blocks = f.op("Reshape", xf, f.op("Concat", lead, nb, f.const([32], np.int64), axis=0))
    mixed = f.op("Unsqueeze", f.op("MatMul", "r_inter", blocks), f.const([-2], np.int64))
    return f.op("MatMul", mixed, "r_intra")


def _finish(f: _Body, y: str) -> None:
    f.nodes.append(helper.make_node("Reshape", [y, f.op("Shape", "x")], ["y_f32"]))
    f.nodes.append(helper.make_node("CastLike", ["y_f32", "x"], ["y"]))


def rotate_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqRotate(x, r_inter, r_intra) -> y``: the rotation alone (exactness checks, A16 runs)."""
    f = _Body("tr_")
    _finish(f, _rotate(f))
    return helper.make_function(DOMAIN, ROTATE, ["x", "r_inter", "r_intra"], ["y"], f.nodes, [helper.make_opsetid("", opset)],
                                doc_string="Two-level TORQ rotation without quantization.")


def rotate_quantize_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqRotateQuantize(x [..., D], r_inter [B, B], r_intra [32, 32] or [B, 32, 32]) -> y``.

    ``y = MXFP4(R_inter @ X @ R_intra)`` (x's dtype) with ``X = x.reshape(..., B, 32)`` and a
    per-block ``R_intra[b]`` applied to block ``b`` when it is 3-D (WUSH), computed in
    float32. Attribute ``bump_threshold`` (float) encodes the scale rule (see
    :func:`bump_threshold`); :func:`make_rotate_quantize_node` sets it from a rule name.
    """
    f = _Body("trq_")
    z = _rotate(f)
    bump = f.op("Constant")
    f.nodes[-1].attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    f.nodes[-1].attribute[0].name = "value_float"
    f.nodes[-1].attribute[0].ref_attr_name = "bump_threshold"
    _finish(f, _quantize_blocks(f, z, bump))
    return helper.make_function(
        DOMAIN,
        ROTATE_QUANTIZE,
        ["x", "r_inter", "r_intra"],
        ["y"],
        f.nodes,
        [helper.make_opsetid("", opset)],
        attributes=["bump_threshold"],
        doc_string="Two-level TORQ rotation then MXFP4 (OCP MX v1.0) quantize-dequantize along the last axis.",
    )


def dequantize_weight_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqDequantizeMXFP4(packed uint8 [D/2, N], scales uint8 [D/32, N]) -> w float32 [D, N]``.

    Codes are packed along the reduction axis (row 2i in the low nibble, 2i+1 in the high
    one); ``scales`` are biased E8M0 exponents (0xFF = NaN). ORT constant-folds this at
    session creation, so the weights cost 4.25 bits each on disk.
    """
    f = _Body("tdq_")
    low = f.op("BitwiseAnd", "packed", f.const(15, np.uint8))
    high = f.op("BitShift", "packed", f.const(4, np.uint8), direction="RIGHT")
    ax1 = f.const([1], np.int64)
    pairs = f.op("Concat", f.op("Unsqueeze", low, ax1), f.op("Unsqueeze", high, ax1), axis=1)  # [D/2, 2, N]
    shape_p = f.op("Shape", "packed")
    rows = f.op("Mul", f.op("Slice", shape_p, f.const([0], np.int64), f.const([1], np.int64)), f.const([2], np.int64))
    cols = f.op("Slice", shape_p, f.const([1], np.int64), f.const([2], np.int64))
    codes = f.op("Reshape", pairs, f.op("Concat", rows, cols, axis=0))  # [D, N]
    mag_table = f.const([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mag = f.op("Gather", mag_table, f.op("Cast", f.op("BitwiseAnd", codes, f.const(7, np.uint8)), to=TensorProto.INT64))
    neg = f.op("Equal", f.op("BitwiseAnd", codes, f.const(8, np.uint8)), f.const(8, np.uint8))
    vals = f.op("Where", neg, f.op("Neg", mag), mag)
    sc = f.op("Cast", "scales", to=TensorProto.FLOAT)
    scale = f.op("Pow", f.const(2.0), f.op("Sub", sc, f.const(127.0)))
    scale = f.op("Where", f.op("Equal", sc, f.const(255.0)), f.const(np.nan), scale)
    nblk = f.op("Slice", f.op("Shape", "scales"), f.const([0], np.int64), f.const([1], np.int64))
    blocked = f.op("Reshape", vals, f.op("Concat", nblk, f.const([32], np.int64), cols, axis=0))
    w = f.op("Mul", blocked, f.op("Unsqueeze", scale, ax1))
    w = f.op("Clip", w, f.const(-_FLT_MAX), f.const(_FLT_MAX))
    f.nodes.append(helper.make_node("Reshape", [w, f.op("Concat", rows, cols, axis=0)], ["w"]))
    return helper.make_function(
        DOMAIN,
        DEQUANTIZE_WEIGHT,
        ["packed", "scales"],
        ["w"],
        f.nodes,
        [helper.make_opsetid("", opset)],
        doc_string="Dequantize MXFP4 weights packed along the reduction axis to float32.",
    )


def all_functions(opset: int = STD_OPSET) -> list[onnx.FunctionProto]:
    """The torq functions, importing the model's own default opset (>= 18; the ops used
    have the same semantics in every later opset)."""
    return [rotate_quantize_function(opset), rotate_function(opset), dequantize_weight_function(opset)]


def make_rotate_quantize_node(x: str, r_inter: str, r_intra: str, y: str, scale_rule: str = "floor", name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(ROTATE_QUANTIZE, [x, r_inter, r_intra], [y], domain=DOMAIN, name=name, bump_threshold=bump_threshold(scale_rule))


def make_rotate_node(x: str, r_inter: str, r_intra: str, y: str, name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(ROTATE, [x, r_inter, r_intra], [y], domain=DOMAIN, name=name)


def make_dequantize_node(packed: str, scales: str, w: str, name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(DEQUANTIZE_WEIGHT, [packed, scales], [w], domain=DOMAIN, name=name)


def attach_functions(model: onnx.ModelProto) -> None:
    """Add the torq functions and the ai.torq opset import to ``model`` (idempotent)."""
    present = {(fn.domain, fn.name) for fn in model.functions}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), STD_OPSET)
    for fn in all_functions(opset):
        if (fn.domain, fn.name) not in present:
            model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
