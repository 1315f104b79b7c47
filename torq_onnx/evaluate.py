"""Perplexity of an ONNX causal LM, run in ONNX Runtime: the same code for float and quantized models."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
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


def check_window_options(seq_len: int, stride: int, max_tokens: int | None = None) -> None:
    """Refuse window options that cannot work, before any model is loaded."""
    if seq_len < 2:
        raise TorqError(f"--seq-len must be at least 2, got {seq_len}")
    if not 0 < stride < seq_len:  # windows must overlap by >= 1 token: a target needs its context
        raise TorqError(f"--stride must be in 1..{seq_len - 1} (below --seq-len), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise TorqError(f"--max-tokens must be at least 2 (perplexity needs a token and its context), got {max_tokens}")


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """HF-style strided windows: every token after the first is scored exactly once, each
    with at least ``seq_len - stride`` tokens of context (except in the first window)."""
    check_window_options(seq_len, stride)
    if n_tokens < 2:
        raise TorqError(f"evaluation text has {n_tokens} tokens; perplexity needs at least 2")
    windows, prev_end, begin = [], 1, 0  # token 0 has no context: never scored
    while prev_end < n_tokens:
        end = min(begin + seq_len, n_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        begin = max(end - (seq_len - stride), 0) if end < n_tokens else end
    return windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities [T, V] from logits [T, V], in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` [T] under ``logits`` [T, V], in float64."""
    return -log_softmax(logits)[np.arange(targets.shape[0]), targets]


def divergence_from_reference(logp_ref: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: ``KL(P_ref || P)`` in nats and whether both put their top-1 on the same token
    (llama.cpp's perplexity tool reports both; far less noisy than PPL for comparing quantizers)."""
    logp_ref = logp_ref.astype(np.float64)
    kl = (np.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1)
    return np.maximum(kl, 0.0), logp_ref.argmax(axis=-1) == logp.argmax(axis=-1)


class Reference:
    """The float model whose next-token distributions a quantized model is compared with.

    ``cache=True`` keeps the reference's scored log-probabilities (float32, per window) so
    that several models are compared against one reference run (the compare tool)."""

    def __init__(self, session, cache: bool = False) -> None:
        self.session, self.cache = session, cache
        self._out = logits_output(session)
        self._specs = calib.input_specs(session)
        self._store: dict[tuple[int, int], np.ndarray] = {}

    def scored_logprobs(self, window: Window, chunk: np.ndarray) -> np.ndarray:
        key = (window.begin, window.end)
        if key in self._store:
            return self._store[key]
        (logits,) = self.session.run([self._out], calib.feeds_for_inputs(self._specs, chunk))
        logp = log_softmax(np.asarray(logits).reshape(chunk.size, -1)[-window.scored - 1 : -1])
        if self.cache:
            self._store[key] = logp.astype(np.float32)
        return logp


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int
    seq_len: int
    stride: int
    seconds: float
    # against a reference (float) model, when one is given
    kl_divergence: float | None = None  # mean KL(P_ref || P) per scored token, nats
    kl_divergence_p99: float | None = None  # its 99th percentile over tokens
    top1_agreement: float | None = None  # fraction of tokens where both models' argmax agree
    text: dict | None = None  # the text whose held-out part was scored (text.text_identity), when eval read one
    warnings: list[str] = field(default_factory=list)  # what makes the score less than it seems

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


def round_robin(steps: list[Callable[[], object]], rounds: int, warmup: int = 1) -> list[float]:
    """Median seconds of each callable in ``steps``, called in turn ``rounds`` times after
    ``warmup`` untimed calls each (on a machine whose speed drifts, every step is slowed alike)."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for step, t in zip(steps, times):
            start = time.perf_counter()
            step()
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, after ``warmup`` untimed ones."""
    return round_robin([fn], repeat, warmup)[0]


def forward_ms(session, ids: np.ndarray, repeat: int = 5) -> float:
    """Median wall time of one forward pass over ``ids`` (after a warm-up), in ms."""
    feeds = calib.feeds_for_inputs(calib.input_specs(session), ids)
    out = logits_output(session)
    return median_seconds(lambda: session.run([out], feeds), repeat) * 1e3


def perplexity(
    session,
    ids: np.ndarray,
    seq_len: int = 512,
    stride: int = 256,
    progress: Callable[[Iterable], Iterable] | None = None,
    reference: Reference | None = None,
) -> PerplexityResult:
    """Strided-window perplexity of token ids [N] under an ORT session of a causal LM; with
    a ``reference``, also the KL divergence from its distributions and top-1 agreement."""
    out_name = logits_output(session)
    specs = calib.input_specs(session)
    windows = sliding_windows(int(ids.size), seq_len, stride)
    total, count = 0.0, 0
    kls, agree = [], []
    t0 = time.perf_counter()
    for w in (progress or (lambda it: it))(windows):
        chunk = ids[w.begin : w.end]
        (logits,) = session.run([out_name], calib.feeds_for_inputs(specs, chunk))
        # position t predicts token t+1: score the last `scored` targets of the window
        logp = log_softmax(np.asarray(logits).reshape(chunk.size, -1)[-w.scored - 1 : -1])
        nll = -logp[np.arange(w.scored), chunk[-w.scored :]]
        if not np.isfinite(nll).all():
            raise TorqError(f"non-finite logits in window [{w.begin}, {w.end}): the model produced NaN/Inf")
        total += float(nll.sum())
        count += w.scored
        if reference is not None:
            kl, same = divergence_from_reference(reference.scored_logprobs(w, chunk), logp)
            kls.append(kl)
            agree.append(same)
    mean = total / count
    res = PerplexityResult(float(np.exp(mean)), mean, count, len(windows), seq_len, stride, time.perf_counter() - t0)
    if reference is not None:
        kl = np.concatenate(kls)
        res.kl_divergence, res.kl_divergence_p99 = float(kl.mean()), float(np.percentile(kl, 99))
        res.top1_agreement = float(np.concatenate(agree).mean())
    return res


def evaluation_ids(tokenizer, text_path: str | None, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the held-out part of the text (the part export never calibrates on)."""
    return evaluation_text(tokenizer, text_path, max_tokens)[0]


def evaluation_text(tokenizer, text_path: str | None, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """:func:`evaluation_ids` and the identity of the text they come from (:func:`text.text_identity`)."""
    corpus = text.read_corpus(text_path)
    ids = calib.tokenize(tokenizer, corpus.held_out)
    return (ids[:max_tokens] if max_tokens else ids), corpus.identity


def calibration_mismatch(model_dir: Path, scored: dict) -> str | None:
    """A warning when ``scored`` (a text identity) is not the text the export in ``model_dir``
    calibrated on although it names the same one (the built-in corpus of another Python, or
    the same file since changed): its held-out part is then not the one that export set
    aside, so the two can overlap. None where they agree, the texts are unrelated, or the
    model carries no such record (not an export, or one from before exports kept it)."""
    try:
        calibrated = json.loads((model_dir / "report.json").read_text())["calibration"]["text"]
        source, sha = calibrated["source"], calibrated["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sha == scored["sha256"] or not text.same_origin(source, scored["source"]):
        return None
    return (f"the text scored here is not the one this export calibrated on ({source}, {calibrated.get('characters')} characters; "
            f"here {scored['source']}, {scored['characters']} characters): its held-out part may overlap the calibration part, "
            "and the score compares only with scores on this same text")


def evaluate_model(
    model_path: str | Path,
    text_path: str | None = None,
    tokenizer_dir: str | Path | None = None,
    seq_len: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    providers: list[str] | None = None,
    progress: bool = True,
    reference: str | None = None,
    custom_ops=None,
) -> PerplexityResult:
    """``torq-onnx eval``: perplexity of an ONNX causal LM (float or torq-exported) on held-out
    text; with ``reference`` (any MODEL that ``torq-onnx export`` accepts, e.g. the float
    source), also KL divergence from the reference and top-1 agreement with it. ``custom_ops``
    as for :func:`~torq_onnx.runtime_ops.load_session` (the model scored, not the reference)."""
    from torq_onnx.runtime_ops import load_session

    check_window_options(seq_len, stride, max_tokens)
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise TorqError(f"no ONNX model at {path}")
    models.check_onnx_file(path)
    # a wrong reference is named now, not after tokenizing and loading the model
    ref_path = models.check_source(reference) if reference is not None else None
    tokenizer = models.load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else models.find_tokenizer_dir(path))
    ids, scored = evaluation_text(tokenizer, text_path, max_tokens)
    session = load_session(path, providers=providers, custom_ops=custom_ops)
    bar = lambda it: tqdm(it, desc=f"eval {path.parent.name or path.name}", disable=not progress, leave=False)  # noqa: E731
    if reference is None:
        res = perplexity(session, ids, seq_len, stride, progress=bar)
    else:
        ref_src = models.open_source(ref_path)
        try:
            ref = Reference(load_session(ref_src.onnx_path, providers=providers))
            res = perplexity(session, ids, seq_len, stride, progress=bar, reference=ref)
        finally:
            ref_src.cleanup()
    res.text = scored
    mismatch = calibration_mismatch(path.parent, scored)
    if mismatch is not None:
        res.warnings.append(mismatch)
    return res


# ---------------------------------------------------------------- encoders (no logits)
@dataclass
class FidelityResult:
    """How close an encoder's sentence embeddings stay to a reference (float) encoder's."""

    mean_cosine: float
    min_cosine: float
    sentences: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluation_sentences(text_path: str | None, n: int = 256, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Up to ``n`` sentences of the held-out text (never calibrated on), in order."""
    holdout = text.read_corpus(text_path).held_out
    parts = [" ".join(p.split()) for chunk in holdout.split("\n\n") for p in chunk.replace("\n", " ").split(". ")]
    picked = [p for p in parts if min_chars <= len(p) <= max_chars][:n]
    if not picked:
        raise TorqError("the held-out text has no sentences to embed")
    return picked


def sentence_embeddings(session, tokenizer, sentences: list[str]) -> np.ndarray:
    """Mean-pooled (sentence-transformers style), L2-normalized embeddings [S, H] from the
    encoder's first output ([1, T, H] hidden states)."""
    specs = calib.input_specs(session)
    out_name = session.get_outputs()[0].name
    rows = []
    for sentence in sentences:
        ids = calib.tokenize(tokenizer, sentence)[:510]
        ids = np.asarray(tokenizer.build_inputs_with_special_tokens(ids.tolist()), dtype=np.int64)
        (hidden,) = session.run([out_name], calib.feeds_for_inputs(specs, ids))
        vec = np.asarray(hidden, dtype=np.float64).reshape(ids.size, -1).mean(axis=0)
        if not np.isfinite(vec).all():
            raise TorqError("non-finite encoder output: the model produced NaN/Inf")
        rows.append(vec / max(np.linalg.norm(vec), 1e-30))
    return np.stack(rows)


def embedding_fidelity(session, reference_session, tokenizer, sentences: list[str]) -> FidelityResult:
    """Cosine similarity of each sentence's embedding to the reference encoder's."""
    t0 = time.perf_counter()
    cos = (sentence_embeddings(session, tokenizer, sentences) * sentence_embeddings(reference_session, tokenizer, sentences)).sum(axis=1)
    return FidelityResult(float(cos.mean()), float(cos.min()), len(sentences), time.perf_counter() - t0)
