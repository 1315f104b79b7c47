"""torq custom ops (domain ``ai.torq``): schemas as ONNX functions, numpy reference, CUDA kernels.

Portable path: exported models carry the ops as model-local ONNX functions, so any
``onnxruntime.InferenceSession`` runs them; :func:`load_session` is the one call users need.
Compiled path (``torq_onnx.runtime_ops.compiled``): the same ops as a native ORT custom-op
library built on first use, which a session loads to run them as compiled kernels in the
whole graph, on CPU and on the CUDA execution provider (``load_session(..., custom_ops=True)``).
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
from torq_onnx.runtime_ops.providers import provider_names, require_installed, require_providers
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


def load_session(path, providers=None, sess_options=None, custom_ops=None, last_position_logits=False):
    """An ``onnxruntime.InferenceSession`` for an exported torq model (CPU unless told).

    ``custom_ops``: None or False runs the ops' ONNX function bodies; True loads the compiled
    custom-op library (:mod:`~torq_onnx.runtime_ops.compiled`, built and cached on first use;
    its CUDA build when ``providers`` name the CUDA EP); a path loads that library.
    ``last_position_logits``: the session's ``logits`` are the last position's only,
    ``[batch, 1, vocab]`` (the LM head runs on one position: generation's prefill;
    :mod:`torq_onnx.last_logits`); a graph of another form loads unchanged."""
    import onnxruntime as ort

    from torq_onnx.errors import TorqError

    p = Path(path)
    if not p.is_file():
        raise TorqError(f"no ONNX model at {p}")
    providers = providers or ["CPUExecutionProvider"]
    require_installed(providers, str(p))
    opts = register(sess_options)
    if custom_ops:
        from torq_onnx.runtime_ops import compiled

        on_cuda = "CUDAExecutionProvider" in provider_names(providers)
        compiled.register(opts, None if custom_ops is True else custom_ops, cuda=on_cuda)
    model = _last_position_model(p, opts) if last_position_logits else None
    try:
        session = ort.InferenceSession(str(p) if model is None else model, sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own exception types with long messages
        raise TorqError(f"ONNX Runtime could not load {p}: {exc}") from exc
    require_providers(session, providers, str(p))
    return session


def _last_position_model(path: Path, opts) -> bytes | None:
    """``path``'s graph with last-position logits, serialized, its external data (if any)
    read from beside ``path`` (``opts`` told where); None where the graph keeps its form."""
    from torq_onnx.last_logits import slice_logits_to_last_position
    from torq_onnx.models import check_onnx_file

    model = check_onnx_file(path)  # external weights stay on disk
    if not slice_logits_to_last_position(model):
        return None
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.resolve().parent))
    return model.SerializeToString()
