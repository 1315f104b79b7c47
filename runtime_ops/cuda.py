"""CUDA path: cuBLAS rotations (CuPy) + a fused MXFP4 quantize RawKernel, on device memory.

CuPy is imported lazily; :func:`available` is False without a GPU, CuPy or a driver.
Status: the ORT graph integration (running these kernels *inside* an ORT CUDA session) is
not built; :func:`rotate_quantize` works on CuPy arrays (e.g. ORT outputs bound with
IOBinding), with no host round-trip.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from torq_onnx.runtime_ops.functions import bump_threshold

_KERNEL_SRC = Path(__file__).with_name("mxfp4_quant.cu")
WARPS_PER_CTA = 8


def available() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def _kernel():
    import cupy as cp

    # mxfp4_math.cuh (the host-tested per-block arithmetic) is included from beside the kernel
    return cp.RawKernel(_KERNEL_SRC.read_text(), "mxfp4_fake_quant", options=("--std=c++14", f"-I{_KERNEL_SRC.parent}"))


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


def rotate(x, r_inter, r_intra):
    """float32 ``R_inter @ X @ R_intra`` on the GPU (x: CuPy [..., D]; r_intra [32, 32] or [B, 32, 32])."""
    import cupy as cp

    xf = cp.asarray(x, dtype=cp.float32)
    b = xf.shape[-1] // 32
    blocks = xf.reshape(-1, b, 32)
    z = cp.matmul(cp.asarray(r_inter, dtype=cp.float32), blocks)
    r_intra = cp.asarray(r_intra, dtype=cp.float32)
    if r_intra.ndim == 3:  # one transform per block (WUSH): [N, B, 1, 32] @ [B, 32, 32]
        return cp.matmul(z[..., None, :], r_intra)[..., 0, :].reshape(xf.shape)
    return cp.matmul(z, r_intra).reshape(xf.shape)


def rotate_quantize(x, r_inter, r_intra, scale_rule: str = "floor"):
    """The TorqRotateQuantize op on device memory; returns a CuPy array of x's dtype."""
    import cupy as cp

    x = cp.asarray(x)
    return fake_quant_rows(rotate(x, r_inter, r_intra), scale_rule).astype(x.dtype, copy=False)


def benchmark(x: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray, repeat: int = 20) -> tuple[float, float, float]:
    """(seconds per op, achieved GB/s of read+write of x, device-to-device copy GB/s)."""
    import cupy as cp

    xd = cp.asarray(x, dtype=cp.float32)
    ri, rk = cp.asarray(r_inter, cp.float32), cp.asarray(r_intra, cp.float32)
    out = cp.empty_like(xd)

    def timed(fn) -> float:
        fn()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / repeat

    t_op = timed(lambda: rotate_quantize(xd, ri, rk))
    t_copy = timed(lambda: cp.copyto(out, xd))
    nbytes = 2 * xd.nbytes
    return t_op, nbytes / t_op / 1e9, nbytes / t_copy / 1e9
