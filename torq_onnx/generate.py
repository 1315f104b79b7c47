"""``torq-onnx generate``: text generation with the KV cache in an ONNX Runtime session.

One prefill pass over the prompt (empty cache), then one pass per new token that feeds the
previous pass's ``present.*`` outputs back as ``past_key_values.*``. Greedy when the
temperature is 0, else temperature sampling with an optional top-p (nucleus) cut.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from torq_onnx import calibration as calib
from torq_onnx import models
from torq_onnx.errors import TorqError
from torq_onnx.evaluate import logits_output

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise TorqError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise TorqError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TorqError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # the new tokens
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # every pass after the prefill

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first new token comes from the prefill pass
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else float("nan")


class CachedDecoder:
    """An ORT session of a decoder exported with a KV cache, one pass at a time.

    The cache stays where the session computes it: each pass binds the ``present.*`` outputs
    to the device of the session's first provider (ORT IOBinding) and the next pass binds
    those same values as its ``past_key_values.*``, so a CUDA session never copies the cache
    through host memory; only the logits are read on the host (one position's for a session
    loaded with ``last_position_logits``, as :func:`generate` loads it). A CPU session is fed
    numpy arrays (the cache is in host memory either way) unless ``bind_cache=True``, which
    runs the binding code on the CPU, as the tests do; a session-like object without
    IOBinding (e.g. :class:`~torq_onnx.runtime_ops.SplitSession`) is always fed numpy arrays.
    """

    def __init__(self, session, bind_cache: bool | None = None) -> None:
        self.session = session
        specs = calib.input_specs(session)
        self.past = [s for s in specs if s[0].startswith(PAST_PREFIX)]
        if not self.past:
            raise TorqError("the model has no KV-cache inputs (past_key_values.*), so it cannot generate token by token: "
                            "export it again with torq-onnx (decoders are exported with a KV cache)")
        self.inputs = {s[0] for s in specs}
        self.logits = logits_output(session)
        outputs = {o.name for o in session.get_outputs()}
        self.present = [PRESENT_PREFIX + s[0][len(PAST_PREFIX):] for s in self.past]
        missing = [p for p in self.present if p not in outputs]
        if missing:
            raise TorqError(f"the model takes a KV cache but has no outputs {', '.join(missing[:3])} to continue it")
        bind = binds_cache_by_default(session) if bind_cache is None else bind_cache
        self.cache_device = cache_device(session) if bind else None  # where bound outputs live; None: feed and fetch numpy

    def empty_cache(self) -> list[np.ndarray]:
        return list(calib.feeds_for_inputs(self.past, np.zeros(0, np.int64)).values())

    def step(self, ids: np.ndarray, start: int, cache: list) -> tuple[np.ndarray, list]:
        """Logits of the last position and the grown cache, for ``ids`` placed at ``start``;
        ``cache``: :meth:`empty_cache` or the cache the previous step returned."""
        t = ids.size
        feeds = {"input_ids": ids.reshape(1, t).astype(np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, start + t), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, start + t, dtype=np.int64).reshape(1, t)
        past = dict(zip((s[0] for s in self.past), cache))
        if self.cache_device is None:
            logits, *present = self.session.run([self.logits, *self.present], {**feeds, **past})
        else:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name, value in past.items():  # the empty cache is numpy, every later one OrtValues
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            binding.bind_output(self.logits, "cpu")
            for name in self.present:
                binding.bind_output(name, *self.cache_device)
            self.session.run_with_iobinding(binding)
            logits, *present = binding.get_outputs()
            logits = logits.numpy()
        return np.asarray(logits)[0, -1].astype(np.float64), present


def cache_device(session) -> tuple[str, int] | None:
    """(ORT device type, id) where ``session``'s first provider keeps its tensors: the CUDA
    EP's GPU (its ``device_id`` option), else host memory; None for a session-like object
    without IOBinding."""
    if not hasattr(session, "run_with_iobinding"):
        return None
    if session.get_providers()[0] == "CUDAExecutionProvider":
        return "cuda", int(session.get_provider_options()["CUDAExecutionProvider"].get("device_id", 0))
    return "cpu", 0


def binds_cache_by_default(session) -> bool:
    """Whether a :class:`CachedDecoder` on ``session`` keeps the cache as bound device values
    unless told otherwise: where the session computes off the host."""
    device = cache_device(session)
    return device is not None and device[0] != "cpu"


def greedy_decode_step(session, prompt: np.ndarray, bind_cache: bool | None = None) -> Callable[[], None] | None:
    """For benchmarks: a callable taking one greedy step with the KV cache, after a prefill of
    ``prompt`` (None for a model without a cache); ``bind_cache`` as for :class:`CachedDecoder`."""
    if not any(calib.is_past_input(s[0]) for s in calib.input_specs(session)):
        return None
    decoder = CachedDecoder(session, bind_cache)
    state = list(decoder.step(prompt, 0, decoder.empty_cache()))
    position = [prompt.size]

    def step() -> None:
        state[:] = decoder.step(np.array([int(np.argmax(state[0]))]), position[0], state[1])
        position[0] += 1

    return step


def choose_token(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / T) cut to the top-p mass."""
    if opts.temperature == 0:
        return int(np.argmax(logits))
    z = logits / opts.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.searchsorted(np.cumsum(p[order]), opts.top_p) + 1  # the smallest set holding top_p of the mass
    chosen = order[:keep]
    return int(rng.choice(chosen, p=p[chosen] / p[chosen].sum()))


def context_length(model_dir: Path, tokenizer) -> int | None:
    """The model's context (max positions), from the export report, else the tokenizer."""
    report = model_dir / "report.json"
    if report.is_file():
        n = json.loads(report.read_text()).get("model", {}).get("context_length")
        if n:
            return int(n)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**7 else None  # tokenizers without a limit report ~1e30


def generate(model_path: str | Path, prompt: str, opts: SamplingOptions | None = None, providers: list[str] | None = None,
             on_text: Callable[[str], None] | None = None, custom_ops=None) -> GenerationResult:
    """Generate from ``prompt`` with an exported decoder (OUT folder or model.onnx);
    ``on_text`` receives the new text as it is decoded (streaming); ``custom_ops`` as for
    :func:`~torq_onnx.runtime_ops.load_session`."""
    from torq_onnx.runtime_ops import load_session

    opts = opts or SamplingOptions()
    opts.check()
    path = Path(model_path)
    model_dir = path if path.is_dir() else path.parent
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise TorqError(f"no ONNX model at {path}")  # the file's content is checked as load_session reads it, once
    tok_dir = models.find_tokenizer_dir(path)
    if tok_dir is None:
        raise TorqError(f"no tokenizer next to {path} (expected {model_dir / 'tokenizer'}): generation needs one")
    tokenizer = models.load_tokenizer(tok_dir)
    prompt_ids = calib.tokenize(tokenizer, prompt)
    if prompt_ids.size == 0:
        raise TorqError("the prompt is empty after tokenization")
    limit = context_length(model_dir, tokenizer)
    if limit is not None and prompt_ids.size + opts.max_new_tokens > limit:
        raise TorqError(f"prompt ({prompt_ids.size} tokens) + --max-new-tokens ({opts.max_new_tokens}) exceeds the model's context of {limit} tokens")
    decoder = CachedDecoder(load_session(path, providers=providers, custom_ops=custom_ops, last_position_logits=True))
    rng = np.random.default_rng(opts.seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    res = GenerationResult(prompt_tokens=int(prompt_ids.size))
    t0 = time.perf_counter()
    logits, cache = decoder.step(prompt_ids, 0, decoder.empty_cache())
    res.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        token = choose_token(logits, opts, rng)
        res.tokens.append(token)
        text = tokenizer.decode(res.tokens, skip_special_tokens=True)
        if on_text is not None and len(text) > len(res.text):
            on_text(text[len(res.text):])
        res.text = text
        if token == eos or len(res.tokens) >= opts.max_new_tokens:
            break
        logits, cache = decoder.step(np.array([token]), prompt_ids.size + len(res.tokens) - 1, cache)
    res.decode_seconds = time.perf_counter() - t0
    return res
