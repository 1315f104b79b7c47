"""CUDA path of the online op, on device memory: a fused rotate-and-quantize kernel.

``R_intra`` (shared or per block) and the MXFP4 quantizer run in one pass over the tensor
(``torq_block_rotate_quant``: x read once, y written once); a non-identity ``R_inter`` is one
batched cuBLAS GEMM before it. CuPy is imported lazily; :func:`available` is False without a
GPU, CuPy or a driver. :class:`RotateQuantizer` keeps one op's matrices on the device; the
split runner (:mod:`torq_onnx.runtime_ops.split_runner`) calls it between ORT segments.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

from torq_onnx.runtime_ops.functions import bump_threshold

_KERNEL_SRC = Path(__file__).with_name("mxfp4_quant.cu")
WARPS_PER_CTA = 8
ROWS_PER_CTA = 128  # torq_block_rotate_quant's __launch_bounds__
MAX_GRID_Y = 65535


def available() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    """The kernels compiled with NVRTC for this GPU's architecture, loaded as a RawModule.

    NVRTC is called directly rather than through ``cp.RawModule(code=...)`` because CuPy
    appends ``-ftz=true`` to every compilation, and flushing subnormals to zero breaks the
    bit-exact contract (blocks with the minimum E8M0 scale 2^-127 quantize to subnormals).
    """
    import cupy as cp
    from cupy.cuda import nvrtc

    major, minor = cp.cuda.Device(device_id).compute_capability
    prog = nvrtc.createProgram(_KERNEL_SRC.read_text(), _KERNEL_SRC.name, (), ())
    options = ("--std=c++14", "-ftz=false", "--prec-div=true", "--prec-sqrt=true", f"-I{_KERNEL_SRC.parent}",
               f"--gpu-architecture=sm_{major}{minor}")
    try:
        nvrtc.compileProgram(prog, options)
        cubin = nvrtc.getCUBIN(prog)
    except nvrtc.NVRTCError as exc:
        raise RuntimeError(f"NVRTC could not compile {_KERNEL_SRC.name}: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
    finally:
        nvrtc.destroyProgram(prog)
    cache = Path(tempfile.mkdtemp(prefix="torq_cuda_")) / f"mxfp4_quant_sm{major}{minor}.cubin"
    cache.write_bytes(cubin)
    return cp.RawModule(path=str(cache))


def _kernel(name: str = "mxfp4_fake_quant"):
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
    grid = ((n_blocks + WARPS_PER_CTA - 1) // WARPS_PER_CTA,)
    _kernel()(grid, (32 * WARPS_PER_CTA,), (z, y, np.int64(n_blocks), np.float32(bump_threshold(scale_rule))))
    return y


def block_rotate_quantize(x, r_intra, scale_rule: str = "floor", rotated_out=None):
    """``MXFP4(blocks(x) @ R_intra)`` in one kernel; x: contiguous float32 CuPy [..., D],
    r_intra: float32 CuPy [32, 32] (shared) or [D/32, 32, 32] (per block). ``rotated_out``
    (a float32 CuPy array like x) also receives the rotated values before quantization."""
    import cupy as cp

    if x.dtype != cp.float32 or not x.flags.c_contiguous or x.shape[-1] % 32:
        raise ValueError(f"x must be contiguous float32 [..., D] with D % 32 == 0, got {x.dtype} {x.shape}")
    n_blocks = x.shape[-1] // 32
    if r_intra.shape not in ((32, 32), (n_blocks, 32, 32)) or r_intra.dtype != cp.float32 or not r_intra.flags.c_contiguous:
        raise ValueError(f"r_intra must be contiguous float32 [32, 32] or [{n_blocks}, 32, 32], got {r_intra.dtype} {r_intra.shape}")
    y = cp.empty_like(x)
    rows = x.size // x.shape[-1]
    kernel, bump = _kernel("torq_block_rotate_quant"), np.float32(bump_threshold(scale_rule))
    x2, y2 = x.reshape(rows, -1), y.reshape(rows, -1)
    z2 = rotated_out.reshape(rows, -1) if rotated_out is not None else None
    chunk = MAX_GRID_Y * ROWS_PER_CTA  # grid.y (row tiles) is limited to 65535
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        grid = (n_blocks, (n + ROWS_PER_CTA - 1) // ROWS_PER_CTA)
        kernel(grid, (ROWS_PER_CTA,), (x2[r0:], r_intra, y2[r0:], z2[r0:] if z2 is not None else 0, np.int64(n),
                                       np.int32(n_blocks), np.int64(1024 if r_intra.ndim == 3 else 0), bump))
    return y


class RotateQuantizer:
    """One TorqRotateQuantize op with its matrices on the GPU: ``y = MXFP4(R_inter X R_intra)``
    per token. An identity ``R_inter`` (wush, brq) is skipped; any other is one batched GEMM."""

    def __init__(self, r_inter: np.ndarray, r_intra: np.ndarray, scale_rule: str = "floor") -> None:
        import cupy as cp

        r_inter = np.asarray(r_inter, np.float32)
        self.r_inter = None if np.array_equal(r_inter, np.eye(r_inter.shape[0], dtype=np.float32)) else cp.asarray(r_inter)
        self.r_intra = cp.ascontiguousarray(cp.asarray(r_intra, dtype=cp.float32))
        self.scale_rule = scale_rule

    def __call__(self, x, rotated_out=None):
        """x: CuPy [..., D] of any float dtype; returns MXFP4 values in x's dtype."""
        import cupy as cp

        xf = cp.ascontiguousarray(x, dtype=cp.float32)
        if self.r_inter is not None:
            blocks = xf.reshape(-1, self.r_inter.shape[0], 32)
            xf = cp.matmul(self.r_inter, blocks).reshape(xf.shape)
        y = block_rotate_quantize(xf, self.r_intra, self.scale_rule, rotated_out)
        return y.astype(x.dtype, copy=False)


def rotate_quantize(x, r_inter, r_intra, scale_rule: str = "floor"):
    """The TorqRotateQuantize op on device memory; returns a CuPy array of x's dtype."""
    import cupy as cp

    return RotateQuantizer(r_inter, r_intra, scale_rule)(cp.asarray(x))
