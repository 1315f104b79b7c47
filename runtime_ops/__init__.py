"""torq custom ops (domain ``ai.torq``): schemas as ONNX functions, numpy reference, CUDA kernels.

Portable path: exported models carry the ops as model-local ONNX functions, so any
``onnxruntime.InferenceSession`` runs them; :func:`load_session` is the one call users need.
CUDA path (``torq_onnx.runtime_ops.cuda``): fused CuPy kernels, imported lazily, run inside
an ORT CUDA pipeline by :class:`SplitSession` (ORT segments cut at the online op).
"""

from __future__ import annotations

from pathlib import Path

from torq_onnx.runtime_ops.functions import (
    DEQUANTIZE_WEIGHT,
    DOMAIN,
    ROTATE_QUANTIZE,
    attach_functions,
    make_dequantize_node,
    make_rotate_quantize_node,
)
from torq_onnx.runtime_ops.split_runner import SplitSession

__all__ = [
    "DEQUANTIZE_WEIGHT",
    "DOMAIN",
    "ROTATE_QUANTIZE",
    "SplitSession",
    "attach_functions",
    "load_session",
    "make_dequantize_node",
    "make_rotate_quantize_node",
    "register",
]


def register(sess_options=None):
    """Prepare ``SessionOptions`` for a torq model and return them.

    The ops ship inside the model as ONNX functions, which ONNX Runtime inlines itself, so
    nothing needs registering for CPU or the CUDA EP; this keeps the documented one-call
    API stable and enables full graph optimization (constant-folds packed weights).
    """
    import onnxruntime as ort

    opts = sess_options or ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def load_session(path, providers=None, sess_options=None):
    """An ``onnxruntime.InferenceSession`` for an exported torq model (CPU unless told)."""
    import onnxruntime as ort

    from torq_onnx.errors import TorqError

    p = Path(path)
    if not p.is_file():
        raise TorqError(f"no ONNX model at {p}")
    try:
        return ort.InferenceSession(str(p), sess_options=register(sess_options), providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types with long messages
        raise TorqError(f"ONNX Runtime could not load {p}: {exc}") from exc
