"""Weight-aware error of one quantized linear site, and the per-site guard built on it.

TORQ's objectives (equal block variances, max codebook entropy) look at the activations
only. What the model feels is the error of the layer OUTPUT, ``x W``: an activation error
that lands on input channels with large weight rows costs more than the same error on
channels the layer hardly reads. These functions measure that, on calibration tokens.
"""

from __future__ import annotations

import numpy as np

from torq_onnx import mxfp4, torq


def layer_output_error(
    x: np.ndarray,
    w: np.ndarray,
    rotation: torq.Rotation,
    quantize_activations: bool = True,
    quantize_weights: bool = True,
    scale_rule: mxfp4.ScaleRule = "floor",
) -> float:
    """``||Q_a(x R) Q_w(R^T W) - x W|| / ||x W||``: relative error of the deployed layer.

    ``x``: [T, D] token activations; ``w``: [D, N] weights of every consumer of the site,
    side by side. Q_a / Q_w are MXFP4 fake quantization exactly as the exported graph
    applies them (activations along D per token, weights in blocks of 32 along D).
    """
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    ref = x @ w
    z = rotation.apply(x)
    if quantize_activations:
        z = mxfp4.fake_quantize(z, axis=-1, scale_rule=scale_rule)
    w_rot = rotation.fold(w).astype(np.float32)
    if quantize_weights:
        w_rot = mxfp4.fake_quantize(w_rot, axis=0, scale_rule=scale_rule)
    denom = float(np.linalg.norm(ref))
    return float(np.linalg.norm(z @ w_rot - ref)) / denom if denom > 0 else 0.0


def guarded_choice(
    candidates: dict[str, torq.Rotation],
    x: np.ndarray,
    w: np.ndarray,
    quantize_activations: bool = True,
    quantize_weights: bool = True,
    scale_rule: mxfp4.ScaleRule = "floor",
) -> tuple[str, dict[str, float]]:
    """The candidate rotation with the lowest :func:`layer_output_error` (ties: first listed)."""
    errors = {
        name: layer_output_error(x, w, rot, quantize_activations, quantize_weights, scale_rule)
        for name, rot in candidates.items()
    }
    return min(errors, key=errors.__getitem__), errors
