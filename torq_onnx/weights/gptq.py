"""GPTQ for MXFP4 weights (Frantar et al., 2022), with the MX block scale chosen in the sweep.

For a layer ``y = x W`` (``W`` [D, N]) and calibration second moment ``H = E[x x^T]`` [D, D],
GPTQ quantizes the D input rows of ``W`` one at a time and spreads each row's rounding error
over the rows not yet quantized, using the Cholesky factor of ``H^-1``; this minimizes the
output error ``tr(ΔW^T H ΔW)`` greedily instead of the weight error. MXFP4 specifics: the
32 rows of one MX block share one E8M0 exponent per output column, and that exponent is set
(by the scale rule, or the per-block search) from the block's *error-updated* values when
the sweep reaches the block's first row, as GPTQ does for quantization groups.
"""

from __future__ import annotations

import numpy as np

from torq_onnx import mxfp4
from torq_onnx.mxfp4 import BLOCK_SIZE
from torq_onnx.weights.rtn import block_exponents

LAZY_BATCH = 128  # rows updated eagerly; the rest gets one GEMM per batch (a multiple of 32)
MAX_DAMP_RETRIES = 6


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + λI)^-1``, ``λ = damp * mean(diag H)``; the damping
    grows tenfold until H is numerically positive definite (rank-deficient calibration)."""
    mean_diag = float(np.mean(np.diag(h)))
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    eye = np.eye(h.shape[0])
    rev = slice(None, None, -1)
    for _ in range(MAX_DAMP_RETRIES):
        try:
            # one factorization: with J the index reversal, J H J = L L^T gives H = R R^T for the
            # upper R = J L J, so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J
            low = np.linalg.cholesky((h + lam * eye)[rev, rev])
            return np.linalg.inv(low)[rev, rev]
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise ValueError("the calibration second moment is not positive definite even after damping")


def block_act_order(h: np.ndarray) -> np.ndarray:
    """Row order for GPTQ's act-order that keeps every MX block contiguous: blocks by their
    total input energy (largest first), rows inside a block by their own energy."""
    diag = np.diag(h).reshape(-1, BLOCK_SIZE)
    blocks = np.argsort(-diag.sum(axis=1), kind="stable")
    return np.concatenate([b * BLOCK_SIZE + np.argsort(-diag[b], kind="stable") for b in blocks])


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    scale_rule: mxfp4.ScaleRule = "floor",
    scale_search: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
) -> mxfp4.MXFP4Tensor:
    """GPTQ-quantized MXFP4 data of ``w`` [D, N] (blocks along axis 0) for input moment ``hessian``."""
    d, n = w.shape
    mxfp4.check_block_axis(w.shape, 0)
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (d, d):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's input size {d}")
    if not np.isfinite(h).all():
        raise ValueError("the calibration second moment contains NaN/Inf")
    h = (h + h.T) / 2
    dead = np.diag(h) <= 0  # inputs never active in calibration: any value is as good
    h[dead, dead] = 1.0
    perm = block_act_order(h) if act_order else np.arange(d)
    h = h[np.ix_(perm, perm)]
    u = _inverse_cholesky_upper(h, damp)
    work = np.asarray(w, dtype=np.float64).T[:, perm].copy()  # [N, D]: rows of W as columns
    codes = np.zeros((n, d), dtype=np.uint8)
    exps = np.zeros((n, d // BLOCK_SIZE), dtype=np.int64)  # per swept block position
    e = exps[:, 0]
    for i1 in range(0, d, LAZY_BATCH):
        i2 = min(i1 + LAZY_BATCH, d)
        w1, u1 = work[:, i1:i2], u[i1:i2, i1:i2]  # w1 is a view: updated in place
        err1 = np.zeros((n, i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            if col % BLOCK_SIZE == 0:  # the sweep reaches a new MX block: fix its scales now
                e = block_exponents(w1[:, i : i + BLOCK_SIZE], scale_rule, search=scale_search)
                exps[:, col // BLOCK_SIZE] = e
            c = mxfp4.encode(w1[:, i], e)
            codes[:, col] = c
            err = (w1[:, i] - mxfp4.decode(c, e)) / u1[i, i]
            w1[:, i + 1 :] -= np.outer(err, u1[i, i + 1 :])
            err1[:, i] = err
        work[:, i2:] -= err1 @ u[i1:i2, i2:]
    out_codes = np.empty_like(codes)
    out_codes[:, perm] = codes
    out_exps = np.empty_like(exps)
    out_exps[:, perm[::BLOCK_SIZE] // BLOCK_SIZE] = exps
    return mxfp4.MXFP4Tensor(out_codes.T.copy(), (out_exps + mxfp4.E8M0_BIAS).astype(np.uint8).T.copy(), axis=0)
