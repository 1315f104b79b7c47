"""Perplexity of an ONNX causal LM, run in ONNX Runtime: the same code for float and quantized models."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tqdm.auto import tqdm

from torq_onnx import calibration as calib
from torq_onnx import models, text
from torq_onnx.errors import TorqError


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the model; the last ``scored`` of them are scored."""

    begin: int
    end: int
    scored: int


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """HF-style strided windows: every token after the first is scored exactly once, each
    with at least ``seq_len - stride`` tokens of context (except in the first window)."""
    if seq_len < 2:
        raise TorqError(f"--seq-len must be at least 2, got {seq_len}")
    if not 0 < stride < seq_len:  # windows must overlap by >= 1 token: a target needs its context
        raise TorqError(f"--stride must be in 1..{seq_len - 1} (below --seq-len), got {stride}")
    if n_tokens < 2:
        raise TorqError(f"evaluation text has {n_tokens} tokens; perplexity needs at least 2")
    windows, prev_end, begin = [], 1, 0  # token 0 has no context: never scored
    while prev_end < n_tokens:
        end = min(begin + seq_len, n_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        begin = max(end - (seq_len - stride), 0) if end < n_tokens else end
    return windows


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` [T] under ``logits`` [T, V], in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return log_norm - z[np.arange(targets.shape[0]), targets]


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int
    seq_len: int
    stride: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def logits_output(session) -> str:
    """The session output holding next-token logits [batch, T, vocab]."""
    outs = session.get_outputs()
    for o in outs:
        if o.name == "logits":
            return o.name
    raise TorqError(
        "model has no 'logits' output, so it is not a causal LM (outputs: "
        + ", ".join(o.name for o in outs)
        + "); perplexity needs a decoder exported with task text-generation"
    )


def perplexity(
    session,
    ids: np.ndarray,
    seq_len: int = 512,
    stride: int = 256,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> PerplexityResult:
    """Strided-window perplexity of token ids [N] under an ORT session of a causal LM."""
    out_name = logits_output(session)
    specs = [(i.name, i.type) for i in session.get_inputs()]
    windows = sliding_windows(int(ids.size), seq_len, stride)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for w in (progress or (lambda it: it))(windows):
        chunk = ids[w.begin : w.end]
        (logits,) = session.run([out_name], calib.feeds_for_inputs(specs, chunk))
        logits = np.asarray(logits).reshape(chunk.size, -1)
        # position t predicts token t+1: score the last `scored` targets of the window
        nll = token_nll(logits[-w.scored - 1 : -1], chunk[-w.scored :])
        if not np.isfinite(nll).all():
            raise TorqError(f"non-finite logits in window [{w.begin}, {w.end}): the model produced NaN/Inf")
        total += float(nll.sum())
        count += w.scored
    mean = total / count
    return PerplexityResult(float(np.exp(mean)), mean, count, len(windows), seq_len, stride, time.perf_counter() - t0)


def evaluation_ids(tokenizer, text_path: str | None, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the held-out part of the text (the part export never calibrates on)."""
    _, holdout = text.split_corpus(text.load_text(text_path))
    ids = calib.tokenize(tokenizer, holdout)
    return ids[:max_tokens] if max_tokens else ids


def evaluate_model(
    model_path: str | Path,
    text_path: str | None = None,
    tokenizer_dir: str | Path | None = None,
    seq_len: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    providers: list[str] | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """``torq-onnx eval``: perplexity of an ONNX causal LM (float or torq-exported) on held-out text."""
    from torq_onnx.runtime_ops import load_session

    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise TorqError(f"no ONNX model at {path}")
    models.check_onnx_file(path)
    tokenizer = models.load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else models.find_tokenizer_dir(path))
    ids = evaluation_ids(tokenizer, text_path, max_tokens)
    session = load_session(path, providers=providers)
    bar = lambda it: tqdm(it, desc=f"eval {path.parent.name or path.name}", disable=not progress, leave=False)  # noqa: E731
    return perplexity(session, ids, seq_len, stride, progress=bar)
