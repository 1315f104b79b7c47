"""The compiled library's CUDA side (runtime_ops/ort_custom_ops_cuda.cu: the host function the
CUDA EP kernel calls, its group-mixing and float16 kernels, and the fused kernel as it
launches it) run on the CPU, compiled unchanged by g++ against an emulated CUDA runtime
(tests/simt/cuda_shim: tracked device memory, checked copies and launches, all work on the
op's stream, host waits counted) and the thread emulator, under AddressSanitizer (and under
ThreadSanitizer for the group-mixing kernel's shared tiles). Its output must be the CPU
library's, bit for bit, as the GPU test (``-m gpu``) requires of a real CUDA session. What stays GPU-only: ORT's CUDA EP itself (node placement, the compute stream, its
allocator) and the GPU's own ordering of the enqueued work."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from torq_onnx.runtime_ops import compiled, cuda
from torq_onnx.runtime_ops import functions as F

from test_compiled_ops import op_model, run
from test_cuda_emulated import KERNELS, NO_TSAN, SIMT, TSAN, sanitizer_missing, simt_build
from test_runtime_ops import same

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
NO_ASAN = sanitizer_missing(SANITIZE)
pytestmark = pytest.mark.skipif(NO_ASAN is not None, reason=str(NO_ASAN))


def build(exe: Path, kernel: str, max_grid_y: int | None = None, source_dir: Path = KERNELS, sanitize: list[str] = SANITIZE) -> Path:
    """library_harness.cpp with ort_custom_ops_cuda.cu from ``source_dir`` (a mutated copy in
    the tests that show the checks can fail), built with ``kernel``'s launch geometry as the
    library is and the ``sanitize`` flags (AddressSanitizer and UBSan, or ThreadSanitizer);
    ``max_grid_y`` lowers the grid's y limit so that a launch is split in chunks."""
    defines = compiled._launch_defines(kernel)
    if max_grid_y is not None:
        defines = [d for d in defines if not d.startswith("-DTORQ_MAX_GRID_Y=")] + [f"-DTORQ_MAX_GRID_Y={max_grid_y}"]
    return simt_build(exe, "library_harness.cpp", *sanitize, "-DTORQ_ORTOPS_CUDA", *defines, f"-I{SIMT / 'cuda_shim'}",
                      f"-I{source_dir}", f"-I{KERNELS}", opt="-O1")


def mutated_source(folder: Path, line: str, replacement: str) -> Path:
    """``folder`` holding ort_custom_ops_cuda.cu with its one ``line`` replaced (for
    :func:`build`'s ``source_dir``); fails if the line is no longer there exactly once."""
    source = (KERNELS / "ort_custom_ops_cuda.cu").read_text()
    assert source.count(line) == 1, f"no longer in ort_custom_ops_cuda.cu once: {line!r}"
    (folder / "ort_custom_ops_cuda.cu").write_text(source.replace(line, replacement))
    return folder


@pytest.fixture(scope="module", params=sorted(cuda.ROTATE_KERNELS))
def harness(request, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("simt-lib") / "library_harness", request.param)


@dataclass
class Case:
    """One node's inputs: x [rows, 32 * blocks], r_inter [groups, groups], r_intra."""
    x: np.ndarray
    r_inter: np.ndarray
    r_intra: np.ndarray
    quantize: bool = True

    @property
    def model(self):
        dtype = TensorProto.FLOAT16 if self.x.dtype == np.float16 else TensorProto.FLOAT
        return op_model(self.x.shape[1], F.ROTATE_QUANTIZE if self.quantize else F.ROTATE, dtype=dtype,
                        r_inter=self.r_inter, r_intra=self.r_intra)


def make_case(rng: np.random.Generator, dtype=np.float32, groups: int = 1, per_block: bool = False, quantize: bool = True,
              rows: int = 133, blocks: int = 5) -> Case:
    x = (rng.standard_normal((rows, 32 * blocks)) * np.exp(rng.standard_normal(32 * blocks))).astype(dtype)
    x[7, 32:64] = 0  # a zero block
    x[9, 70] = np.nan  # a NaN block (spread over all blocks by a dense R_inter)
    r_inter = np.ones((1, 1), np.float32) if groups == 1 else np.linalg.qr(rng.standard_normal((groups, groups)))[0].astype(np.float32)
    r_intra = (rng.standard_normal((blocks, 32, 32) if per_block else (32, 32)) / np.sqrt(32)).astype(np.float32)
    return Case(x, r_inter, r_intra, quantize)


def invoke(exe: Path, cases: list[Case]) -> subprocess.CompletedProcess:
    """The harness run on one node's calls, in order, on one state (cases of one shape)."""
    first = cases[0]
    assert all(c.x.shape == first.x.shape and c.x.dtype == first.x.dtype and c.r_inter.shape == first.r_inter.shape
               and c.r_intra.shape == first.r_intra.shape and c.quantize == first.quantize for c in cases)
    args = [first.x.shape[0], first.x.shape[1] // 32, first.r_inter.shape[0], int(first.r_intra.ndim == 3),
            int(first.x.dtype == np.float16), int(first.quantize), repr(F.bump_threshold("floor")), len(cases)]
    data = b"".join(c.x.tobytes() + c.r_inter.tobytes() + c.r_intra.tobytes() for c in cases)
    return subprocess.run([str(exe), *map(str, args)], input=data, capture_output=True, timeout=300)


def emulate(exe: Path, cases: list[Case]) -> tuple[list[np.ndarray], str]:
    """Each case's y from one harness run, and the harness's report."""
    res = invoke(exe, cases)
    report = res.stderr.decode()
    assert res.returncode == 0, report[-3000:]
    out = np.frombuffer(res.stdout, dtype=cases[0].x.dtype)
    assert out.size == len(cases) * cases[0].x.size
    return list(out.reshape(len(cases), *cases[0].x.shape)), report


CASES = {  # (dtype, groups, per-block R_intra, TorqRotateQuantize): every branch of the host function
    "f32 identity-inter shared": (np.float32, 1, False, True),
    "f32 dense-inter per-block": (np.float32, 5, True, True),
    "f32 two-group-inter rotate": (np.float32, 2, False, False),
    "f32 identity-inter per-block rotate": (np.float32, 1, True, False),
    "f16 identity-inter shared": (np.float16, 1, False, True),
    "f16 dense-inter shared": (np.float16, 5, False, True),
    "f16 identity-inter per-block rotate": (np.float16, 1, True, False),
    "f16 two-group-inter per-block": (np.float16, 2, True, True),
}


def host_waits(report: str) -> list[int]:
    """The host's waits for the device inside each call, from the harness's report."""
    return [int(n) for n in re.findall(r"call \d+ host-waits (\d+)", report)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_path_is_bit_identical_to_the_cpu_library(library, harness, name):
    """Two calls on one node's state (the second finds R_inter's device copy): both give the
    CPU library's bits, the host waits for the device only for the node's first copy of a
    non-identity R_inter, and no device memory is left once the state is freed."""
    dtype, groups, per_block, quantize = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    first = make_case(rng, dtype, groups, per_block, quantize)
    second = Case(make_case(rng, dtype).x, first.r_inter, first.r_intra, quantize)
    got, report = emulate(harness, [first, second])
    for case, y in zip((first, second), got):
        assert same(y, run(case.model, library, case.x))
    assert host_waits(report) == [int(groups > 1), 0]
    assert "device-allocations-left 0" in report


@pytest.mark.parametrize("quantize", [True, False])
def test_launches_split_at_the_grid_limit_cover_every_row(library, tmp_path, quantize):
    """With the grid's y limit lowered to one row tile, 300 rows of the `thread` kernel take
    three launches (the row offsets of every chunk, a partial last one) and still give the
    CPU library's bits."""
    exe = build(tmp_path / "library_harness", "thread", max_grid_y=1)
    case = make_case(np.random.default_rng(20), groups=5, quantize=quantize, rows=300)
    [y], report = emulate(exe, [case])
    assert same(y, run(case.model, library, case.x))
    assert "launches 4 " in report  # the group mix and three chunks


def test_a_changed_r_inter_is_used_not_the_cached_copy(library, harness):
    """R_inter fed as a graph input may change between calls: the second call's values go
    through the call's own scratch copy (the node's device copy stays as other calls may be
    reading it), and each call gives the CPU library's bits for its own R_inter."""
    rng = np.random.default_rng(21)
    first = make_case(rng, groups=5, per_block=True)
    second = make_case(rng, groups=5, per_block=True)
    third = Case(make_case(rng).x, first.r_inter, first.r_intra)  # back to the cached values
    got, report = emulate(harness, [first, second, third])
    for case, y in zip((first, second, third), got):
        assert same(y, run(case.model, library, case.x))
    assert host_waits(report) == [1, 0, 0]  # the changed values go by an asynchronous copy
    assert "device-allocations-left 0" in report


@pytest.mark.parametrize(("groups", "blocks"), [(2, 5), (10, 5), (40, 5), (160, 5), (72, 72)])
def test_group_mix_tiles_cover_every_shape(library, harness, groups, blocks):
    """The group-mixing kernel's tiles: on a 160-wide hidden axis 2 groups of 80 (a warp's
    columns span two tokens), 10 of 16, 40 (a staged tile of 32 h and a partial one of 8;
    one CTA of 64 rows, 24 of them idle) and 160 of width 1 (five tiles of h, three CTAs of
    rows, the last half empty); and an exported torq site's form, [B, B] for B = 72 blocks
    (two CTAs of rows, three tiles of h). 37 tokens, so the last CTA of columns is partial.
    TorqRotate, so that the mixed values reach the output unquantized: each is the CPU
    library's, bit for bit (a sum in another order or one unfused multiply-add fails this)."""
    case = make_case(np.random.default_rng(30 + groups), groups=groups, per_block=True, quantize=False, rows=37, blocks=blocks)
    [y], _ = emulate(harness, [case])
    assert same(y, run(case.model, library, case.x))


@pytest.mark.skipif(NO_TSAN is not None, reason=str(NO_TSAN))
def test_host_function_runs_race_free(library, tmp_path):
    """The host function under ThreadSanitizer (each CUDA thread a real thread): 40 groups
    (two tiles of h in the group-mixing kernel) run race-free and bit-identical to the CPU
    library. (That the checker catches a missing barrier of the kernel is
    test_cuda_emulated's test_race_checker_reports_a_missing_barrier.)"""
    exe = build(tmp_path / "library_harness", "thread", sanitize=TSAN)
    case = make_case(np.random.default_rng(31), groups=40, rows=40)
    [y], _ = emulate(exe, [case])
    assert same(y, run(case.model, library, case.x))


# Bugs the emulation must catch, each as (the line in ort_custom_ops_cuda.cu, its mutation,
# the message that reports it).
MUTATIONS = {
    "host R_inter handed to the kernel": (
        "(src, r_dev, xf, columns,", "(src, r_inter, xf, columns,", "a kernel argument points to host memory"),
    "a kernel launched on another stream": (
        "TORQ_LAUNCH(torq_group_mix, grid, TORQ_MIX_WARPS * 32, stream)", "TORQ_LAUNCH(torq_group_mix, grid, TORQ_MIX_WARPS * 32, nullptr)",
        "enqueued on a stream other than the op's"),
    "scratch sized short": ("    if (s.half) l.y = take(total);\n", "    if (s.half) l.y = take(total / 2);\n", "heap-buffer-overflow"),
    "y's float32 view left unconverted": (
        "    if (shape->half) TORQ_LAUNCH(torq_float_to_half,", "    if (false) TORQ_LAUNCH(torq_float_to_half,", None),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_emulation_catches_a_broken_host_function(library, tmp_path, mutation):
    """The checks above can fail: each mutation of the host function is reported by the
    emulated runtime or AddressSanitizer, or (None) gives output that differs from the CPU
    library's."""
    line, mutated, message = MUTATIONS[mutation]
    exe = build(tmp_path / "library_harness", "thread", source_dir=mutated_source(tmp_path, line, mutated))
    case = make_case(np.random.default_rng(22), np.float16, groups=5)
    if message is None:
        [y], _ = emulate(exe, [case])
        assert not same(y, run(case.model, library, case.x))
        return
    res = invoke(exe, [case])
    assert res.returncode != 0 and message in res.stderr.decode(), res.stderr.decode()[-3000:]
