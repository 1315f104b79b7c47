"""torq-onnx: TORQ two-level orthogonal rotations for MXFP4 quantization of ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

from torq_onnx.errors import TorqError

__all__ = ["TorqError", "__version__", "export", "load_session"]


def export(model=None, out_dir="torq-out", *, text=None, tokenizer=None, dtype=None, **options):
    """The Python form of ``torq-onnx export``: ``model`` (a packaged model name, a local HF
    folder, a ``.gguf`` or ``.onnx`` file; None for the default) exported to ``out_dir``.
    ``text``, ``tokenizer`` and ``dtype`` are the CLI's ``--text``, ``--tokenizer`` and
    ``--dtype``; ``options`` are :class:`torq_onnx.pipeline.ExportOptions` fields, e.g.
    ``method="torq", weight_rounding="rtn", calib_samples=32, progress=False``. Everything is
    checked before any work; bad input raises a TorqError naming it. Returns the path of
    ``out_dir/model.onnx``."""
    from dataclasses import fields

    from torq_onnx.pipeline import ExportOptions
    from torq_onnx.pipeline import export as _export

    known = [f.name for f in fields(ExportOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TorqError(f"unknown export option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
    return _export(model, out_dir, ExportOptions(**options), text_path=text, tokenizer_dir=tokenizer, dtype=dtype)


def load_session(path, providers=None, sess_options=None, custom_ops=None, last_position_logits=False):
    """Open an ONNX Runtime session for an exported torq-onnx model (see runtime_ops);
    ``custom_ops=True`` runs the ops as the compiled custom-op library;
    ``last_position_logits=True`` computes ``logits`` at the last position only (generation)."""
    from torq_onnx.runtime_ops import load_session as _load

    return _load(path, providers=providers, sess_options=sess_options, custom_ops=custom_ops,
                 last_position_logits=last_position_logits)
