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


InputSpec = tuple  # (name, onnx type string[, shape as a list of ints / dim names])


def input_specs(source) -> list[tuple[str, str, list]]:
    """(name, type, shape) of a model's inputs, from an ORT-like session (``get_inputs()``)
    or an onnx-ir model; shapes carry ints for static dims, names (or None) otherwise."""
    if hasattr(source, "get_inputs"):
        return [(i.name, i.type, list(i.shape or [])) for i in source.get_inputs()]
    specs = []
    for v in source.graph.inputs:
        dims = [d if isinstance(d, int) else None for d in (v.shape.dims if v.shape is not None else [])]
        specs.append((v.name, str(v.dtype), dims))
    return specs


def is_past_input(name: str) -> bool:
    """A KV-cache input of an optimum decoder export (``past_key_values.<layer>.key|value``)."""
    return name.startswith("past_key_values.")


def _empty_past(name: str, type_str: str, shape: list) -> np.ndarray:
    """An empty cache [1, kv_heads, 0, head_dim] for a first (prefill) pass."""
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise TorqError(f"cannot build an empty KV cache for input '{name}': its shape {shape} has no static heads/head_dim")
    dtype = np.float16 if "16" in type_str.lower() and "bfloat" not in type_str.lower() else np.float32
    return np.zeros((1, shape[1], 0, shape[3]), dtype)


def feeds_for_inputs(input_specs: list[InputSpec], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feed dict for one [1, T] window from the start of a sequence (an empty KV cache where
    the model takes one); ``input_specs`` = (name, onnx type string[, shape]) as
    :func:`input_specs` gives them (the shape is needed only for KV-cache inputs)."""
    t = ids.shape[-1]
    feeds: dict[str, np.ndarray] = {}
    for spec in input_specs:
        name = spec[0]
        if name == "input_ids":
            feeds[name] = ids.reshape(1, t).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, t), np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((1, t), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(t, dtype=np.int64).reshape(1, t)
        elif is_past_input(name) and len(spec) > 2:
            feeds[name] = _empty_past(name, spec[1], spec[2])
        else:
            raise TorqError(f"don't know how to feed model input '{name}' from text; calibrate through the Python API with your own batches")
    return feeds


def text_batches(input_specs: list[InputSpec], ids: np.ndarray, seq_len: int, samples: int) -> Iterator[dict[str, np.ndarray]]:
    for window in token_windows(ids, seq_len, samples):
        yield feeds_for_inputs(input_specs, window)


def tokenize(tokenizer, text: str) -> np.ndarray:
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return np.asarray(enc["input_ids"], dtype=np.int64)
