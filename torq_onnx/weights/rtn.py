"""Round-to-nearest MXFP4 weights, with an optional per-block search over the shared exponent."""

from __future__ import annotations

import numpy as np

from torq_onnx import mxfp4
from torq_onnx.mxfp4 import BLOCK_SIZE

SEARCH_STEPS = (-1, 1)  # exponents tried beside the scale rule's own


def block_exponents(blocks: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor", search: bool = False,
                    importance: np.ndarray | None = None) -> np.ndarray:
    """Unbiased E8M0 exponent per block of ``blocks`` [..., 32] (finite values).

    Without ``search`` this is the scale rule's exponent. With it, ``e - 1`` and ``e + 1``
    are tried too and each block keeps the exponent with the lowest squared error
    (weighted per element by ``importance``, broadcast against ``blocks``; ties keep the
    rule's exponent): ``e - 1`` clips the largest element to buy resolution for the rest,
    ``e + 1`` avoids clipping a block whose amax lies just below a binade edge.
    """
    blocks = np.asarray(blocks, dtype=np.float64)
    e = mxfp4.shared_exponent(np.abs(blocks).max(axis=-1), scale_rule)
    if not search:
        return e
    wgt = np.ones_like(blocks) if importance is None else np.broadcast_to(importance, blocks.shape)

    def err(exp: np.ndarray) -> np.ndarray:
        return (wgt * (mxfp4.decode(mxfp4.encode(blocks, exp[..., None]), exp[..., None]) - blocks) ** 2).sum(axis=-1)

    best, best_err = e, err(e)
    for step in SEARCH_STEPS:
        cand = np.clip(e + step, mxfp4.E8M0_MIN_EXP, mxfp4.E8M0_MAX_EXP)
        cand_err = err(cand)
        better = cand_err < best_err
        best, best_err = np.where(better, cand, best), np.where(better, cand_err, best_err)
    return best


def rtn_quantize(w: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor", scale_search: bool = False) -> mxfp4.MXFP4Tensor:
    """Round-to-nearest MXFP4 of ``w`` [D, N] along axis 0 (exactly :func:`mxfp4.quantize`
    without the search)."""
    if not scale_search:
        return mxfp4.quantize(w, axis=0, scale_rule=scale_rule)
    d, n = w.shape
    mxfp4.check_block_axis(w.shape, 0)
    blocks = np.asarray(w, dtype=np.float64).T.reshape(n, d // BLOCK_SIZE, BLOCK_SIZE)  # [N, B, 32]
    e = block_exponents(blocks, scale_rule, search=True)
    q = mxfp4.from_block_exponents(blocks, e, axis=1)  # codes [N, D], scales [N, B]
    return mxfp4.MXFP4Tensor(q.codes.T.copy(), q.scale_codes.T.copy(), axis=0)
