"""The compiled ORT custom-op library (runtime_ops/compiled.py, ort_custom_ops.cc): built here
with g++ against ORT's C API headers, loaded into plain ORT CPU sessions, checked against the
numpy reference (bit-exact for quantization), against the CUDA kernels' own arithmetic on the
host emulator (bit-identical), and on a whole exported model; the CUDA build is compiled here
(nvcc, no GPU needed) and run under ``-m gpu``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from torq_onnx import calibration as calib
from torq_onnx import mxfp4
from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops import compiled, cuda
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref
from torq_onnx.runtime_ops.nvidia_wheels import can_disassemble, cuobjdump

import float_code
from test_cuda_nvrtc import KERNELS as NVRTC_KERNELS
from test_runtime_ops import adversarial, same

NVCC = shutil.which("nvcc")


def op_model(d: int, op: str = F.ROTATE_QUANTIZE, rule: str = "floor", dtype: int = TensorProto.FLOAT,
             r_inter: np.ndarray | None = None, r_intra: np.ndarray | None = None) -> onnx.ModelProto:
    """One torq op on x [n, d] with its ONNX function attached, as an export carries it."""
    rk = r_intra if r_intra is not None else np.eye(32, dtype=np.float32)
    ri = r_inter if r_inter is not None else np.ones((1, 1), np.float32)
    node = (F.make_rotate_quantize_node("x", "ri", "rk", "y", rule) if op == F.ROTATE_QUANTIZE
            else F.make_rotate_node("x", "ri", "rk", "y"))
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", dtype, ["n", d])],
                              [helper.make_tensor_value_info("y", dtype, ["n", d])],
                              [numpy_helper.from_array(np.asarray(ri, np.float32), "ri"),
                               numpy_helper.from_array(np.asarray(rk, np.float32), "rk")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.STD_OPSET)], ir_version=F.IR_VERSION)
    F.attach_functions(model)
    return model


def session(model: onnx.ModelProto, library: Path | None = None, profile_dir: Path | None = None,
            provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if library is not None:
        compiled.register(opts, library)
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / "prof")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])


def profiled_runs(sess: ort.InferenceSession, op: str) -> list[dict]:
    """The events of ``op``'s node runs in ORT's profile of ``sess`` (made with profile_dir)."""
    profile = json.loads(Path(sess.end_profiling()).read_text())
    return [e for e in profile if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op]


def run(model: onnx.ModelProto, library: Path, x: np.ndarray) -> np.ndarray:
    return session(model, library).run(None, {"x": x})[0]


def signed_permutation(rng: np.random.Generator, *lead: int) -> np.ndarray:
    """[*lead, 32, 32] matrices with one ±1 per row and column: x @ P is exact in float32."""
    out = np.zeros((*lead, 32, 32), np.float32)
    for idx in np.ndindex(*lead):
        out[idx][np.arange(32), rng.permutation(32)] = rng.choice([-1.0, 1.0], 32)
    return out


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("per_block", [False, True])
def test_exact_rotations_reach_the_quantizer_bit_exact(library, rule, per_block):
    """With signed permutations every rotated value is exact, so the compiled op must equal
    the numpy quantizer on the adversarial cases (ties, powers of two, zero blocks,
    saturation, subnormals, NaN/Inf blocks) bit for bit."""
    rng = np.random.default_rng(1)
    x = adversarial(rng, 70, 160)
    p = signed_permutation(rng, 5) if per_block else signed_permutation(rng)
    z = np.einsum("nbi,bij->nbj", x.reshape(70, 5, 32), np.broadcast_to(p, (5, 32, 32))).reshape(70, 160)
    y = run(op_model(160, rule=rule, r_intra=p), library, x)
    assert same(y, ref.quantize_rotated(z, np.float32, rule))


@pytest.mark.parametrize("dense_inter", [False, True])
@pytest.mark.parametrize("per_block", [False, True])
def test_quantizer_is_bit_exact_on_the_ops_own_rotation(library, dense_inter, per_block):
    """Dense R_inter [B, B] and R_intra: the compiled TorqRotate gives the rotated values (the
    same fmaf chains), the compiled TorqRotateQuantize is the numpy quantizer of exactly those,
    and both are float32-close to the float64 rotation."""
    rng = np.random.default_rng(2)
    n, b = 37, 6
    x = (rng.standard_normal((n, 32 * b)) * np.exp(rng.standard_normal(32 * b))).astype(np.float32)
    x[3, :32] = 0.0
    x[4, 40] = np.inf
    ri = np.linalg.qr(rng.standard_normal((b, b)))[0].astype(np.float32) if dense_inter else np.ones((1, 1), np.float32)
    rk = (rng.standard_normal((b, 32, 32) if per_block else (32, 32)) / np.sqrt(32)).astype(np.float32)
    z = run(op_model(32 * b, F.ROTATE, r_inter=ri, r_intra=rk), library, x)
    y = run(op_model(32 * b, r_inter=ri, r_intra=rk), library, x)
    assert same(y, ref.quantize_rotated(z, np.float32))
    want = ref.rotate_f32(x.astype(np.float64), ri.astype(np.float64), rk.astype(np.float64))
    ok = np.isfinite(want).all(-1)
    np.testing.assert_allclose(z[ok], want[ok], rtol=1e-4, atol=1e-5 * np.abs(want[ok]).max())
    bad = slice(None) if dense_inter else slice(32, 64)  # R_inter spreads the Inf over every block
    assert np.isnan(y[4, bad]).all() and np.isnan(y[4]).sum() == y[4, bad].size
    assert dense_inter or (y[3, :32] == 0).all()


@pytest.mark.parametrize("op", [F.ROTATE_QUANTIZE, F.ROTATE])
def test_float16_is_the_float32_op_rounded_once(library, op):
    """float16 x is widened exactly, the op runs in float32, and y is rounded to float16 once
    (round to nearest even, as numpy's astype)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((19, 96)) * 3).astype(np.float16)
    rk = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
    y16 = run(op_model(96, op, dtype=TensorProto.FLOAT16, r_intra=rk), library, x)
    y32 = run(op_model(96, op, r_intra=rk), library, x.astype(np.float32))
    assert y16.dtype == np.float16 and same(y16, y32.astype(np.float16))


def test_agrees_with_the_function_body_up_to_summation_order(library):
    """The function body (ORT MatMuls) and the compiled op (fmaf chains) differ only where a
    rotated value's last bit moves it across an FP4 rounding boundary."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 192)).astype(np.float32)
    rk = (rng.standard_normal((6, 32, 32)) / np.sqrt(32)).astype(np.float32)
    model = op_model(192, r_intra=rk)
    y_fn = session(model).run(None, {"x": x})[0]
    y_c = run(model, library, x)
    assert np.mean(y_fn == y_c) > 0.999


def test_compiled_op_is_bit_identical_to_the_cuda_kernels(library, tmp_path):
    """The CUDA kernels (mxfp4_quant.cu on the host emulator, both thread mappings, with the
    device form of mxfp4_math.cuh) and the compiled CPU op (its host form) compute the same
    fmaf chains and quantizer, so the same bits: what a GPU session computes, a CPU session
    with the library reproduces."""
    from test_cuda_emulated import CXX, build_harness, rotate_quant

    if CXX is None:
        pytest.skip("no g++ for the emulator")
    exe = build_harness(tmp_path / "kernel_harness")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((133, 160)) * np.exp(rng.standard_normal(160))).astype(np.float32)
    x[9, 70] = np.nan
    for rk in ((rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32),
               (rng.standard_normal((5, 32, 32)) / np.sqrt(32)).astype(np.float32)):
        y = run(op_model(160, r_intra=rk), library, x)
        z = run(op_model(160, F.ROTATE, r_intra=rk), library, x)
        for kernel in cuda.ROTATE_KERNELS:
            y_k, z_k = rotate_quant(exe, kernel, x, rk)
            assert same(z, z_k) and same(y, y_k), kernel


@pytest.mark.parametrize("d, rk_shape, message", [
    (48, (32, 32), "last axis of x (48) is not a multiple of 32"),
    (64, (3, 32, 32), "r_intra must be [32, 32] or [2, 32, 32]"),
])
def test_bad_shapes_are_named_in_the_error(library, d, rk_shape, message):
    model = op_model(d, r_intra=np.zeros(rk_shape, np.float32))
    with pytest.raises(Exception) as info:  # ORT's own exception type, carrying the op's message
        run(model, library, np.zeros((2, d), np.float32))
    assert message in str(info.value)


def test_whole_exported_model_runs_the_compiled_op(library, exported_decoder, tmp_path):
    """An export's graph, unchanged, runs its TorqRotateQuantize nodes as the compiled kernel
    (ORT's profile names the custom op, not the function body's ops) and gives logits close
    to the function-body session's, the same next token almost everywhere."""
    model = onnx.load(str(exported_decoder))
    sites = sum(n.op_type == F.ROTATE_QUANTIZE for n in model.graph.node)
    assert sites > 0
    base = session(model)
    ids = np.random.default_rng(6).integers(0, 50, 48).astype(np.int64)
    feeds = calib.feeds_for_inputs(calib.input_specs(base), ids)  # an empty KV cache: a full-sequence pass
    want = base.run(["logits"], feeds)[0]
    sess = session(model, library, profile_dir=tmp_path)
    got = sess.run(["logits"], feeds)[0]
    ran = profiled_runs(sess, F.ROTATE_QUANTIZE)
    assert len({e["name"] for e in ran}) >= sites, "the custom kernel did not run for every site"
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.9
    np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())


def test_cached_build_is_reused_and_a_compiler_error_leaves_no_library(library, tmp_path):
    assert compiled.build_library(strict=True) == library  # the same key: no rebuild
    bad = tmp_path / "include"
    bad.mkdir()
    (bad / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 29\n#error not a real header\n")
    out = tmp_path / "lib" / "libtorq.so"
    with pytest.raises(TorqError, match="building the torq custom ops failed"):
        compiled.build_library(include=bad, output=out)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_header_folder_is_checked(tmp_path):
    with pytest.raises(TorqError, match="no onnxruntime_c_api.h"):
        compiled.ort_headers(tmp_path)
    (tmp_path / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 16\n")
    with pytest.raises(TorqError, match="need 20"):
        compiled.ort_headers(tmp_path)


@pytest.mark.skipif(NVCC is None, reason="no nvcc on PATH")
@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
def test_cuda_library_compiles_without_warnings(library, kernel, tmp_path):
    """The CUDA build (CPU and CUDA EP kernels, sm_80 and sm_90, warnings as errors) links
    into one library that exports the registration entry point and loads into a CPU-only
    ORT, where its CPU kernels run as in the CPU build. Where cuobjdump is installed, its GPU
    code (the embedded PTX, and the SASS of mxfp4_quant.cu's kernels in every cubin) asks
    for exact IEEE operations only, as test_cuda_exact_math.py checks NVRTC's build."""
    out = compiled.build_library(cuda=True, kernel=kernel, strict=True, output=tmp_path / "libtorq_cuda.so")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True, text=True).stdout
    assert "RegisterCustomOps" in symbols
    x = np.random.default_rng(7).standard_normal((8, 64)).astype(np.float32)
    model = op_model(64)
    assert same(run(model, out, x), run(model, library, x))
    if can_disassemble():
        ptx = float_code.ptx_float_ops(cuobjdump(out, "-ptx"))
        # the fused kernel's fmaf chain and quantizer, and __float2half_rn's rounding
        assert {"fma.rn.f32", "mul.rn.f32", "cvt.rni.f32.f32", "cvt.rn.f16.f32"} <= set(ptx), sorted(ptx)
        assert float_code.problems(ptx, float_code.ptx_problem) == {}
        # the machine code of mxfp4_quant.cu's kernels, each read beside its PTX (the
        # group-mixing kernel's integer division is lowered with exact uses of MUFU.RCP)
        kernel_ptx = float_code.ptx_functions(cuobjdump(out, "-ptx"))
        kernels = [(name, body) for name, body in float_code.sass_functions(cuobjdump(out, "-sass")) if name in NVRTC_KERNELS]
        assert sorted(name for name, _ in kernels) == sorted(NVRTC_KERNELS * len(compiled.DEFAULT_CUDA_ARCHS))
        for name, body in kernels:
            ops = float_code.sass_float_ops(body)
            want = {"mxfp4_fake_quant": {"FMUL", "FRND"}, cuda.MIX_KERNEL: {"FFMA"}}.get(name, {"FFMA", "FMUL", "FRND"})
            assert want <= set(ops), (name, sorted(ops))
            assert float_code.sass_problems(body, kernel_ptx[name]) == {}, name


@pytest.mark.gpu
def test_cuda_session_matches_the_cpu_library_bit_for_bit(library, tmp_path):
    """On a GPU: the whole-graph CUDA session with the CUDA build computes the same bits as the
    CPU library, shared and per-block R_intra, dense R_inter, float16, and at a torq site's
    size (D = 4096, [128, 128] R_inter)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    lib = compiled.build_library(cuda=True)
    rng = np.random.default_rng(8)
    for dtype, np_dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
        x = (rng.standard_normal((4099, 256)) * 2).astype(np_dtype)
        for ri in (np.ones((1, 1), np.float32), np.linalg.qr(rng.standard_normal((8, 8)))[0].astype(np.float32)):
            for rk in (np.eye(32, dtype=np.float32), (rng.standard_normal((8, 32, 32)) / 6).astype(np.float32)):
                for op in (F.ROTATE_QUANTIZE, F.ROTATE):
                    model = op_model(256, op, dtype=dtype, r_inter=ri, r_intra=rk)
                    gpu = session(model, lib, provider="CUDAExecutionProvider")
                    assert same(gpu.run(None, {"x": x})[0], run(model, library, x)), (dtype, ri.shape, rk.shape, op)
    # a torq site's form at D = 4096: [128, 128] R_inter (the group-mixing kernel's two CTAs of rows, four tiles of h)
    x = rng.standard_normal((1029, 4096)).astype(np.float32)
    ri = np.linalg.qr(rng.standard_normal((128, 128)))[0].astype(np.float32)
    for op in (F.ROTATE_QUANTIZE, F.ROTATE):
        model = op_model(4096, op, r_inter=ri, r_intra=(rng.standard_normal((32, 32)) / 6).astype(np.float32))
        gpu = session(model, lib, provider="CUDAExecutionProvider")
        assert same(gpu.run(None, {"x": x})[0], run(model, library, x)), ("D=4096", op)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU with cupy")
@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
def test_cupy_route_with_the_fmaf_mix_gives_the_cpu_library_bits(library, kernel):
    """On a GPU: the CuPy route (what SplitSession runs) with ``mix="fmaf"``, the library's
    group-mixing kernel before either fused kernel, gives the CPU library's bits for a dense
    R_inter: the rotated values (TorqRotate) and the quantized ones, [8, 8] with per-block
    R_intra and a torq site's [128, 128] at D = 4096 with a shared one."""
    import cupy as cp

    rng = np.random.default_rng(11)
    for d, groups, per_block in ((256, 8, True), (4096, 128, False)):
        x = (rng.standard_normal((1029, d)) * np.exp(rng.standard_normal(d))).astype(np.float32)
        ri = np.linalg.qr(rng.standard_normal((groups, groups)))[0].astype(np.float32)
        rk = (rng.standard_normal((d // 32, 32, 32) if per_block else (32, 32)) / 6).astype(np.float32)
        z = cp.full(x.shape, cp.nan, dtype=cp.float32)
        y = cuda.RotateQuantizer(ri, rk, kernel=kernel, mix="fmaf")(cp.asarray(x), rotated_out=z)
        assert same(z.get(), run(op_model(d, F.ROTATE, r_inter=ri, r_intra=rk), library, x)), (d, "rotated")
        assert same(y.get(), run(op_model(d, F.ROTATE_QUANTIZE, r_inter=ri, r_intra=rk), library, x)), (d, "quantized")


def concurrent_runs(sess: ort.InferenceSession, xs: list[np.ndarray]) -> list[np.ndarray]:
    """sess.run on every x at once, from as many threads (ORT allows concurrent Run calls)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(xs)) as pool:
        return list(pool.map(lambda x: sess.run(None, {"x": x})[0], xs))


def test_concurrent_runs_of_one_session_give_each_runs_own_bits(library):
    """Several threads running one session at once: every result is that input's result alone."""
    rng = np.random.default_rng(9)
    model = op_model(256, r_inter=np.linalg.qr(rng.standard_normal((8, 8)))[0].astype(np.float32),
                     r_intra=(rng.standard_normal((8, 32, 32)) / 6).astype(np.float32))
    sess = session(model, library)
    xs = [rng.standard_normal((2048, 256)).astype(np.float32) for _ in range(4)]
    for x, y in zip(xs, concurrent_runs(sess, xs)):
        assert same(y, sess.run(None, {"x": x})[0])


@pytest.mark.gpu
def test_cuda_session_places_the_op_on_the_gpu_and_runs_concurrently(library, tmp_path):
    """On a GPU: ORT's profile shows the op on the CUDA EP, and concurrent runs of one CUDA
    session (each call's scratch memory its own) give the CPU library's bits."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    rng = np.random.default_rng(10)
    model = op_model(256, F.ROTATE_QUANTIZE, dtype=TensorProto.FLOAT16,
                     r_inter=np.linalg.qr(rng.standard_normal((8, 8)))[0].astype(np.float32),
                     r_intra=(rng.standard_normal((8, 32, 32)) / 6).astype(np.float32))
    gpu = session(model, compiled.build_library(cuda=True), profile_dir=tmp_path, provider="CUDAExecutionProvider")
    xs = [(rng.standard_normal((4099, 256)) * 2).astype(np.float16) for _ in range(4)]
    for x, y in zip(xs, concurrent_runs(gpu, xs)):
        assert same(y, run(model, library, x))
    providers = {e["args"].get("provider") for e in profiled_runs(gpu, F.ROTATE_QUANTIZE)}
    assert providers == {"CUDAExecutionProvider"}, providers


def test_cli_builds_the_library_and_scores_with_it(library, exported_decoder):
    """``build-ops`` prints the cached library; ``eval --custom-ops`` scores the export with the
    compiled op, within float32 noise of the function bodies."""
    from typer.testing import CliRunner

    from torq_onnx.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["build-ops"])
    assert res.exit_code == 0, res.output
    built = Path(res.output.strip())  # the cache's build (the fixture's adds -Werror: another key)
    assert built.is_file() and built == compiled.build_library()
    scores = []
    for extra in ([], ["--custom-ops"]):
        res = runner.invoke(app, ["eval", str(exported_decoder), "--max-tokens", "96", "--seq-len", "32", "--stride", "16",
                                  "--quiet", *extra])
        assert res.exit_code == 0, res.output
        scores.append(float(res.output.split("perplexity")[1].split()[0]))
    assert abs(scores[0] - scores[1]) < 0.02 * scores[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel", "warp"], "--kernel and --arch choose the CUDA build: add --cuda"),
    (["--arch", "sm_90"], "--kernel and --arch choose the CUDA build: add --cuda"),
    (["--cuda", "--arch", "90"], "--arch '90' is not a GPU architecture of the form sm_NN"),
    (["--cuda", "--kernel", "wrap"], "unknown kernel 'wrap'; choose from ['thread', 'warp']"),
])
def test_build_ops_names_a_bad_option_before_any_build(monkeypatch, tmp_path, args, message):
    """A CUDA option without --cuda (which the CPU build would silently ignore), a malformed
    architecture or an unknown kernel is one line naming it, before headers are fetched or a
    compiler runs."""
    from typer.testing import CliRunner

    from torq_onnx.cli import app

    monkeypatch.setattr(compiled, "ort_headers", lambda *a, **k: pytest.fail("the headers were sought despite a bad option"))
    res = CliRunner().invoke(app, ["build-ops", *args, "-o", str(tmp_path / "lib.so")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert message in " ".join(res.output.split())
    assert not any(tmp_path.iterdir())
