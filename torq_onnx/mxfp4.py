"""MXFP4 (OCP Microscaling Formats v1.0) reference implementation in numpy.

This module is the ground truth that every fast path (ONNX function, CuPy kernel) is
tested against bit-for-bit.

Format: blocks of ``BLOCK_SIZE = 32`` consecutive values along one axis share one E8M0
scale ``2**e`` (``e`` an integer in ``[-127, 127]``, stored biased by 127 in a uint8).
Each element is an FP4 E2M1 code: sign bit (bit 3) and a 3-bit magnitude index into
``FP4_MAGNITUDES = (0, .5, 1, 1.5, 2, 3, 4, 6)``.

Rules (documented because the spec leaves some of them to the implementation):

* Scale exponent, per block, from ``amax = max |x|``; ``floor(log2 amax)`` is computed
  exactly with ``frexp`` (no floating-point log):

  - ``"floor"`` (default, the OCP v1.0 reference): ``e = floor(log2 amax) - 2``. Scaled
    values lie in ``[4, 8)``; magnitudes in ``(6, 8)`` saturate to 6.
  - ``"even"``: like floor, but ``e`` is bumped by one when amax's mantissa rounds up to
    2 at one mantissa bit (``amax / 2**floor(log2 amax) >= 1.75``); clips only ``(6, 7)``.
  - ``"rceil"``: ``e = ceil(log2(amax / 6))``, the smallest scale that never clips.

  ``e`` is clamped to E8M0's finite range ``[-127, 127]``.
* Elements: ``x / 2**e`` (exact, a power-of-two scaling computed in float64) rounds to
  the nearest E2M1 value, ties to the even code (the code whose mantissa bit is 0), and
  saturates at ±6.
* Zero blocks: amax == 0 gives exponent ``-127`` and all-zero codes; they dequantize to
  exactly 0 (signed zeros are not preserved: -0.0 becomes +0.0).
* NaN / Inf: FP4 has neither. A block with any NaN or ±Inf gets the E8M0 NaN encoding
  (``0xFF``) and all-zero element codes; it dequantizes to NaN in every element (OCP:
  "if the scale is NaN, every element of the block is NaN").
* Output dtype of :func:`fake_quantize`: the input's float dtype. The dequantized value
  is exact in float32 and float64; for float16 it is rounded to nearest-even, so values
  below float16's subnormal range flush to zero. Magnitudes above the dtype's largest
  finite value (possible with the "even"/"rceil" rules next to FLT_MAX, where an element
  rounds up to ``8 * 2**126 = 2**129``) saturate to that largest finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

BLOCK_SIZE = 32
FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
FP4_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 binade (4 <= 6 < 8)
E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
E8M0_NAN = 0xFF

ScaleRule = Literal["floor", "even", "rceil"]
SCALE_RULES: tuple[str, ...] = ("floor", "even", "rceil")

# Bin edges between consecutive magnitude codes, and whether a value exactly on the
# edge rounds up (ties-to-even: it goes to the code whose mantissa bit is 0).
_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)
BIN_EDGES = np.array(_EDGES, dtype=np.float64)


@dataclass(frozen=True)
class MXFP4Tensor:
    """MXFP4 data of a tensor quantized along ``axis``.

    ``codes``: uint8, same shape as the source tensor, one FP4 code (0..15) per element.
    ``scale_codes``: uint8 biased E8M0 exponents, the source shape with ``axis`` divided
    by 32. ``axis`` is normalized (non-negative).
    """

    codes: np.ndarray
    scale_codes: np.ndarray
    axis: int


def check_block_axis(shape: tuple[int, ...], axis: int) -> int:
    """Return the normalized axis; raise a clear ValueError if it can't hold MX blocks."""
    if len(shape) == 0:
        raise ValueError("MXFP4 needs at least a 1-D tensor, got a scalar")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(shape)}")
    axis %= len(shape)
    size = shape[axis]
    if size % BLOCK_SIZE != 0 or size == 0:
        raise ValueError(
            f"MXFP4 blocks are {BLOCK_SIZE} wide: the quantized axis has size {size}, "
            f"which is not a positive multiple of {BLOCK_SIZE} (tensor shape {tuple(shape)})"
        )
    return axis


def _check_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {scale_rule!r}; choose one of {SCALE_RULES}")


def _to_blocks(x: np.ndarray, axis: int) -> np.ndarray:
    """View ``x`` as [..., n_blocks, 32] with the block axis last (float64 copy)."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def _from_blocks(blocks: np.ndarray, axis: int) -> np.ndarray:
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK_SIZE)
    return np.moveaxis(flat, -1, axis)


def floor_log2(a: np.ndarray) -> np.ndarray:
    """Exact ``floor(log2(a))`` for finite positive ``a`` (int64); 0 maps to a huge negative."""
    _, ex = np.frexp(a)  # a = m * 2**ex, m in [0.5, 1)
    return ex.astype(np.int64) - 1


def shared_exponent(amax: np.ndarray, scale_rule: ScaleRule = "floor") -> np.ndarray:
    """Unbiased, clamped E8M0 exponent per block from the block's finite amax (>= 0)."""
    _check_rule(scale_rule)
    amax = np.asarray(amax, dtype=np.float64)
    fl = floor_log2(np.where(amax > 0, amax, 1.0))
    e = fl - E2M1_EMAX
    if scale_rule != "floor":
        mant = np.ldexp(amax, -fl)  # in [1, 2), exact
        bump = mant > 1.5 if scale_rule == "rceil" else mant >= 1.75
        e = e + bump.astype(np.int64)
    e = np.where(amax > 0, e, E8M0_MIN_EXP)
    return np.clip(e, E8M0_MIN_EXP, E8M0_MAX_EXP)


def magnitude_codes(a: np.ndarray) -> np.ndarray:
    """E2M1 magnitude index (uint8, 0..7) of scaled magnitudes ``a >= 0``.

    Round to nearest, ties to the even code, saturating at 6 (index 7).
    """
    a = np.asarray(a)
    code = np.zeros(a.shape, dtype=np.uint8)
    for edge, up in zip(_EDGES, _TIE_ROUNDS_UP):
        code += (a >= edge) if up else (a > edge)
    return code


def _split_finite(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bad = ~np.isfinite(blocks).all(axis=-1)
    safe = np.where(bad[..., None], 0.0, blocks)
    return safe, bad


def encode(values: np.ndarray, e: np.ndarray) -> np.ndarray:
    """FP4 codes (uint8 0..15) of finite ``values`` under the power-of-two scales ``2**e``
    (``e`` broadcasts against ``values``): round half to even, saturate at ±6. This is the
    element rule of :func:`quantize`, for callers that choose the exponent themselves
    (scale search, GPTQ)."""
    scaled = np.ldexp(np.asarray(values, dtype=np.float64), -np.asarray(e, dtype=np.int64))
    return (magnitude_codes(np.abs(scaled)) | (np.signbit(scaled) & (scaled != 0)).astype(np.uint8) << 3).astype(np.uint8)


def decode(codes: np.ndarray, e: np.ndarray) -> np.ndarray:
    """float64 values of FP4 ``codes`` under the scales ``2**e`` (inverse of :func:`encode`)."""
    return np.ldexp(decode_fp4(codes), np.asarray(e, dtype=np.int64))


def quantize(x: np.ndarray, axis: int = -1, scale_rule: ScaleRule = "floor") -> MXFP4Tensor:
    """Quantize ``x`` to FP4 codes and biased E8M0 scale codes along ``axis``."""
    x = np.asarray(x)
    axis = check_block_axis(x.shape, axis)
    _check_rule(scale_rule)
    blocks, bad = _split_finite(_to_blocks(x, axis))
    e = shared_exponent(np.abs(blocks).max(axis=-1), scale_rule)
    return from_block_exponents(blocks, e, axis, bad)


def from_block_exponents(blocks: np.ndarray, e: np.ndarray, axis: int, bad: np.ndarray | None = None) -> MXFP4Tensor:
    """MXFP4 data of ``blocks`` [..., n_blocks, 32] (block axis last, finite) with the given
    unbiased exponents ``e`` [..., n_blocks]; ``bad`` marks NaN/Inf blocks (E8M0 NaN)."""
    bad = np.zeros(e.shape, dtype=bool) if bad is None else bad
    codes = np.where(bad[..., None], 0, encode(blocks, e[..., None])).astype(np.uint8)
    scale_codes = np.where(bad, E8M0_NAN, e + E8M0_BIAS).astype(np.uint8)
    return MXFP4Tensor(
        codes=_from_blocks(codes, axis),
        scale_codes=np.moveaxis(scale_codes, -1, axis),
        axis=axis,
    )


def decode_fp4(codes: np.ndarray) -> np.ndarray:
    """FP4 codes (0..15) to float64 element values (unscaled)."""
    codes = np.asarray(codes, dtype=np.uint8)
    mag = FP4_MAGNITUDES[codes & 0x7]
    return np.where(codes & 0x8, -mag, mag)


def dequantize(q: MXFP4Tensor, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Dequantize MXFP4 data to ``dtype``."""
    axis = q.axis
    values = _to_blocks(decode_fp4(q.codes), axis)
    sc = np.moveaxis(q.scale_codes, axis, -1).astype(np.int64)
    out = np.ldexp(values, (sc - E8M0_BIAS)[..., None])
    out = np.where((sc == E8M0_NAN)[..., None], np.nan, out)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        limit = float(np.finfo(dtype).max)
        out = np.clip(out, -limit, limit)  # NaN passes through clip unchanged
    return _from_blocks(out, axis).astype(dtype)


def fake_quantize(x: np.ndarray, axis: int = -1, scale_rule: ScaleRule = "floor") -> np.ndarray:
    """Quantize-dequantize ``x`` (MXFP4 along ``axis``), returned in ``x``'s float dtype."""
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    return dequantize(quantize(x, axis, scale_rule), dtype=dtype)


def pack(codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pack two FP4 codes per byte along ``axis``: element 2i in the low nibble, 2i+1 high."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[axis] % 2:
        raise ValueError(f"pack needs an even size along axis {axis}, got {codes.shape[axis]}")
    moved = np.moveaxis(codes, axis, -1)
    packed = (moved[..., 0::2] & 0xF) | ((moved[..., 1::2] & 0xF) << 4)
    return np.moveaxis(packed.astype(np.uint8), -1, axis)


def unpack(packed: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack`."""
    moved = np.moveaxis(np.asarray(packed, dtype=np.uint8), axis, -1)
    out = np.empty((*moved.shape[:-1], moved.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = moved & 0xF
    out[..., 1::2] = moved >> 4
    return np.moveaxis(out, -1, axis)


def relative_error(x: np.ndarray, axis: int = -1, scale_rule: ScaleRule = "floor") -> float:
    """``||fake_quantize(x) - x|| / ||x||`` in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    err = fake_quantize(x64, axis, scale_rule) - x64
    denom = float(np.linalg.norm(x64))
    return float(np.linalg.norm(err)) / denom if denom > 0 else 0.0
