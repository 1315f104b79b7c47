"""The CUDA route's Python side on the CPU: runtime_ops/cuda.py and the split runner's
cupy_kernel, with CuPy replaced by tests/emulated_cupy.py (numpy arrays, and each kernel
launch run on the host emulator of CUDA threads with the grid and arguments cuda.py passes).
With ``mix="fmaf"`` the op must then give the compiled CPU library's bits, alone and inside a
split run of an exported model; what stays GPU-only is the GPU's execution and real device
memory (pytest -m gpu)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto

from torq_onnx import mxfp4, torq
from torq_onnx.pipeline import ExportOptions, rewrite
from torq_onnx.runtime_ops import cuda, load_session
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref
from torq_onnx.runtime_ops import split_runner
from torq_onnx.runtime_ops.split_runner import SplitSession, cupy_kernel

import emulated_cupy
from test_compiled_ops import op_model, run
from test_cuda_emulated import CXX, build_harness
from test_runtime_ops import adversarial, same
from tiny_models import batches, tiny_transformer

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++20 compiler (g++) on PATH")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("simt-route") / "kernel_harness")


@pytest.fixture
def launches(monkeypatch, harness) -> list:
    """cuda.py's kernels launched on the emulator through a stand-in CuPy; the launches made."""
    made: list = []
    monkeypatch.setitem(sys.modules, "cupy", emulated_cupy.module())
    monkeypatch.setattr(cuda, "_kernel", emulated_cupy.kernels(harness, made))
    return made


def case(rng: np.random.Generator, d: int, groups: int, per_block: bool, rows: int = 133):
    x = (rng.standard_normal((rows, d)) * np.exp(rng.standard_normal(d))).astype(np.float32)
    x[7, 32:64] = 0  # a zero block
    r_inter = np.linalg.qr(rng.standard_normal((groups, groups)))[0].astype(np.float32)
    r_intra = (rng.standard_normal((d // 32, 32, 32) if per_block else (32, 32)) / 6).astype(np.float32)
    return x, r_inter, r_intra


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_fake_quant_rows_is_the_reference_quantizer(launches, rule):
    """cuda.fake_quant_rows (the quantizer alone, a warp per block) on the adversarial cases."""
    z = adversarial(np.random.default_rng(4), 41, 96)
    assert same(cuda.fake_quant_rows(z, rule).get(), ref.quantize_rotated(z, np.float32, rule))
    assert [name for name, _, _ in launches] == ["mxfp4_fake_quant"]


@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
@pytest.mark.parametrize(("d", "groups", "per_block"), [(160, 5, True), (256, 8, False), (96, 3, False)])
def test_fmaf_route_gives_the_cpu_librarys_bits(library, launches, kernel, d, groups, per_block):
    """RotateQuantizer(mix="fmaf"): the group-mixing kernel, then the fused kernel, as cuda.py
    launches them, give the CPU library's TorqRotate and TorqRotateQuantize outputs bit for
    bit (133 rows: a partial row tile of either fused kernel)."""
    x, ri, rk = case(np.random.default_rng(d), d, groups, per_block)
    z = emulated_cupy.module().full(x.shape, np.nan, dtype=np.float32)  # poisoned: every element must be written
    y = cuda.RotateQuantizer(ri, rk, kernel=kernel, mix="fmaf")(x, rotated_out=z)
    assert [name for name, _, _ in launches] == [cuda.MIX_KERNEL, cuda.rotate_kernel(kernel).name]
    assert same(z.get(), run(op_model(d, F.ROTATE, r_inter=ri, r_intra=rk), library, x))
    assert same(y.get(), run(op_model(d, F.ROTATE_QUANTIZE, r_inter=ri, r_intra=rk), library, x))


def test_float16_input_gives_the_cpu_librarys_float16_bits(library, launches):
    """A float16 activation (a float16 graph's) is widened, mixed, rotated and quantized in
    float32 and rounded once to float16, as the library's float16 kernel does."""
    x, ri, rk = case(np.random.default_rng(5), 160, 5, True)
    y = cuda.RotateQuantizer(ri, rk, mix="fmaf")(x.astype(np.float16))
    assert y.dtype == np.float16
    model = op_model(160, F.ROTATE_QUANTIZE, dtype=TensorProto.FLOAT16, r_inter=ri, r_intra=rk)
    assert same(y.get(), run(model, library, x.astype(np.float16)))


def test_cublas_route_and_identities(launches):
    """mix="cublas" (a matmul, then the fused kernel): the quantizer is bit-exact on the values
    it rotated and they agree with float64; an identity R_inter ([[1]], eye(B)) launches the
    fused kernel alone."""
    x, ri, rk = case(np.random.default_rng(1), 256, 8, True)
    z = emulated_cupy.module().full(x.shape, np.nan, dtype=np.float32)
    y = cuda.RotateQuantizer(ri, rk, mix="cublas")(x, rotated_out=z).get()
    want = torq.apply_rotation(x.astype(np.float64), ri, rk)
    np.testing.assert_allclose(z.get(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert same(y, ref.quantize_rotated(z.get(), np.float32))
    launches.clear()
    for identity in (np.ones((1, 1), np.float32), np.eye(8, dtype=np.float32)):
        cuda.RotateQuantizer(identity, rk, mix="fmaf")(x)
    assert [name for name, _, _ in launches] == [cuda.rotate_kernel(cuda.DEFAULT_ROTATE_KERNEL).name] * 2


@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
def test_long_inputs_take_several_launches_that_cover_every_row(library, launches, monkeypatch, kernel):
    """With the grid's y limit lowered to one row tile, 300 rows take three launches of the
    fused kernel (row offsets into x, y and the rotated output) and give the same bits."""
    monkeypatch.setattr(cuda, "MAX_GRID_Y", 1)
    x, ri, rk = case(np.random.default_rng(3), 64, 2, False, rows=300)
    z = emulated_cupy.module().full(x.shape, np.nan, dtype=np.float32)
    y = cuda.RotateQuantizer(ri, rk, kernel=kernel, mix="fmaf")(x, rotated_out=z)
    assert [name for name, _, _ in launches] == [cuda.MIX_KERNEL] + [cuda.rotate_kernel(kernel).name] * 3
    assert same(z.get(), run(op_model(64, F.ROTATE, r_inter=ri, r_intra=rk), library, x))
    assert same(y.get(), run(op_model(64, F.ROTATE_QUANTIZE, r_inter=ri, r_intra=rk), library, x))


def test_split_run_with_the_fmaf_route_is_the_library_session_bit_for_bit(library, launches, tmp_path):
    """A torq export (dense R_inter at every site) split at its ops, each op computed by
    cupy_kernel(mix="fmaf") on the emulator: the logits of the whole-graph CPU session with
    the compiled library, bit for bit (the segments are the same ORT CPU graph)."""
    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), ExportOptions(progress=False, method="torq"))
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    feeds = batches(1, 40, seed=3)[0]
    op = cupy_kernel(mix="fmaf")
    # on the GPU the kernel receives the segment's output as an OrtValue, which it views
    # through CuPy without a copy (split_runner._cupy_view); here a CPU OrtValue, viewed alike
    split = SplitSession(path, kernel=lambda x, site: np.array(op(ort.OrtValue.ortvalue_from_numpy(x), site).get()))
    logits = split.run(None, feeds)[0]
    assert cuda.MIX_KERNEL in {name for name, _, _ in launches}
    np.testing.assert_array_equal(logits, load_session(path, custom_ops=library).run(None, feeds)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_cupy_view_of_an_ortvalue_is_its_buffer(launches, dtype):
    """split_runner._cupy_view, how the kernel reads a segment's output on the GPU: the
    OrtValue's dtype (from ORT's "tensor(float16)" spelling) and shape over its own memory,
    not a copy (a write through the view is the OrtValue's)."""
    x = (np.arange(2 * 3 * 64).reshape(2, 3, 64) / 7).astype(dtype)
    value = ort.OrtValue.ortvalue_from_numpy(x)
    view = split_runner._cupy_view(value)
    assert view.dtype == dtype and view.shape == x.shape
    np.testing.assert_array_equal(view.get(), x)
    view[1, 2, 63] = 5
    assert value.numpy()[1, 2, 63] == 5


def test_a_split_run_on_a_second_gpu_makes_it_current_for_cupy(harness, monkeypatch):
    """SplitSession(device="cuda", device_id=1)'s CuPy work (the kernels' arrays, their
    compilation and launches) goes to GPU 1 and its stream, which CuPy enters only while GPU 1
    is current (an emulated CuPy with two GPUs, checking that as CuPy does): cuda_scope makes
    it current for the run and restores the caller's device after, also when the run fails."""
    cp = emulated_cupy.module(devices=2)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(cuda, "_kernel", emulated_cupy.kernels(harness))
    with cp.cuda.Device(1):
        stream = cp.cuda.Stream(non_blocking=True)  # as SplitSession makes it
    with pytest.raises(RuntimeError, match="does not match with the current device"):
        with stream:  # the stream alone, with GPU 0 current
            pass
    x, r_inter, r_intra = case(np.random.default_rng(3), 64, 2, False, rows=9)
    site = split_runner.OnlineOp("x", "y", r_inter, r_intra, F.bump_threshold("floor"))
    with split_runner.cuda_scope(1, stream):
        assert cp.cuda.Device().id == 1
        y = cupy_kernel(mix="fmaf")(cp.asarray(x), site).get()
    assert cp.cuda.Device().id == 0
    np.testing.assert_array_equal(y, cupy_kernel(mix="fmaf")(cp.asarray(x), site).get())  # GPU 0: the same kernels
    with pytest.raises(ValueError), split_runner.cuda_scope(1, stream):
        raise ValueError("a failed run")
    assert cp.cuda.Device().id == 0


def test_the_gpu_tests_of_the_cupy_route_pass_on_the_emulator(tmp_path):
    """``pytest -m gpu --emulated-cupy``: the GPU tests themselves, unchanged, with CuPy's device
    replaced by the emulator (ORT's CUDA EP taken away), so a change that breaks one fails
    here rather than in a GPU session. Every GPU test that needs no CUDA EP must pass; the
    only skips allowed are those that name onnxruntime-gpu, and the compiled library's where
    ORT's headers cannot be had (the rest of the run skips it then too)."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", "--emulated-cupy",
                          "--basetemp", str(tmp_path / "run"), "tests"], cwd=root, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    skips = [line for line in res.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("onnxruntime-gpu" in line or "no ONNX Runtime headers here" in line for line in skips), skips
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) > 0, res.stdout[-2000:]


def tool(name: str):
    """The module of tools/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_verifys_sanitizer_and_profile_cases_run_on_the_emulator(launches, capsys):
    """tools/gpu_cases.py, what compute-sanitizer and Nsight Compute run on a GPU: the sanitizer
    case's own checks pass (the fused kernels agree, the group mix is float64's), and the
    profile case launches each fused kernel twice (ncu profiles the second)."""
    cases = tool("gpu_cases")
    cases.main(["sanitizer"])
    assert "sanitizer case ran" in capsys.readouterr().out
    assert {name for name, _, _ in launches} == {*(k.name for k in cuda.ROTATE_KERNELS.values()), cuda.MIX_KERNEL}
    launches.clear()
    cases.main(["profile", "40", "3"])
    names = [name for name, _, _ in launches]
    assert sorted(names) == sorted(2 * [k.name for k in cuda.ROTATE_KERNELS.values()])
    with pytest.raises(SystemExit, match="gpu_cases.py sanitizer"):
        cases.main(["profile", "40"])


def test_bench_ops_cuda_table_runs_on_the_emulator(launches, monkeypatch, capsys):
    """tools/bench_ops.py's CUDA table (the README's GPU numbers come from it) runs its own code
    unchanged on the emulated device, at a size the emulator runs quickly: a row per fused
    kernel for wush and per kernel and mix route for torq, each with finite times, and the
    fmaf route launching the group-mixing kernel."""
    monkeypatch.setitem(sys.modules, "cupyx", type(sys)("cupyx"))
    monkeypatch.setitem(sys.modules, "cupyx.profiler", emulated_cupy.profiler_module())
    tool("bench_ops").cuda_table([64], [40])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:2] == ["64", "40"]]
    got = sorted((r[2], r[3], r[4]) for r in rows)
    want = sorted([*(("wush", k, "-") for k in cuda.ROTATE_KERNELS),
                   *(("torq", k, m) for k in cuda.ROTATE_KERNELS for m in cuda.MIX_ROUTES)])
    assert got == want, lines
    for r in rows:
        ours_ms, mix_ms = float(r[6]), float(r[5])
        assert np.isfinite(ours_ms) and ours_ms > 0 and (np.isnan(mix_ms) if r[4] == "-" else mix_ms > 0), r
    assert cuda.MIX_KERNEL in {name for name, _, _ in launches}
    assert any(line.startswith("device-to-device copy:") for line in lines), lines
