"""Real English text that ships with every Python: the CPython reference manual (pydoc_data)."""

from __future__ import annotations

from pathlib import Path

from torq_onnx.errors import TorqError


def builtin_corpus() -> str:
    """~465k characters of English prose from ``pydoc_data.topics`` (the Python Language
    Reference topics that ``help()`` shows), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_corpus(text: str, holdout_fraction: float = 0.25) -> tuple[str, str]:
    """Disjoint (calibration, evaluation) parts: evaluation text is never calibrated on."""
    cut = int(len(text) * (1 - holdout_fraction))
    return text[:cut], text[cut:]


def load_text(path: str | None) -> str:
    if path is None:
        return builtin_corpus()
    p = Path(path)
    if not p.is_file():
        raise TorqError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TorqError(f"text file is empty: {p}")
    return text
