"""The torq ops as model-local ONNX functions built from standard ops (the portable path).

Any ONNX Runtime (CPU or CUDA EP) inlines model-local functions at load time, so an
exported model runs in a plain ``onnxruntime.InferenceSession`` with no registration.
The bodies are onnxscript functions (``op_bodies.py``), bit-exact to the numpy reference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from torq_onnx.runtime_ops import op_bodies
from torq_onnx.runtime_ops.op_bodies import DOMAIN, DOMAIN_VERSION

ROTATE_QUANTIZE = "TorqRotateQuantize"
DEQUANTIZE_WEIGHT = "TorqDequantizeMXFP4"
ROTATE = "TorqRotate"
# the ops that run on every call (the site ops; the compiled library implements these), as
# against DEQUANTIZE_WEIGHT, whose outputs ORT constant-folds at session creation
ONLINE_OPS = (ROTATE_QUANTIZE, ROTATE)
# IR version of the small models built here (op tests, split-runner kernels, benchmarks):
# the newest that every supported onnxruntime (>= 1.20) loads; onnx's default may be newer.
IR_VERSION = 10
STD_OPSET = 18  # lowest default-domain opset the bodies need (ReduceMax axes input, BitwiseAnd)

# mantissa (amax / 2**floor(log2 amax), in [1, 2)) above which the scale exponent is bumped
_BUMP_THRESHOLD = {
    "floor": 2.0,  # never
    "even": float(np.nextafter(np.float32(1.75), np.float32(0))),  # mant >= 1.75
    "rceil": 1.5,  # mant > 1.5
}


def bump_threshold(scale_rule: str) -> float:
    if scale_rule not in _BUMP_THRESHOLD:
        raise ValueError(f"unknown scale rule {scale_rule!r}; choose one of {tuple(_BUMP_THRESHOLD)}")
    return _BUMP_THRESHOLD[scale_rule]


def scale_rule_of(threshold: float) -> str:
    """The scale rule a node's ``bump_threshold`` attribute encodes (inverse of :func:`bump_threshold`)."""
    for rule, bump in _BUMP_THRESHOLD.items():
        if np.float32(bump) == np.float32(threshold):
            return rule
    raise ValueError(f"bump_threshold {threshold} encodes no known scale rule")


def op_r_inter(r_inter: np.ndarray) -> np.ndarray:
    """The ``R_inter`` an op node carries: ``[[1]]`` for the identity (no block mixing: wush,
    brq), which every implementation reads as one group of the whole hidden axis
    (:func:`torq_onnx.torq.apply_rotation`), skipping a [B, B] product per token (and a
    [B, B] initializer per site); any other ``R_inter`` as it is."""
    r_inter = np.asarray(r_inter)
    if np.array_equal(r_inter, np.eye(r_inter.shape[0], dtype=r_inter.dtype)):
        return np.ones((1, 1), r_inter.dtype)
    return r_inter


def _with_opset(fn: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """The body imports the model's own default opset (>= 18; the ops used have the same
    semantics in every later opset)."""
    for imp in fn.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    return fn


def rotate_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqRotate(x, r_inter, r_intra) -> y``: the rotation alone (exactness checks, A16 runs)."""
    return _with_opset(op_bodies.TorqRotate.to_function_proto(), opset)


def rotate_quantize_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqRotateQuantize(x [..., D], r_inter [B, B] or [1, 1], r_intra [32, 32] or [B, 32, 32]) -> y``.

    ``y = MXFP4(R_inter @ X @ R_intra)`` (x's dtype) with ``X = x.reshape(..., B, 32)`` and a
    per-block ``R_intra[b]`` applied to block ``b`` when it is 3-D (WUSH), computed in
    float32. ``r_inter`` [G, G] in general mixes G equal groups of the hidden axis; the
    exporter writes ``[[1]]`` (no mixing) for an identity (:func:`op_r_inter`). Attribute
    ``bump_threshold`` (float) encodes the scale rule (see :func:`bump_threshold`);
    :func:`make_rotate_quantize_node` sets it from a rule name.
    """
    return _with_opset(op_bodies.TorqRotateQuantize.to_function_proto(), opset)


def dequantize_weight_function(opset: int = STD_OPSET) -> onnx.FunctionProto:
    """``TorqDequantizeMXFP4(packed uint8 [D/2, N], scales uint8 [D/32, N]) -> w float32 [D, N]``."""
    return _with_opset(op_bodies.TorqDequantizeMXFP4.to_function_proto(), opset)


def all_functions(opset: int = STD_OPSET) -> list[onnx.FunctionProto]:
    """The torq functions, importing the model's own default opset (>= 18; the ops used
    have the same semantics in every later opset)."""
    helper_fn = _with_opset(op_bodies.TorqRotateBlockMajor.to_function_proto(), opset)  # called by both rotations
    return [rotate_quantize_function(opset), rotate_function(opset), helper_fn, dequantize_weight_function(opset)]


def make_rotate_quantize_node(x: str, r_inter: str, r_intra: str, y: str, scale_rule: str = "floor", name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(ROTATE_QUANTIZE, [x, r_inter, r_intra], [y], domain=DOMAIN, name=name, bump_threshold=bump_threshold(scale_rule))


def make_rotate_node(x: str, r_inter: str, r_intra: str, y: str, name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(ROTATE, [x, r_inter, r_intra], [y], domain=DOMAIN, name=name)


def make_dequantize_node(packed: str, scales: str, w: str, name: str | None = None) -> onnx.NodeProto:
    return helper.make_node(DEQUANTIZE_WEIGHT, [packed, scales], [w], domain=DOMAIN, name=name)


def default_opset(model: onnx.ModelProto, missing: int) -> int:
    """The version of the default (ai.onnx) domain ``model`` imports; ``missing`` if none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def attach_functions(model: onnx.ModelProto) -> None:
    """Add the torq functions and the ai.torq opset import to ``model`` (idempotent)."""
    present = {(fn.domain, fn.name) for fn in model.functions}
    opset = default_opset(model, STD_OPSET)
    for fn in all_functions(opset):
        if (fn.domain, fn.name) not in present:
            model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
