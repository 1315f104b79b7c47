"""WUSH (arXiv 2512.00956): a closed-form, data-aware, non-orthogonal transform per MX block.

For one 32-channel block ``b`` of a linear layer's input, with block second moment
``H_b = E[x_b x_b^T]`` (damped) = ``U_b^T U_b`` (Cholesky, ``U_b`` upper) and the block's
weight rows ``W_b`` [32, N] (every consumer of the site side by side):

    Y_b = U_b W_b = V S P^T   (SVD),   s = singular values / sqrt(N), lightly damped
    T_b = H32 · diag(s)^(1/2) · V^T · U_b^-T

Activations go through ``x_b -> T_b x_b`` online and weights absorb ``T_b^-T W_b``
offline, which gives both the same "balanced" spectrum: the transformed activation moment
is ``H32 S H32^T`` and the transformed weight ``H32 S^(1/2) P^T``, each then spread across
the block by the Hadamard, so absmax block quantizers of either lose little. In the
torq-onnx convention ``Z = R_inter @ X @ R_intra`` this is ``R_intra[b] = T_b^T``.
"""

from __future__ import annotations

import numpy as np

from torq_onnx.mxfp4 import BLOCK_SIZE

CHOLESKY_DAMP = 1e-2  # of the mean diagonal of H_b, as in the WUSH reference
SPECTRUM_DAMP = 1e-2  # of the mean singular value


def block_moments(h: np.ndarray) -> np.ndarray:
    """[B, 32, 32] diagonal blocks of a [D, D] second moment."""
    b = h.shape[0] // BLOCK_SIZE
    blocks = h.reshape(b, BLOCK_SIZE, b, BLOCK_SIZE)
    return blocks[np.arange(b), :, np.arange(b), :]


def wush_block_transforms(h: np.ndarray, w: np.ndarray, hadamard: np.ndarray) -> np.ndarray:
    """``T_b`` [B, 32, 32] for input second moment ``h`` [D, D] and weights ``w`` [D, N]."""
    d, n = w.shape
    if h.shape != (d, d):
        raise ValueError(f"second moment {h.shape} does not match the weights' input size {d}")
    hb = block_moments(np.asarray(h, dtype=np.float64))
    hb = (hb + np.swapaxes(hb, -1, -2)) / 2
    mean_diag = np.einsum("bii->b", hb) / BLOCK_SIZE
    lam = CHOLESKY_DAMP * np.where(mean_diag > 0, mean_diag, 1.0)
    lower = np.linalg.cholesky(hb + lam[:, None, None] * np.eye(BLOCK_SIZE))  # H_b = L L^T, U_b = L^T
    wb = np.asarray(w, dtype=np.float64).reshape(-1, BLOCK_SIZE, n)
    y = np.swapaxes(lower, -1, -2) @ wb  # U_b W_b
    v, s, _ = np.linalg.svd(y, full_matrices=False)
    s = s / np.sqrt(n)
    s = s + SPECTRUM_DAMP * s.mean(axis=-1, keepdims=True)
    s = np.where(s > 0, s, 1.0)  # an all-zero block (no weight, no signal): plain Hadamard
    # T_b = H32 diag(s^1/2) V^T U_b^-T, and U_b^-T = L^-1
    return hadamard @ (np.sqrt(s)[..., :, None] * np.swapaxes(v, -1, -2)) @ np.linalg.inv(lower)
