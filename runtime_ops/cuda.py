"""CUDA path of the online op, on device memory: a fused rotate-and-quantize kernel.

``R_intra`` (shared or per block) and the MXFP4 quantizer run in one pass over the tensor
(``torq_block_rotate_quant``: x read once, y written once); a non-identity ``R_inter`` is
mixed before it, by one batched cuBLAS GEMM or by the group-mixing kernel the compiled
library runs (:data:`MIX_ROUTES`). CuPy is imported lazily; :func:`available` is False
without a GPU, CuPy or a driver. :class:`RotateQuantizer` keeps one op's matrices on the device; the
split runner (:mod:`torq_onnx.runtime_ops.split_runner`) calls it between ORT segments.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torq_onnx.runtime_ops.functions import bump_threshold

_KERNEL_SRC = Path(__file__).with_name("mxfp4_quant.cu")
WARPS_PER_CTA = 8  # mxfp4_fake_quant: one block per warp
MAX_GRID_Y = 65535
# The floating-point options of every GPU build (NVRTC here, nvcc for the ORT library; both
# compilers spell them alike), so device code computes exactly the IEEE operations its source
# writes, as the host tests run them: no flush-to-zero (blocks with the minimum E8M0 scale
# 2^-127 quantize to subnormals), correctly rounded division and square root, and no
# multiply-add contraction (a fused multiply-add only where the source calls fmaf; the host
# builds pass -ffp-contract=off for the same reason). tests/test_cuda_exact_math.py checks
# the machine code for it.
IEEE_FLAGS = ("--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false")


@dataclass(frozen=True)
class RotateKernel:
    """A kernel of the fused op and the launch shape its source assumes."""

    name: str
    threads: int  # per CTA (the kernel's __launch_bounds__)
    blocks_per_cta: int  # MX blocks one CTA covers: grid.x = ceil(n_blocks / blocks_per_cta)
    rows_per_cta: int  # rows one CTA covers: grid.y = ceil(rows / rows_per_cta)


ROTATE_KERNELS = {
    # a thread per (row, block); verified bit-exact on an H100
    "thread": RotateKernel("torq_block_rotate_quant", 128, 1, 128),
    # a warp per (row, block), coalesced; verified on the host emulator only (tests/simt)
    "warp": RotateKernel("torq_block_rotate_quant_warp", 256, 8, 128),  # TORQ_W_WARPS, TORQ_W_ROWS
}
DEFAULT_ROTATE_KERNEL = "thread"


# How a non-identity R_inter is applied. "cublas": cupy.matmul's batched GEMM (cuBLAS picks
# the summation order; TF32 where the process set CUPY_TF32=1). "fmaf": torq_group_mix, the
# compiled library's kernel: each output the fmaf chain in h order that the CPU library
# computes, so a split run gives the library's bits on either device, whatever CUPY_TF32 says.
MIX_ROUTES = ("cublas", "fmaf")
DEFAULT_MIX_ROUTE = "cublas"  # measured on an H100 (README); "fmaf" has run on the host emulator only
MIX_KERNEL = "torq_group_mix"
MIX_WARPS = 8  # TORQ_MIX_WARPS: warps of a CTA
MIX_ROWS = 8  # TORQ_MIX_ROWS: rows g of R_inter each warp sums


def mix_route(name: str) -> str:
    """``name`` if it is one of :data:`MIX_ROUTES`, else a ValueError naming the choices."""
    if name not in MIX_ROUTES:
        raise ValueError(f"unknown mix route {name!r}; choose from {list(MIX_ROUTES)}")
    return name


def group_mix_launch(rows: int, groups: int, width: int) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of torq_group_mix over ``rows`` tokens viewed as [groups, width]: a CTA
    covers 32 (token, k) columns and MIX_WARPS x MIX_ROWS rows of R_inter."""
    row_tiles = -(-groups // (MIX_WARPS * MIX_ROWS))
    if row_tiles > MAX_GRID_Y:
        raise ValueError(f"R_inter has {groups} groups, too many for the group-mixing kernel's grid")
    return (-(-rows * width // 32), row_tiles), (MIX_WARPS * 32,)


def rotate_kernel(name: str) -> RotateKernel:
    """The :data:`ROTATE_KERNELS` entry called ``name``, or a ValueError naming the choices."""
    if name not in ROTATE_KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {sorted(ROTATE_KERNELS)}")
    return ROTATE_KERNELS[name]


def fake_quant_grid(n_blocks: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) of mxfp4_fake_quant for n_blocks blocks of 32."""
    return ((n_blocks + WARPS_PER_CTA - 1) // WARPS_PER_CTA,), (32 * WARPS_PER_CTA,)


def rotate_launches(kernel: RotateKernel, rows: int, n_blocks: int) -> list[tuple[int, int, tuple[int, int]]]:
    """(first row, row count, grid) of each launch over ``rows`` rows: grid.y (row tiles) is
    limited to 65535, so very long inputs take several launches."""
    chunk = MAX_GRID_Y * kernel.rows_per_cta
    grid_x = (n_blocks + kernel.blocks_per_cta - 1) // kernel.blocks_per_cta
    return [(r0, min(chunk, rows - r0), (grid_x, (min(chunk, rows - r0) + kernel.rows_per_cta - 1) // kernel.rows_per_cta))
            for r0 in range(0, rows, chunk)]


def available() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """The NVRTC options the kernels are built with, for ``arch`` such as ``"sm_90"``.

    :data:`IEEE_FLAGS`; NVRTC is called directly because CuPy appends ``-ftz=true`` to every
    compilation it makes itself. ``arch`` may also be a virtual one (``"compute_90"``: PTX)."""
    return ("--std=c++14", *IEEE_FLAGS, f"-I{_KERNEL_SRC.parent}", f"--gpu-architecture={arch}")


def compile_cubin(arch: str, nvrtc, source: Path = _KERNEL_SRC) -> tuple[bytes, str]:
    """(cubin, NVRTC's log) of the kernels (mxfp4_quant.cu) for ``arch``. ``nvrtc`` is CuPy's
    ``cupy.cuda.nvrtc`` at run time, or any module with its ``createProgram``,
    ``compileProgram``, ``getCUBIN``, ``getPTX``, ``getProgramLog``, ``destroyProgram`` and
    ``NVRTCError`` (the tests bind libnvrtc with ctypes, which needs no GPU)."""
    return _compile(arch, nvrtc, source, nvrtc.getCUBIN)


def compile_ptx(arch: str, nvrtc, source: Path = _KERNEL_SRC) -> tuple[bytes, str]:
    """(PTX, NVRTC's log) of the same build for a virtual ``arch`` such as ``"compute_90"``:
    the code NVRTC hands to ptxas, which the tests read."""
    return _compile(arch, nvrtc, source, nvrtc.getPTX)


def _compile(arch: str, nvrtc, source: Path, result) -> tuple[bytes, str]:
    prog = nvrtc.createProgram(source.read_text(), source.name, (), ())
    try:
        nvrtc.compileProgram(prog, nvrtc_options(arch))
        return result(prog), nvrtc.getProgramLog(prog)
    except nvrtc.NVRTCError as exc:
        raise RuntimeError(f"NVRTC could not compile {source.name}: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
    finally:
        nvrtc.destroyProgram(prog)


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    """The kernels compiled with NVRTC for this GPU's architecture, loaded as a RawModule."""
    import cupy as cp
    from cupy.cuda import nvrtc

    major, minor = cp.cuda.Device(device_id).compute_capability
    cubin, _ = compile_cubin(f"sm_{major}{minor}", nvrtc)
    cache = Path(tempfile.mkdtemp(prefix="torq_cuda_")) / f"mxfp4_quant_sm{major}{minor}.cubin"
    cache.write_bytes(cubin)
    return cp.RawModule(path=str(cache))


def _kernel(name: str):
    import cupy as cp

    return _module(cp.cuda.Device().id).get_function(name)


def fake_quant_rows(z, scale_rule: str = "floor"):
    """MXFP4 fake-quant of a contiguous float32 CuPy array along its last axis (size % 32 == 0)."""
    import cupy as cp

    z = cp.ascontiguousarray(z, dtype=cp.float32)
    if z.shape[-1] % 32:
        raise ValueError(f"last axis {z.shape[-1]} is not a multiple of 32")
    y = cp.empty_like(z)
    n_blocks = z.size // 32
    _kernel("mxfp4_fake_quant")(*fake_quant_grid(n_blocks), (z, y, np.int64(n_blocks), np.float32(bump_threshold(scale_rule))))
    return y


def block_rotate_quantize(x, r_intra, scale_rule: str = "floor", rotated_out=None, kernel: str = DEFAULT_ROTATE_KERNEL):
    """``MXFP4(blocks(x) @ R_intra)`` in one kernel; x: contiguous float32 CuPy [..., D],
    r_intra: float32 CuPy [32, 32] (shared) or [D/32, 32, 32] (per block). ``rotated_out``
    (a float32 CuPy array like x) also receives the rotated values before quantization.
    ``kernel``: a key of :data:`ROTATE_KERNELS` (both give bit-identical results)."""
    import cupy as cp

    if x.dtype != cp.float32 or not x.flags.c_contiguous or x.shape[-1] % 32:
        raise ValueError(f"x must be contiguous float32 [..., D] with D % 32 == 0, got {x.dtype} {x.shape}")
    n_blocks = x.shape[-1] // 32
    if r_intra.shape not in ((32, 32), (n_blocks, 32, 32)) or r_intra.dtype != cp.float32 or not r_intra.flags.c_contiguous:
        raise ValueError(f"r_intra must be contiguous float32 [32, 32] or [{n_blocks}, 32, 32], got {r_intra.dtype} {r_intra.shape}")
    spec = rotate_kernel(kernel)
    y = cp.empty_like(x)
    rows = x.size // x.shape[-1]
    fn, bump = _kernel(spec.name), np.float32(bump_threshold(scale_rule))
    x2, y2 = x.reshape(rows, -1), y.reshape(rows, -1)
    z2 = rotated_out.reshape(rows, -1) if rotated_out is not None else None
    for r0, n, grid in rotate_launches(spec, rows, n_blocks):
        fn(grid, (spec.threads,), (x2[r0:], r_intra, y2[r0:], z2[r0:] if z2 is not None else 0, np.int64(n),
                                   np.int32(n_blocks), np.int64(1024 if r_intra.ndim == 3 else 0), bump))
    return y


def group_mix(x, r_inter):
    """``R_inter X`` per token with the token viewed as [G, D/G] (G = r_inter's size), by
    torq_group_mix; x: contiguous float32 CuPy [..., D], r_inter: contiguous float32 CuPy [G, G]."""
    import cupy as cp

    g = r_inter.shape[0]
    if x.dtype != cp.float32 or not x.flags.c_contiguous or x.shape[-1] % g:
        raise ValueError(f"x must be contiguous float32 [..., D] with D % {g} == 0, got {x.dtype} {x.shape}")
    if r_inter.shape != (g, g) or r_inter.dtype != cp.float32 or not r_inter.flags.c_contiguous:
        raise ValueError(f"r_inter must be contiguous float32 [G, G], got {r_inter.dtype} {r_inter.shape}")
    out = cp.empty_like(x)
    rows, width = x.size // x.shape[-1], x.shape[-1] // g
    if rows:
        grid, block = group_mix_launch(rows, g, width)
        _kernel(MIX_KERNEL)(grid, block, (x, r_inter, out, np.int64(rows * width), np.int64(g), np.int64(width)))
    return out


class RotateQuantizer:
    """One TorqRotateQuantize op with its matrices on the GPU: ``y = MXFP4(R_inter X R_intra)``
    per token. An identity ``R_inter`` ([[1]] as exported for wush and brq, or eye(B)) is
    skipped; any other [G, G] mixes the G groups of each token by the ``mix`` route (a key
    of :data:`MIX_ROUTES`)."""

    def __init__(self, r_inter: np.ndarray, r_intra: np.ndarray, scale_rule: str = "floor",
                 kernel: str = DEFAULT_ROTATE_KERNEL, mix: str = DEFAULT_MIX_ROUTE) -> None:
        import cupy as cp

        rotate_kernel(kernel)  # fail at construction, not at the first call
        mix_route(mix)
        r_inter = np.asarray(r_inter, np.float32)
        self.r_inter = None if np.array_equal(r_inter, np.eye(r_inter.shape[0], dtype=np.float32)) else cp.asarray(r_inter)
        self.r_intra = cp.ascontiguousarray(cp.asarray(r_intra, dtype=cp.float32))
        self.scale_rule = scale_rule
        self.kernel, self.mix = kernel, mix

    def __call__(self, x, rotated_out=None):
        """x: CuPy [..., D] of any float dtype; returns MXFP4 values in x's dtype."""
        import cupy as cp

        xf = self.mixed(cp.ascontiguousarray(x, dtype=cp.float32))
        y = block_rotate_quantize(xf, self.r_intra, self.scale_rule, rotated_out, self.kernel)
        return y.astype(x.dtype, copy=False)

    def mixed(self, xf):
        """``R_inter X`` per token for xf, contiguous float32 CuPy [..., D], by the mix route
        (xf itself for an identity R_inter)."""
        import cupy as cp

        if self.r_inter is None:
            return xf
        if self.mix == "fmaf":
            return group_mix(xf, self.r_inter)
        g = self.r_inter.shape[0]
        return cp.matmul(self.r_inter, xf.reshape(-1, g, xf.shape[-1] // g)).reshape(xf.shape)


def rotate_quantize(x, r_inter, r_intra, scale_rule: str = "floor", kernel: str = DEFAULT_ROTATE_KERNEL,
                    mix: str = DEFAULT_MIX_ROUTE):
    """The TorqRotateQuantize op on device memory; returns a CuPy array of x's dtype."""
    import cupy as cp

    return RotateQuantizer(r_inter, r_intra, scale_rule, kernel, mix)(cp.asarray(x))
