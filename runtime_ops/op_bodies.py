"""The torq ops' ONNX function bodies, written with onnxscript: the ops' readable specification.

Each body reads like the numpy reference (``reference.py``) and is bit-exact to it: after
the two float32 rotation MatMuls every step is exact float32 arithmetic (power-of-two
scaling, ``Round`` = round half to even), and ``floor(log2 amax)`` comes from ``Log`` and is
then corrected by exact comparisons with ``2**e``, so it never depends on ``Log``'s rounding.
Constants are float32 ``Constant`` nodes (the bodies compute in float32 whatever the input
dtype), so no CastLike is needed per call.
"""

from __future__ import annotations

import math

from onnx import TensorProto, helper
from onnxscript import opset18 as op
from onnxscript import script
from onnxscript.values import Opset

DOMAIN = "ai.torq"
DOMAIN_VERSION = 1
torq_opset = Opset(DOMAIN, DOMAIN_VERSION)

F32 = TensorProto.FLOAT
LN2 = math.log(2.0)
FLT_MAX = 3.4028234663852886e38
NAN = math.nan
U8_4, U8_7, U8_8, U8_15 = (helper.make_tensor("", TensorProto.UINT8, [], [v]) for v in (4, 7, 8, 15))


@script(torq_opset, default_opset=op)
def TorqRotateBlockMajor(x, r_inter, r_intra):
    """``R_inter @ X @ R_intra`` for x [..., D] as float32 blocks in block-major layout
    [B, N, 32] (N = tokens). ``r_inter`` [G, G] mixes the G equal groups of the hidden axis
    (G = B mixes MX blocks; ``[[1]]``, G = 1, mixes nothing): in block-major order group g
    is the contiguous row g of [G, N*D/G], so R_inter is one [G, G] x [G, N*D/G] GEMM
    whatever G. R_intra is one [B*N, 32] x [32, 32] GEMM, or B batched [N, 32] x [32, 32]
    ones when it is per block ([B, 32, 32]); token-major, both would be N (or N*B) tiny
    products."""
    minus_one = op.Constant(value_ints=[-1])
    block = op.Constant(value_ints=[32])
    b = op.Div(op.Shape(x, start=-1), block)
    blocks = op.Transpose(op.Reshape(op.Cast(x, to=F32), op.Concat(minus_one, b, block, axis=0)), perm=[1, 0, 2])  # [B, N, 32]
    mixed = op.MatMul(r_inter, op.Reshape(blocks, op.Concat(op.Shape(r_inter, end=1), minus_one, axis=0)))  # [G, N*D/G]
    z = op.MatMul(op.Reshape(mixed, op.Shape(blocks)), r_intra)
    return z


@script(torq_opset, default_opset=op)
def TorqRotate(x, r_inter, r_intra):
    """Two-level TORQ rotation without quantization: ``R_inter @ X @ R_intra`` (float32
    GEMMs), returned in x's dtype. ``r_intra`` is [32, 32] or [B, 32, 32] (per block)."""
    z = TorqRotateBlockMajor(x, r_inter, r_intra)
    y = op.CastLike(op.Reshape(op.Transpose(z, perm=[1, 0, 2]), op.Shape(x)), x)
    return y


@script(torq_opset, default_opset=op)
def TorqRotateQuantize(x, r_inter, r_intra, bump_threshold: float):
    """``MXFP4(R_inter @ X @ R_intra)`` along the last axis (OCP MX v1.0), in x's dtype.

    ``bump_threshold`` encodes the scale rule: the exponent ``floor(log2 amax) - 2`` is
    bumped by one when amax's mantissa in [1, 2) exceeds it (floor: never)."""
    z = TorqRotateBlockMajor(x, r_inter, r_intra)  # [B, N, 32]
    # Full-size steps are plain arithmetic (ORT CPU's Where costs about nine Muls). The
    # per-block steps act on [B, N] tensors: with a trailing axis of 1 ([B, N, 1]), each
    # of ORT CPU's elementwise ops with a scalar costs about 30x as much.
    zero = op.Constant(value_float=0.0)
    one = op.Constant(value_float=1.0)
    two = op.Constant(value_float=2.0)
    half = op.Constant(value_float=0.5)
    last = op.Constant(value_ints=[-1])
    # a block with any NaN/Inf decodes to NaN (z * 0 is NaN exactly there); zeros stay zero
    bad = op.IsNaN(op.ReduceSum(op.Mul(z, zero), last, keepdims=0))
    amax = op.Max(op.ReduceMax(z, last, keepdims=0), op.Neg(op.ReduceMin(z, last, keepdims=0)))
    amax = op.Where(op.Or(bad, op.Equal(amax, zero)), one, amax)  # any scale serves these
    # floor(log2 amax): estimate, then correct by exact comparisons with p = 2**est
    est = op.Floor(op.Div(op.Log(amax), op.Constant(value_float=LN2)))
    p = op.Pow(two, est)
    low = op.Cast(op.Greater(p, amax), to=F32)
    p = op.Mul(p, op.Sub(one, op.Mul(low, half)))
    high = op.Cast(op.LessOrEqual(op.Mul(p, two), amax), to=F32)
    p = op.Mul(p, op.Add(one, high))
    bump = op.Cast(op.Greater(op.Div(amax, p), op.Constant(value_float=bump_threshold)), to=F32)
    # scale = 2**(floor(log2 amax) - 2 + bump) clamped to E8M0's [2**-127, 2**127]; p / 4 may
    # underflow only when that exponent is below -127, where the clamp is the answer anyway
    scale = op.Clip(op.Mul(op.Mul(p, op.Constant(value_float=0.25)), op.Add(one, bump)),
                    op.Constant(value_float=2.0**-127), op.Constant(value_float=2.0**127))
    scale = op.Unsqueeze(scale, last)  # [B, N, 1]
    v = op.Div(z, scale)  # exact: scale is a power of two and |v| < 8
    # E2M1 grid step: 1/2 below 2, 1 below 4, 2 above (= clip(floor(|v| / 2), 1/2, 2));
    # Round is half to even and odd-symmetric, so signed values round like magnitudes
    step = op.Clip(op.Floor(op.Mul(op.Abs(v), half)), half, two)
    q = op.Clip(op.Mul(op.Round(op.Div(v, step)), step), op.Constant(value_float=-6.0), op.Constant(value_float=6.0))
    y_block = op.Clip(op.Mul(q, scale), op.Constant(value_float=-FLT_MAX), op.Constant(value_float=FLT_MAX))
    out = op.Add(y_block, op.Unsqueeze(op.Where(bad, op.Constant(value_float=NAN), zero), last))  # NaN per bad block
    y = op.CastLike(op.Reshape(op.Transpose(out, perm=[1, 0, 2]), op.Shape(x)), x)
    return y


@script(torq_opset, default_opset=op)
def TorqDequantizeMXFP4(packed, scales):
    """float32 weights [D, N] from MXFP4 codes packed along the reduction axis ([D/2, N],
    row 2i in the low nibble, 2i+1 in the high one) and biased E8M0 scales ([D/32, N],
    0xFF = NaN). ORT constant-folds this at session creation: 4.25 bits/weight on disk."""
    low = op.BitwiseAnd(packed, op.Constant(value=U8_15))
    high = op.BitShift(packed, op.Constant(value=U8_4), direction="RIGHT")
    ax1 = op.Constant(value_ints=[1])
    pairs = op.Concat(op.Unsqueeze(low, ax1), op.Unsqueeze(high, ax1), axis=1)  # [D/2, 2, N]
    rows = op.Mul(op.Shape(packed, start=0, end=1), op.Constant(value_ints=[2]))
    cols = op.Shape(packed, start=1, end=2)
    codes = op.Reshape(pairs, op.Concat(rows, cols, axis=0))  # [D, N]
    mag = op.Gather(op.Constant(value_floats=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
                    op.Cast(op.BitwiseAnd(codes, op.Constant(value=U8_7)), to=TensorProto.INT64))
    neg = op.Equal(op.BitwiseAnd(codes, op.Constant(value=U8_8)), op.Constant(value=U8_8))
    vals = op.Where(neg, op.Neg(mag), mag)
    sc = op.Cast(scales, to=F32)
    scale = op.Pow(op.Constant(value_float=2.0), op.Sub(sc, op.Constant(value_float=127.0)))
    scale = op.Where(op.Equal(sc, op.Constant(value_float=255.0)), op.Constant(value_float=NAN), scale)
    blocked = op.Reshape(vals, op.Concat(op.Shape(scales, start=0, end=1), op.Constant(value_ints=[32]), cols, axis=0))
    w = op.Clip(op.Mul(blocked, op.Unsqueeze(scale, ax1)), op.Constant(value_float=-FLT_MAX), op.Constant(value_float=FLT_MAX))
    w = op.Reshape(w, op.Concat(rows, cols, axis=0))
    return w
