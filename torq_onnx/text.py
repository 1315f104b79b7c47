"""Real English text that ships with every Python: the CPython reference manual (pydoc_data)."""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

from torq_onnx.errors import TorqError


def builtin_corpus() -> str:
    """~465k characters of English prose from ``pydoc_data.topics`` (the Python Language
    Reference topics that ``help()`` shows), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


BUILTIN_SOURCE = "builtin: CPython reference manual (pydoc_data)"


def text_identity(text_path: str | None, full_text: str) -> dict:
    """What a text is, for report.json and eval's results: its source (the file's absolute
    path, or the built-in corpus with the Python it came from: each CPython release edits its
    reference manual, so 3.11's and 3.12's built-in texts differ and so do scores on them),
    the SHA-256 of its UTF-8 and its length in characters."""
    source = str(Path(text_path).resolve()) if text_path is not None else f"{BUILTIN_SOURCE} of Python {platform.python_version()}"
    return {"source": source, "sha256": hashlib.sha256(full_text.encode("utf-8")).hexdigest(), "characters": len(full_text)}


def same_origin(a: str, b: str) -> bool:
    """Whether two text sources name the same text, as it may have been at another time: the
    same file, or the built-in corpus of any Python."""
    return a == b or (a.startswith(BUILTIN_SOURCE) and b.startswith(BUILTIN_SOURCE))


def split_corpus(text: str, holdout_fraction: float = 0.25) -> tuple[str, str]:
    """Disjoint (calibration, evaluation) parts: evaluation text is never calibrated on."""
    cut = int(len(text) * (1 - holdout_fraction))
    return text[:cut], text[cut:]


MAX_UNDECODABLE = 0.01  # a few stray bytes (a Latin-1 character) are replaced; more is not text


@dataclass(frozen=True)
class Corpus:
    """A text as export and eval use it: its calibration and held-out parts (:func:`split_corpus`)
    and what it is (:func:`text_identity`)."""

    calibration: str
    held_out: str
    identity: dict


def read_corpus(path: str | None) -> Corpus:
    """The text at ``path`` (None: :func:`builtin_corpus`), read once, as a :class:`Corpus`."""
    full = load_text(path)
    calibration, held_out = split_corpus(full)
    return Corpus(calibration, held_out, text_identity(path, full))


def load_text(path: str | None) -> str:
    """The text at ``path`` (None: :func:`builtin_corpus`), read as UTF-8; a TorqError for a
    missing or empty file, and for one that is not text (NUL bytes, or more than
    :data:`MAX_UNDECODABLE` of it undecodable), which would otherwise calibrate on noise."""
    if path is None:
        return builtin_corpus()
    p = Path(path)
    if not p.is_file():
        raise TorqError(f"text file not found: {p}")
    data = p.read_bytes()
    try:
        text, bad = data.decode("utf-8"), 0  # valid UTF-8: one decode
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")  # replacements made
    nul = b"\x00" in data
    if nul or bad > MAX_UNDECODABLE * max(len(text), 1):
        what = f"{100 * bad / max(len(text), 1):.0f}% of it is not UTF-8" + (", and it holds NUL bytes" if nul else "")
        raise TorqError(f"{p} is not a UTF-8 text file ({what}): give plain text")
    if not text.strip():
        raise TorqError(f"text file is empty: {p}")
    return text
