"""Portable path: the torq ONNX functions in a plain ORT CPU session vs the numpy reference."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from torq_onnx import mxfp4, torq
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref


def bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality treating NaN == NaN and +0 == -0 (signed zeros are unspecified)."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Every element :func:`bits_equal`."""
    return bool(bits_equal(a, b).all())


def op_model(d: int, rule: str, dtype=TensorProto.FLOAT, with_rotated: bool = False, per_block: bool = False) -> ort.InferenceSession:
    """The op alone; ``per_block``: r_intra is [B, 32, 32] (one transform per block)."""
    b = d // 32
    nodes = [F.make_rotate_quantize_node("x", "ri", "rk", "y", rule)]
    outputs = [helper.make_tensor_value_info("y", dtype, ["n", d])]
    if with_rotated:  # the same float32 GEMMs, exposed, to check the quantizer bit-exactly
        nodes += [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["xf", "blk_shape"], ["xb"]),
            helper.make_node("MatMul", ["ri", "xb"], ["yb"]),
            helper.make_node("Unsqueeze", ["yb", "axis_m2"], ["yb1"]),
            helper.make_node("MatMul", ["yb1", "rk"], ["zb"]),
            helper.make_node("Reshape", ["zb", "flat_shape"], ["z"]),
        ]
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", d]))
    inits = [onnx.numpy_helper.from_array(np.array([-1, b, 32], np.int64), "blk_shape"), onnx.numpy_helper.from_array(np.array([-1, d], np.int64), "flat_shape"),
             onnx.numpy_helper.from_array(np.array([-2], np.int64), "axis_m2")]
    rk_shape = [b, 32, 32] if per_block else [32, 32]
    graph = helper.make_graph(
        nodes,
        "op",
        [helper.make_tensor_value_info("x", dtype, ["n", d]), helper.make_tensor_value_info("ri", TensorProto.FLOAT, ["g", "g"]), helper.make_tensor_value_info("rk", TensorProto.FLOAT, rk_shape)],
        outputs,
        inits if with_rotated else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)], ir_version=F.IR_VERSION)
    F.attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def adversarial(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)) * 2.0 ** rng.integers(-140, 120, (n, 1))
    x[0] = 0.0
    x[1, :32] = np.float32(2.0**-149)  # subnormals
    x[2, :32] = np.tile([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], 4)  # ties and saturation
    x[3, :32] = 3.0e38  # near FLT_MAX
    x[4, :32] = 2.0 ** np.arange(-10, 22)  # exact powers of two
    x[5, :32] = -6.0
    x[6, 7] = np.nan
    x[7, 40 % d] = np.inf
    return x.astype(np.float32)


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("d", [64, 96])
def test_identity_rotation_is_bit_exact_to_reference(rule, d):
    rng = np.random.default_rng(d)
    x = adversarial(rng, 500, d)
    b = d // 32
    feeds = {"x": x, "ri": np.eye(b, dtype=np.float32), "rk": np.eye(32, dtype=np.float32)}
    y = op_model(d, rule).run(None, feeds)[0]
    expected = ref.rotate_quantize(x, feeds["ri"], feeds["rk"], rule)
    assert bits_equal(y, expected).all()
    # away from the NaN/Inf rows the op is exactly the plain MXFP4 reference
    np.testing.assert_array_equal(y[8:], mxfp4.fake_quantize(x[8:], scale_rule=rule))


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_real_rotation_quantizer_is_bit_exact(rule):
    d = 128
    rng = np.random.default_rng(7)
    x = adversarial(rng, 400, d)
    rot = torq.solve_rotation("quarot", d, seed=1)
    feeds = {"x": x, "ri": rot.r_inter.astype(np.float32), "rk": rot.r_intra.astype(np.float32)}
    y, z = op_model(d, rule, with_rotated=True).run(None, feeds)
    assert bits_equal(y, ref.quantize_rotated(z, np.float32, rule)).all()
    # and against the pure-numpy op reference, up to GEMM summation order at bin edges
    agree = bits_equal(y, ref.rotate_quantize(x, feeds["ri"], feeds["rk"], rule))
    assert agree[8:].mean() > 0.999


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_per_block_identity_is_bit_exact_to_reference(rule):
    d, b = 96, 3
    x = adversarial(np.random.default_rng(5), 500, d)
    feeds = {"x": x, "ri": np.eye(b, dtype=np.float32), "rk": np.stack([np.eye(32, dtype=np.float32)] * b)}
    y = op_model(d, rule, per_block=True).run(None, feeds)[0]
    assert bits_equal(y, ref.rotate_quantize(x, feeds["ri"], feeds["rk"], rule)).all()
    np.testing.assert_array_equal(y[8:], mxfp4.fake_quantize(x[8:], scale_rule=rule))


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_per_block_transform_quantizer_is_bit_exact(rule):
    """Non-orthogonal per-block transforms (WUSH's form): the quantizer is bit-exact on the
    op's own rotated values, and the op agrees with the numpy reference."""
    d, b = 128, 4
    rng = np.random.default_rng(13)
    x = adversarial(rng, 400, d)
    rk = (np.eye(32) + 0.3 * rng.standard_normal((b, 32, 32))).astype(np.float32)
    feeds = {"x": x, "ri": torq.solve_rotation("quarot", d, seed=2).r_inter.astype(np.float32), "rk": rk}
    y, z = op_model(d, rule, with_rotated=True, per_block=True).run(None, feeds)
    assert bits_equal(y, ref.quantize_rotated(z, np.float32, rule)).all()
    agree = bits_equal(y, ref.rotate_quantize(x, feeds["ri"], feeds["rk"], rule))
    assert agree[8:].mean() > 0.999
    # each block really got its own transform
    z_np = ref.rotate_f32(x[8:], feeds["ri"], rk)
    z_shared = ref.rotate_f32(x[8:], feeds["ri"], rk[0])
    assert np.allclose(z[8:], z_np, rtol=1e-4, atol=1e-4 * np.abs(z_np).max()) and not np.allclose(z_np, z_shared)


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("per_block", [False, True])
def test_identity_r_inter_as_one_group(rule, per_block):
    """[[1]], which the exporter writes for an identity R_inter, gives what eye(B) gives on
    finite tokens, and keeps a NaN/Inf in its own block (eye(B)'s GEMM spreads it over the
    token: 0 * NaN is NaN), like the CUDA path, which skips an identity R_inter."""
    d, b = 128, 4
    rng = np.random.default_rng(17)
    x = adversarial(rng, 300, d)
    rk = np.linalg.qr(rng.standard_normal((b, 32, 32) if per_block else (32, 32)))[0].astype(np.float32)
    np.testing.assert_array_equal(F.op_r_inter(np.eye(b, dtype=np.float32)), [[1.0]])
    sess = op_model(d, rule, per_block=per_block)
    y_one = sess.run(None, {"x": x, "ri": F.op_r_inter(np.eye(b, dtype=np.float32)), "rk": rk})[0]
    y_eye = sess.run(None, {"x": x, "ri": np.eye(b, dtype=np.float32), "rk": rk})[0]
    assert same(y_one[8:], y_eye[8:])
    nan_blocks = np.isnan(y_one[6:8]).reshape(2, b, 32).any(-1)
    np.testing.assert_array_equal(nan_blocks, [[True, False, False, False], [False, True, False, False]])
    assert np.isnan(y_eye[6:8]).all()
    eye_rk = {"rk": np.eye(32, dtype=np.float32) if not per_block else np.stack([np.eye(32, dtype=np.float32)] * b)}
    y = sess.run(None, {"x": x, "ri": np.ones((1, 1), np.float32), **eye_rk})[0]
    assert same(y, ref.rotate_quantize(x, np.ones((1, 1), np.float32), eye_rk["rk"], rule))


def test_r_inter_mixes_equal_groups():
    """A [G, G] R_inter acts as kron(R_inter, I_{D/G}), in the op and the reference alike."""
    d, g = 128, 2
    rng = np.random.default_rng(19)
    x = (rng.standard_normal((64, d)) * 3).astype(np.float32)
    ri = np.linalg.qr(rng.standard_normal((g, g)))[0].astype(np.float32)
    rk = np.linalg.qr(rng.standard_normal((32, 32)))[0].astype(np.float32)
    dense = np.kron(ri.astype(np.float64), np.eye(d // g)) @ np.kron(np.eye(d // 32), rk.T.astype(np.float64))
    z = ref.rotate_f32(x, ri, rk)
    np.testing.assert_allclose(z, x.astype(np.float64) @ dense.T, rtol=1e-5, atol=1e-5)
    y = op_model(d, "floor").run(None, {"x": x, "ri": ri, "rk": rk})[0]
    assert bits_equal(y, ref.quantize_rotated(z, np.float32)).mean() > 0.999
    with pytest.raises(ValueError, match="do not fit"):
        torq.apply_rotation(x, np.eye(3, dtype=np.float32), rk)  # 3 does not divide B = 4


def test_float16_input():
    d = 64
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((200, d)) * 50).astype(np.float16)
    eye = {"ri": np.eye(2, dtype=np.float32), "rk": np.eye(32, dtype=np.float32)}
    y = op_model(d, "floor", TensorProto.FLOAT16).run(None, {"x": x, **eye})[0]
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, ref.rotate_quantize(x, eye["ri"], eye["rk"]))


def test_dequantize_weight_function_matches_reference():
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((96, 40)) * 2.0 ** rng.integers(-126, 100, (1, 40))).astype(np.float32)
    w[:32, 0] = 0.0
    w[5, 1] = np.nan
    packed, scales = ref.quantize_weight(w)
    assert packed.shape == (48, 40) and scales.shape == (3, 40)
    graph = helper.make_graph(
        [F.make_dequantize_node("p", "s", "w")],
        "dq",
        [helper.make_tensor_value_info("p", TensorProto.UINT8, [48, 40]), helper.make_tensor_value_info("s", TensorProto.UINT8, [3, 40])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [96, 40])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)], ir_version=F.IR_VERSION)
    F.attach_functions(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"p": packed, "s": scales})[0]
    assert bits_equal(out, ref.dequantize_weight(packed, scales)).all()
    assert bits_equal(out, mxfp4.fake_quantize(w, axis=0)).all()


def test_every_e8m0_exponent_decodes_exactly():
    scales = np.arange(0, 255, dtype=np.uint8).reshape(-1, 1).repeat(2, axis=1)  # [255, 2]
    codes = np.zeros((255 * 32, 2), np.uint8)
    codes[::32] = 2  # value 1.0 * 2**(s-127)
    packed = mxfp4.pack(codes, axis=0)
    expected = ref.dequantize_weight(packed, scales)
    graph = helper.make_graph(
        [F.make_dequantize_node("p", "s", "w")],
        "dq",
        [helper.make_tensor_value_info("p", TensorProto.UINT8, list(packed.shape)), helper.make_tensor_value_info("s", TensorProto.UINT8, [255, 2])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)], ir_version=F.IR_VERSION)
    F.attach_functions(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"p": packed, "s": scales})[0]
    np.testing.assert_array_equal(out, expected)


def test_unknown_scale_rule_rejected():
    with pytest.raises(ValueError, match="scale rule"):
        F.make_rotate_quantize_node("x", "a", "b", "y", "banana")


def test_a_session_that_would_fall_back_to_the_cpu_is_an_error(tmp_path):
    """ORT only warns when a requested provider is missing and runs on the CPU instead;
    load_session refuses, naming the provider (here on an ORT without the CUDA EP), before
    it makes a session, so ORT neither loads the model nor warns first."""
    from torq_onnx.errors import TorqError
    from torq_onnx.runtime_ops import load_session
    from tiny_models import tiny_transformer

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ORT has the CUDA EP: nothing falls back for want of it")
    path = tmp_path / "m.onnx"
    onnx.save(tiny_transformer(), path)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TorqError, match="this onnxruntime has no CUDAExecutionProvider"):
        warnings.simplefilter("always")
        load_session(path, providers=["CUDAExecutionProvider"])
    assert not caught  # refused before a session is made: no ORT warning first
    assert load_session(path, providers=["CPUExecutionProvider"]).get_providers() == ["CPUExecutionProvider"]


def test_a_provider_that_fails_to_load_is_refused_after_the_session():
    """A provider that is installed but not enabled (CUDA's libraries missing: ORT falls back
    to the CPU with a warning) is caught from the session's own providers."""
    from torq_onnx.errors import TorqError
    from torq_onnx.runtime_ops.providers import require_providers

    class FellBack:  # what ORT returns then: a session on the CPU only
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(TorqError, match="did not enable CUDAExecutionProvider for m.onnx"):
        require_providers(FellBack(), [("CUDAExecutionProvider", {"device_id": "0"})], "m.onnx")
    require_providers(FellBack(), ["CPUExecutionProvider"], "m.onnx")
