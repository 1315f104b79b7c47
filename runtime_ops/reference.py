"""Numpy reference semantics of the torq ops: the ground truth for every fast path."""

from __future__ import annotations

import numpy as np

from torq_onnx import mxfp4
from torq_onnx.torq import apply_rotation


def rotate_f32(x: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray) -> np.ndarray:
    """The op's rotation, in float32 like every implementation of the op."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return apply_rotation(f32(x), f32(r_inter), f32(r_intra))


def quantize_rotated(z: np.ndarray, out_dtype: np.dtype, scale_rule: mxfp4.ScaleRule = "floor") -> np.ndarray:
    """MXFP4 fake-quant of already-rotated float32 values, cast to the op's output dtype.

    float32 results saturate at FLT_MAX (mxfp4's rule); a float16 output is a plain cast of
    the float32 result, so magnitudes beyond float16's range become ±inf like any overflow.
    """
    return mxfp4.fake_quantize(np.asarray(z, dtype=np.float32), scale_rule=scale_rule).astype(out_dtype)


def rotate_quantize(x: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor") -> np.ndarray:
    """Reference ``TorqRotateQuantize``. The rotation is a float32 GEMM, so fast paths are
    bit-exact against :func:`quantize_rotated` of *their own* rotated values and agree with
    this function up to GEMM summation order."""
    x = np.asarray(x)
    return quantize_rotated(rotate_f32(x, r_inter, r_intra), x.dtype, scale_rule)


def dequantize_weight(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference ``TorqDequantizeMXFP4``: codes packed along axis 0, scales [D/32, N]."""
    q = mxfp4.MXFP4Tensor(codes=mxfp4.unpack(packed, axis=0), scale_codes=np.asarray(scales, np.uint8), axis=0)
    return mxfp4.dequantize(q, np.float32)


def quantize_weight(w: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor") -> tuple[np.ndarray, np.ndarray]:
    """Pack a MatMul weight [D, N] to (packed uint8 [D/2, N], scales uint8 [D/32, N])."""
    q = mxfp4.quantize(w, axis=0, scale_rule=scale_rule)
    return mxfp4.pack(q.codes, axis=0), q.scale_codes
