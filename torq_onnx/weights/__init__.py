"""MXFP4 weight quantizers: round-to-nearest (with an optional per-block scale search) and GPTQ.

Weights are MatMul weights ``W`` [D, N] (D = reduction axis, the one MX blocks run along).
Every quantizer returns :class:`torq_onnx.mxfp4.MXFP4Tensor` data along axis 0, so the
packed and fake-quant graph forms decode exactly what the quantizer chose.
"""

from __future__ import annotations

import numpy as np

from torq_onnx import mxfp4
from torq_onnx.weights.gptq import gptq_quantize
from torq_onnx.weights.rtn import block_exponents, rtn_quantize

ROUNDINGS: tuple[str, ...] = ("rtn", "gptq")

__all__ = ["ROUNDINGS", "block_exponents", "gptq_quantize", "hessian_weighted_error", "quantize_weight", "rtn_quantize"]


def quantize_weight(
    w: np.ndarray,
    rounding: str = "rtn",
    hessian: np.ndarray | None = None,
    scale_rule: mxfp4.ScaleRule = "floor",
    scale_search: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
) -> mxfp4.MXFP4Tensor:
    """MXFP4 data of ``w`` [D, N] along axis 0, by ``rounding`` ("rtn" or "gptq").

    ``hessian`` [D, D] (GPTQ only): the second moment ``E[x x^T]`` of the layer input in the
    basis ``w`` is expressed in.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D MatMul weight [D, N], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weight of shape {w.shape} contains NaN/Inf: it cannot be quantized")
    if rounding == "rtn":
        return rtn_quantize(w, scale_rule, scale_search)
    if rounding == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer input's second moment (calibration statistics)")
        return gptq_quantize(w, hessian, scale_rule, scale_search=scale_search, damp=damp, act_order=act_order)
    raise ValueError(f"unknown weight rounding {rounding!r}; choose one of {ROUNDINGS}")


def hessian_weighted_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(ΔW^T H ΔW) / tr(W^T H W)``: the layer-output error energy GPTQ minimizes,
    relative to the output energy (``H = E[x x^T]``; ``ΔW = Q - W``)."""
    w = np.asarray(w, dtype=np.float64)
    dw = np.asarray(q, dtype=np.float64) - w
    h = np.asarray(hessian, dtype=np.float64)
    denom = float(np.einsum("dn,de,en->", w, h, w, optimize=True))
    return float(np.einsum("dn,de,en->", dw, h, dw, optimize=True)) / denom if denom > 0 else 0.0
