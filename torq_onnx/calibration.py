"""Calibration batches: token windows from real text, shaped as the ONNX model's inputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from torq_onnx.errors import TorqError


def token_windows(ids: np.ndarray, seq_len: int, n: int, sample_seed: int | None = None) -> np.ndarray:
    """``n`` non-overlapping windows of ``seq_len`` tokens: evenly spread over ``ids``, or with
    ``sample_seed`` a random choice of ``n`` of the text's ``len // seq_len`` aligned windows
    (so calibration-sample variance can be measured)."""
    if ids.size < seq_len:
        raise TorqError(f"calibration text has {ids.size} tokens, fewer than one window of {seq_len}")
    slots = ids.size // seq_len
    if sample_seed is None:
        starts = np.linspace(0, ids.size - seq_len, num=min(n, slots)).astype(np.int64)
    else:
        starts = np.sort(np.random.default_rng(sample_seed).choice(slots, min(n, slots), replace=False)) * seq_len
    return np.stack([ids[s : s + seq_len] for s in starts])


def feeds_for_inputs(input_specs: list[tuple[str, str]], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feed dict for one [1, T] window; ``input_specs`` = (name, onnx elem type string)."""
    t = ids.shape[-1]
    feeds: dict[str, np.ndarray] = {}
    for name, _ in input_specs:
        if name == "input_ids":
            feeds[name] = ids.reshape(1, t).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, t), np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((1, t), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(t, dtype=np.int64).reshape(1, t)
        else:
            raise TorqError(f"don't know how to feed model input '{name}' from text; calibrate through the Python API with your own batches")
    return feeds


def text_batches(input_specs: list[tuple[str, str]], ids: np.ndarray, seq_len: int, samples: int) -> Iterator[dict[str, np.ndarray]]:
    for window in token_windows(ids, seq_len, samples):
        yield feeds_for_inputs(input_specs, window)


def tokenize(tokenizer, text: str) -> np.ndarray:
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return np.asarray(enc["input_ids"], dtype=np.int64)
