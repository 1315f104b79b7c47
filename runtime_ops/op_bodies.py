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
def TorqRotate(x, r_inter, r_intra):
    """Two-level TORQ rotation without quantization: ``R_inter @ X @ R_intra`` (float32
    GEMMs), returned in x's dtype. ``r_intra`` is [32, 32] or [B, 32, 32] (per block)."""
    blocks = op.Reshape(op.Cast(x, to=F32), op.Concat(op.Shape(x, end=-1), op.Shape(r_inter, end=1), op.Constant(value_ints=[32]), axis=0))
    # [..., B, 1, 32]: the singleton axis lets one MatMul take a shared or a per-block r_intra
    z = op.MatMul(op.Unsqueeze(op.MatMul(r_inter, blocks), op.Constant(value_ints=[-2])), r_intra)
    y = op.CastLike(op.Reshape(z, op.Shape(x)), x)
    return y


@script(torq_opset, default_opset=op)
def TorqRotateQuantize(x, r_inter, r_intra, bump_threshold: float):
    """``MXFP4(R_inter @ X @ R_intra)`` along the last axis (OCP MX v1.0), in x's dtype.

    ``bump_threshold`` encodes the scale rule: the exponent ``floor(log2 amax) - 2`` is
    bumped by one when amax's mantissa in [1, 2) exceeds it (floor: never)."""
    blocks = op.Reshape(op.Cast(x, to=F32), op.Concat(op.Shape(x, end=-1), op.Shape(r_inter, end=1), op.Constant(value_ints=[32]), axis=0))
    z = op.MatMul(op.Unsqueeze(op.MatMul(r_inter, blocks), op.Constant(value_ints=[-2])), r_intra)
    one = op.Constant(value_float=1.0)
    two = op.Constant(value_float=2.0)
    half = op.Constant(value_float=0.5)
    a = op.Abs(z)
    # a block with any NaN/Inf decodes to NaN; an all-zero block stays zero
    nonfinite = op.Cast(op.Or(op.IsNaN(z), op.IsInf(z)), to=F32)
    bad = op.Greater(op.ReduceMax(nonfinite, op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=0.0))
    amax = op.ReduceMax(a, op.Constant(value_ints=[-1]), keepdims=1)
    zero_or_bad = op.Or(bad, op.Equal(amax, op.Constant(value_float=0.0)))
    amax = op.Where(zero_or_bad, one, amax)
    # floor(log2 amax): estimate, then correct by exact comparisons with 2**est
    est = op.Floor(op.Div(op.Log(amax), op.Constant(value_float=LN2)))
    est = op.Sub(est, op.Cast(op.Greater(op.Pow(two, est), amax), to=F32))
    est = op.Add(est, op.Cast(op.LessOrEqual(op.Mul(op.Pow(two, est), two), amax), to=F32))
    mant = op.Div(amax, op.Pow(two, est))
    e = op.Add(op.Sub(est, two), op.Cast(op.Greater(mant, op.Constant(value_float=bump_threshold)), to=F32))
    e = op.Clip(e, op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
    e = op.Where(zero_or_bad, op.Constant(value_float=-127.0), e)
    scale = op.Pow(two, e)
    v = op.Div(a, scale)
    # E2M1 round half to even: step 0.5 below 2, step 1 below 4, step 2 above; saturate at 6
    q_lo = op.Mul(op.Round(op.Mul(v, two)), half)
    q_hi = op.Mul(op.Round(op.Mul(v, half)), two)
    q = op.Where(op.Less(v, two), q_lo, op.Where(op.Less(v, op.Constant(value_float=4.0)), op.Round(v), q_hi))
    q = op.Min(q, op.Constant(value_float=6.0))
    mag = op.Min(op.Mul(q, scale), op.Constant(value_float=FLT_MAX))
    signed = op.Where(op.Less(z, op.Constant(value_float=0.0)), op.Neg(mag), mag)
    out = op.Where(bad, op.Constant(value_float=NAN), signed)
    y = op.CastLike(op.Reshape(out, op.Shape(x)), x)
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
