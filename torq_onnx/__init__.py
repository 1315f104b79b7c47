"""torq-onnx: TORQ two-level orthogonal rotations for MXFP4 quantization of ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

from torq_onnx.errors import TorqError

__all__ = ["TorqError", "__version__", "load_session"]


def load_session(path, providers=None, sess_options=None, custom_ops=None, last_position_logits=False):
    """Open an ONNX Runtime session for an exported torq-onnx model (see runtime_ops);
    ``custom_ops=True`` runs the ops as the compiled custom-op library;
    ``last_position_logits=True`` computes ``logits`` at the last position only (generation)."""
    from torq_onnx.runtime_ops import load_session as _load

    return _load(path, providers=providers, sess_options=sess_options, custom_ops=custom_ops,
                 last_position_logits=last_position_logits)
