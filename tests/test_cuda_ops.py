"""CUDA path vs the numpy reference (runs only with a GPU: pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from torq_onnx import mxfp4, torq
from torq_onnx.pipeline import ExportOptions, rewrite
from torq_onnx.runtime_ops import cuda, load_session
from torq_onnx.runtime_ops import reference as ref

from test_runtime_ops import adversarial, same
from tiny_models import batches, tiny_transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU with cupy")]


def adversarial_rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((4096, 256)) * 2.0 ** rng.integers(-140, 120, (4096, 1))).astype(np.float32)
    z[:600, :96] = adversarial(rng, 600, 96)
    return z


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_quantize_kernel_bit_exact(rule):
    import cupy as cp

    z = adversarial_rows(0)
    assert same(cuda.fake_quant_rows(cp.asarray(z), rule).get(), ref.quantize_rotated(z, np.float32, rule))


@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_fused_kernel_with_identity_rotation_is_the_quantizer(rule, kernel):
    """x @ I is x exactly for finite x (a NaN/Inf block is NaN either way), so the fused
    kernel's quantizer meets the adversarial cases unchanged."""
    import cupy as cp

    z = adversarial_rows(1)
    got = cuda.block_rotate_quantize(cp.asarray(z), cp.eye(32, dtype=cp.float32), rule, kernel=kernel).get()
    assert same(got, ref.quantize_rotated(z, np.float32, rule))


@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize(("inter", "mix"), [("eye", cuda.DEFAULT_MIX_ROUTE), ("one", cuda.DEFAULT_MIX_ROUTE),
                                            *((i, m) for i in ("groups", "dense") for m in cuda.MIX_ROUTES)])
def test_rotate_quantize_matches_the_reference(per_block, inter, mix, kernel):
    """Rotation: float32 agreement with numpy (summation order differs); quantization:
    bit-exact on exactly the rotated values the kernel produced."""
    import cupy as cp

    rng = np.random.default_rng(2)
    d, n = 1024, 333  # rows not a multiple of the CTA size
    b = d // 32
    r_inter = {"eye": np.eye(b), "one": np.ones((1, 1)), "groups": np.linalg.qr(rng.standard_normal((4, 4)))[0],
               "dense": torq.solve_rotation("quarot", d, seed=0).r_inter}[inter]
    r_intra = rng.standard_normal((b, 32, 32) if per_block else (32, 32)) / np.sqrt(32)
    x = (rng.standard_normal((n, d)) * np.exp(rng.standard_normal(d))).astype(np.float32)
    q = cuda.RotateQuantizer(r_inter, r_intra, kernel=kernel, mix=mix)
    assert (q.r_inter is None) == (inter in ("eye", "one"))  # an identity is skipped
    z_gpu = cp.full(x.shape, cp.nan, dtype=cp.float32)  # poisoned: every element must be written
    y = q(cp.asarray(x), rotated_out=z_gpu).get()
    z = z_gpu.get()
    want_z = torq.apply_rotation(x.astype(np.float64), r_inter, r_intra)
    np.testing.assert_allclose(z, want_z, rtol=1e-4, atol=1e-5 * np.abs(want_z).max())
    assert same(y, ref.quantize_rotated(z, np.float32))
    assert same(cuda.rotate_quantize(x, r_inter, r_intra, kernel=kernel, mix=mix).get(), y)  # deterministic


def test_fused_kernels_agree_bit_for_bit_on_the_gpu():
    """The same fmaf chain in both thread mappings: identical rotated values and outputs."""
    import cupy as cp

    rng = np.random.default_rng(3)
    x = cp.asarray((rng.standard_normal((1000, 4096)) * np.exp(rng.standard_normal(4096))).astype(np.float32))
    r_intra = cp.asarray((rng.standard_normal((128, 32, 32)) / np.sqrt(32)).astype(np.float32))
    outs = {}
    for kernel in cuda.ROTATE_KERNELS:
        z = cp.full(x.shape, cp.nan, dtype=cp.float32)
        outs[kernel] = (cuda.block_rotate_quantize(x, r_intra, rotated_out=z, kernel=kernel).get(), z.get())
    (y, z), (y_w, z_w) = outs["thread"], outs["warp"]
    assert np.array_equal(z_w, z) and same(y_w, y)


def cuda_ort_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not cuda_ort_available(), reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("method", ["torq", "wush"])
def test_split_session_on_cuda_matches_cpu(tmp_path, method):
    from torq_onnx.runtime_ops.split_runner import SplitSession

    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), ExportOptions(progress=False, method=method))
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    feeds = batches(1, 40, seed=3)[0]
    cpu = load_session(path).run(None, feeds)[0]
    gpu_session = SplitSession(path, device="cuda")
    gpu = gpu_session.run(None, feeds)[0]
    assert np.isfinite(gpu).all()
    # GEMM summation order differs between cuBLAS and MLAS, and a few near-tie elements may
    # round to the neighbouring FP4 code: close, not equal
    np.testing.assert_allclose(gpu, cpu, rtol=0.05, atol=0.05 * np.abs(cpu).max())
    assert (gpu.argmax(-1) == cpu.argmax(-1)).mean() > 0.95
    np.testing.assert_array_equal(gpu_session.run(None, feeds)[0], gpu)  # repeatable: no race


@pytest.mark.skipif(not cuda_ort_available(), reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("shared_arena", [False, True])
def test_split_session_on_cuda_runs_an_exported_decoder(exported_decoder, shared_arena):
    """An optimum export with a KV cache: attention shape arithmetic recomputed in each
    segment (cloned Shape nodes reading device tensors), on the CUDA EP, with and without
    the environment's shared arena."""
    from torq_onnx import calibration as calib
    from torq_onnx.runtime_ops.split_runner import SplitSession

    ids = np.random.default_rng(0).integers(0, 50, 48).astype(np.int64)
    cpu_session = load_session(exported_decoder)
    feeds = calib.feeds_for_inputs(calib.input_specs(cpu_session), ids)
    cpu = cpu_session.run(None, feeds)[0]
    gpu_session = SplitSession(exported_decoder, device="cuda", shared_arena=shared_arena)
    gpu = gpu_session.run(None, feeds)[0]
    np.testing.assert_allclose(gpu, cpu, rtol=0.05, atol=0.05 * np.abs(cpu).max())
    np.testing.assert_array_equal(gpu_session.run(None, feeds)[0], gpu)
