"""The CUDA kernels' thread mapping, run on the CPU: runtime_ops/mxfp4_quant.cu compiled
unchanged by g++ against a host emulator of CUDA threads, barriers and warp collectives
(tests/simt/simt_host.h), launched with the shapes runtime_ops/cuda.py uses. Checks indexing,
tails, shared-memory tiles and warp reductions bit-exact against the numpy reference, and,
in a ThreadSanitizer build, that no two threads touch the same memory unordered by a barrier
(a data race the GPU might or might not expose); speed stays GPU-only (pytest -m gpu,
tools/bench_ops.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from torq_onnx import mxfp4
from torq_onnx.runtime_ops import cuda
from torq_onnx.runtime_ops import functions as F
from torq_onnx.runtime_ops import reference as ref

from test_runtime_ops import adversarial, same

SIMT = Path(__file__).with_name("simt")
KERNELS = Path(F.__file__).parent  # runtime_ops/: mxfp4_quant.cu and mxfp4_math.cuh
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++20 compiler (g++) on PATH")
TSAN = ["-fsanitize=thread", "-g"]
DEVICE_MATH = ["-DTORQ_DEVICE_MATH"]  # mxfp4_math.cuh's device form, as the GPU compiles it


def simt_build(exe: Path, harness: str, *flags: str, opt: str = "-O2") -> Path:
    """tests/simt/``harness`` built by g++ against the thread emulator (simt_host.h), with
    mxfp4_math.cuh's device form and every warning an error; ``flags`` add sanitizers,
    defines and include folders (searched in their order)."""
    cmd = [CXX, "-std=c++20", opt, "-pthread", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
           *DEVICE_MATH, *flags, "-include", str(SIMT / "simt_host.h"), "-o", str(exe), str(SIMT / harness)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return exe


def build_harness(exe: Path, *flags: str, kernel_dir: Path = KERNELS) -> Path:
    """kernel_harness.cpp with mxfp4_quant.cu taken from kernel_dir (a mutated copy in the
    race-checker tests) and mxfp4_math.cuh from runtime_ops/, in its device form."""
    return simt_build(exe, "kernel_harness.cpp", *flags, f"-I{kernel_dir}", f"-I{KERNELS}")


def sanitizer_missing(flags: list[str]) -> str | None:
    """Why a program built with the sanitizer ``flags`` cannot run here, or None when it can."""
    if CXX is None:
        return "no g++"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "probe.cpp"), Path(tmp, "probe")
        src.write_text("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
        res = subprocess.run([CXX, "-std=c++20", *flags, "-o", str(exe), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            return f"g++ cannot build with {' '.join(flags)}: {res.stderr.strip()[-300:]}"
        res = subprocess.run([str(exe)], capture_output=True, text=True)
        return f"a {' '.join(flags)} program does not run here: {res.stderr.strip()[-300:]}" if res.returncode else None


NO_TSAN = sanitizer_missing(TSAN)


@pytest.fixture(scope="module", params=["plain", "tsan"])
def harness(request, tmp_path_factory) -> Path:
    """The harness, and again under ThreadSanitizer, where any data race fails the run."""
    if request.param == "tsan" and NO_TSAN:
        pytest.skip(NO_TSAN)
    flags = {"plain": [], "tsan": TSAN}[request.param]
    return build_harness(tmp_path_factory.mktemp("simt") / "kernel_harness", *flags)


def run(harness: Path, args: list, data: bytes, n_out: int) -> np.ndarray:
    res = subprocess.run([str(harness), *map(str, args)], input=data, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    out = np.frombuffer(res.stdout, dtype=np.float32)
    assert out.size == n_out
    return out


def fake_quant(harness: Path, z: np.ndarray, rule: str) -> np.ndarray:
    n_blocks = z.size // 32
    (gx,), (threads,) = cuda.fake_quant_grid(n_blocks)
    return run(harness, ["mxfp4_fake_quant", gx, 1, threads, n_blocks, repr(F.bump_threshold(rule))], z.tobytes(), z.size).reshape(z.shape)


def rotate_quant(harness: Path, kernel: str, x: np.ndarray, r_intra: np.ndarray, rule: str = "floor",
                 spec: cuda.RotateKernel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, z) of one fused-kernel launch, shaped as cuda.block_rotate_quantize launches it."""
    spec = spec or cuda.ROTATE_KERNELS[kernel]
    out = run(harness, rotate_args(spec, x, r_intra, rule), x.tobytes() + np.ascontiguousarray(r_intra, np.float32).tobytes(),
              2 * x.size)
    return out[: x.size].reshape(x.shape), out[x.size:].reshape(x.shape)


def rotate_args(spec: cuda.RotateKernel, x: np.ndarray, r_intra: np.ndarray, rule: str) -> list:
    """The harness's command line for one fused-kernel launch on x, with cuda.py's grid."""
    rows, n_blocks = x.shape[0], x.shape[1] // 32
    [(_, _, (gx, gy))] = cuda.rotate_launches(spec, rows, n_blocks)
    return [spec.name, gx, gy, spec.threads, rows, n_blocks, 1024 if r_intra.ndim == 3 else 0, repr(F.bump_threshold(rule))]


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_warp_quantizer_kernel_is_bit_exact(harness, rule):
    """123 blocks: the last CTA has 3 of its 8 warps idle."""
    z = adversarial(np.random.default_rng(5), 41, 96)
    assert same(fake_quant(harness, z, rule), ref.quantize_rotated(z, np.float32, rule))


@pytest.mark.parametrize("kernel", sorted(cuda.ROTATE_KERNELS))
@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_fused_kernel_with_identity_rotation_is_the_quantizer(harness, kernel, rule):
    """x @ I is x for finite x, so the adversarial cases reach the quantizer unchanged."""
    x = adversarial(np.random.default_rng(6), 70, 160)
    y, z = rotate_quant(harness, kernel, x, np.eye(32, dtype=np.float32), rule)
    finite = np.isfinite(x).reshape(70, 5, 32).all(-1).repeat(32, -1)
    np.testing.assert_array_equal(z[finite], x[finite])
    assert same(y, ref.quantize_rotated(x, np.float32, rule))


@pytest.mark.parametrize("per_block", [False, True])
def test_fused_kernels_agree_bit_for_bit_and_with_numpy(harness, per_block):
    """133 rows (a partial row tile and a partial 4-row step) x 5 blocks (3 idle warps): both
    kernels write every element, the same fmaf chain gives identical z, and y is the
    reference quantizer of exactly that z."""
    rng = np.random.default_rng(8)
    n, b = 133, 5
    r_intra = (rng.standard_normal((b, 32, 32) if per_block else (32, 32)) / np.sqrt(32)).astype(np.float32)
    x = (rng.standard_normal((n, 32 * b)) * np.exp(2 * rng.standard_normal(32 * b))).astype(np.float32)
    x[7, 32:64] = 0.0  # a zero block
    x[9, 70] = np.nan  # a NaN block
    results = {k: rotate_quant(harness, k, x, r_intra) for k in cuda.ROTATE_KERNELS}
    (y, z), (y_w, z_w) = results["thread"], results["warp"]
    assert same(z_w, z) and same(y_w, y)
    want_z = np.einsum("nbi,bij->nbj", x.reshape(n, b, 32).astype(np.float64),
                       np.broadcast_to(r_intra, (b, 32, 32))).reshape(n, -1)
    ok = np.isfinite(want_z)
    np.testing.assert_allclose(z[ok], want_z[ok], rtol=1e-4, atol=1e-5 * np.abs(want_z[ok]).max())
    assert np.isnan(y[9, 64:96]).all() and (y[7, 32:64] == 0).all()
    assert same(y, ref.quantize_rotated(z, np.float32))


def test_a_wrong_launch_shape_is_caught(harness):
    """The checks above can fail: a grid one block-column too narrow leaves blocks unwritten."""
    x = np.random.default_rng(9).standard_normal((40, 32 * 9)).astype(np.float32)
    spec = cuda.ROTATE_KERNELS["warp"]
    narrow = cuda.RotateKernel(spec.name, spec.threads, spec.blocks_per_cta + 1, spec.rows_per_cta)  # 9 blocks, 1 CTA
    y, _ = rotate_quant(harness, "warp", x, np.eye(32, dtype=np.float32), spec=narrow)
    want = ref.quantize_rotated(x, np.float32)
    assert same(y[:, :256], want[:, :256]) and not same(y[:, 256:], want[:, 256:])


def group_mix(harness: Path, x: np.ndarray, r_inter: np.ndarray, grid: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(torq_group_mix's output, torq_group_mix_element's chain per output) for x [rows, D]
    mixed by r_inter [G, G], launched as cuda.group_mix does (or on ``grid``)."""
    rows, g = x.shape[0], r_inter.shape[0]
    width = x.shape[1] // g
    launch_grid, (threads,) = cuda.group_mix_launch(rows, g, width)
    gx, gy = grid or launch_grid
    out = run(harness, [cuda.MIX_KERNEL, gx, gy, threads, rows, g, width], x.tobytes() + r_inter.tobytes(), 2 * x.size)
    return out[: x.size].reshape(x.shape), out[x.size:].reshape(x.shape)


def mix_case(rows: int, groups: int, width: int, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, groups * width)) * np.exp(rng.standard_normal(groups * width))).astype(np.float32)
    x[3 % rows, 0] = np.nan  # spreads to the token's column k = 0 of every group
    return x, np.linalg.qr(rng.standard_normal((groups, groups)))[0].astype(np.float32)


@pytest.mark.parametrize(("rows", "groups", "width"), [(37, 2, 80), (37, 10, 16), (37, 40, 4), (37, 160, 1), (5, 18, 32),
                                                       (3, 72, 32), (9, 130, 32)])
def test_group_mix_kernel_as_cupy_launches_it_is_the_fmaf_chain(harness, rows, groups, width):
    """torq_group_mix on the grid cuda.group_mix_launch computes (the CuPy route's
    ``mix="fmaf"``) gives, for every output, the fmaf chain in h order that the CPU library
    computes, bit for bit: a warp's columns spanning two tokens (width 80), partial tiles of
    h (G = 10, 40, 130), idle warps (G = 18: SmolLM2's 576 / 32) and rows of R past the last
    CTA's (G = 130: three CTAs of 64 rows), 160 groups of width 1, a partial last CTA of
    columns, and a NaN that spreads along its column."""
    x, r = mix_case(rows, groups, width)
    got, want = group_mix(harness, x, r)
    assert same(got, want)
    assert np.isnan(got[3 % rows].reshape(groups, width)[:, 0]).all() and np.isfinite(np.delete(got, 3 % rows, 0)).all()
    ok = np.isfinite(want)
    exact = np.einsum("gh,nhk->ngk", r.astype(np.float64), x.reshape(rows, groups, width).astype(np.float64)).reshape(x.shape)
    np.testing.assert_allclose(got[ok], exact[ok], rtol=1e-4, atol=1e-5 * np.abs(exact[ok]).max())


def test_a_short_group_mix_grid_is_caught(harness):
    """The check above can fail: a grid one column tile or one row tile short leaves outputs
    unwritten (the harness poisons them with NaN)."""
    x, r = mix_case(9, 130, 32)
    (gx, gy), _ = cuda.group_mix_launch(9, 130, 32)
    for grid in ((gx - 1, gy), (gx, gy - 1)):
        got, want = group_mix(harness, x, r, grid)
        assert not same(got, want)


def test_launch_geometry_in_python_is_the_sources():
    """cuda.py's launch constants are the #defines the kernels are written for (a mismatch
    would launch a grid the kernel does not cover, or threads it does not expect)."""
    source = (KERNELS / "mxfp4_quant.cu").read_text()
    defines = {k: int(v) for k, v in re.findall(r"^#define (TORQ_\w+) (\d+)", source, re.M)}
    warp = cuda.ROTATE_KERNELS["warp"]
    assert (defines["TORQ_MIX_WARPS"], defines["TORQ_MIX_ROWS"]) == (cuda.MIX_WARPS, cuda.MIX_ROWS)
    assert (defines["TORQ_W_WARPS"] * 32, defines["TORQ_W_WARPS"], defines["TORQ_W_ROWS"]) == (
        warp.threads, warp.blocks_per_cta, warp.rows_per_cta)
    assert re.search(rf"__launch_bounds__\({cuda.ROTATE_KERNELS['thread'].threads}\)\s*torq_block_rotate_quant\(", source)


# The barriers the kernels need, each as its exact line in mxfp4_quant.cu, with the kernel (a key
# of cuda.ROTATE_KERNELS, or "mix": torq_group_mix), the shared array it orders and others a
# missing one may expose too (the warp kernel's two barriers a step order both of its tiles).
BARRIERS = {
    "thread kernel: R_b staged before use": ("thread", ("rs",), "    __syncthreads();\n    long long n ="),
    "warp kernel: tile stored before it is read": (
        "warp", ("tile", "ztile"), "        tile[warp][lane] = next;\n        __syncwarp();\n"),
    "warp kernel: z tile stored before it is read": (
        "warp", ("ztile", "tile"), "        for (int k = 0; k < TORQ_W_STEP; ++k) zrow[k * 32 + lane] = z[k];\n        __syncwarp();\n"),
    "group mix: tiles staged before they are read": (
        "mix", ("xs", "rs"), "        __syncthreads();\n        if (!live || g_warp >= groups) continue;"),
    "group mix: tiles read before they are restaged": (
        "mix", ("xs", "rs"), "        __syncthreads();  // every lane is done with the previous tile\n"),
}


@pytest.mark.skipif(NO_TSAN is not None, reason=str(NO_TSAN))
@pytest.mark.parametrize("barrier", sorted(BARRIERS))
def test_race_checker_reports_a_missing_barrier(barrier, tmp_path):
    """The ThreadSanitizer build can fail: with one barrier deleted from the kernel source, the
    race on that kernel's shared memory is reported (and the run fails) although the output
    may still come out right on the host."""
    kernel, arrays, line = BARRIERS[barrier]
    source = (KERNELS / "mxfp4_quant.cu").read_text()
    assert source.count(line) == 1, f"the barrier line is no longer in mxfp4_quant.cu: {line!r}"
    without = re.sub(r"__sync(threads|warp)\(\);.*", "", line)  # the barrier call and its comment
    assert without != line
    (tmp_path / "mxfp4_quant.cu").write_text(source.replace(line, without))
    exe = build_harness(tmp_path / "kernel_harness", *TSAN, kernel_dir=tmp_path)
    if kernel == "mix":  # 40 groups: two tiles of h, so a tile is restaged
        x, r = mix_case(40, 40, 4)
        (gx, gy), (threads,) = cuda.group_mix_launch(40, 40, 4)
        args = [cuda.MIX_KERNEL, gx, gy, threads, 40, 40, 4]
    else:
        rng = np.random.default_rng(10)
        x = rng.standard_normal((133, 32 * 5)).astype(np.float32)
        r = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
        args = rotate_args(cuda.ROTATE_KERNELS[kernel], x, r, "floor")
    res = subprocess.run([str(exe), *map(str, args)], input=x.tobytes() + r.tobytes(), capture_output=True, timeout=300)
    report = res.stderr.decode()
    assert res.returncode != 0 and "ThreadSanitizer: data race" in report, report[-2000:]
    # the race is on that barrier's shared array, and any other only on that kernel's arrays
    places = set(re.findall(r"Location is global '[^']*::(\w+)'", report))
    assert arrays[0] in places and places <= set(arrays), (places, report[-2000:])


def test_a_barrier_some_threads_never_reach_is_reported_not_hung(tmp_path):
    """The fiber emulator notices when no thread can move on: lane 0 waits at __syncwarp for
    lanes that wait at __syncthreads for lane 0."""
    kernel, _, line = BARRIERS["thread kernel: R_b staged before use"]
    source = (KERNELS / "mxfp4_quant.cu").read_text()
    (tmp_path / "mxfp4_quant.cu").write_text(source.replace(line, line.replace("__syncthreads();", "if (threadIdx.x == 0) __syncwarp(); else __syncthreads();")))
    exe = build_harness(tmp_path / "kernel_harness", kernel_dir=tmp_path)
    x = np.zeros((4, 32), np.float32)
    r = np.eye(32, dtype=np.float32)
    res = subprocess.run([str(exe), *map(str, rotate_args(cuda.ROTATE_KERNELS[kernel], x, r, "floor"))], input=x.tobytes() + r.tobytes(),
                         capture_output=True, timeout=60)
    assert res.returncode != 0 and "deadlock" in res.stderr.decode(), res.stderr.decode()[-2000:]
