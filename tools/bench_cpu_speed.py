"""ONNX Runtime CPU speed of exported models side by side: the float model and torq exports.

For each model: the median time of one 512-token forward pass, the time to score the
held-out text (strided 512-token windows, as ``torq-onnx eval``) and, for models exported
with a KV cache, greedy decode tokens/s after a 512-token prefill (64 new tokens), each with
its ratio to the first model (the float one). Run:
  python tools/bench_cpu_speed.py FLOAT.onnx QUANT.onnx [MORE.onnx ...] --tokenizer-dir DIR [--max-tokens 8192]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import calibration as calib
from torq_onnx import models
from torq_onnx.evaluate import evaluation_ids, forward_ms, perplexity
from torq_onnx.generate import CachedDecoder
from torq_onnx.runtime_ops import load_session


def decode_tokens_per_second(session, prompt: np.ndarray, new_tokens: int = 64) -> float:
    """Greedy decode speed with the KV cache, after a prefill of ``prompt`` (NaN without a cache)."""
    if not any(calib.is_past_input(s[0]) for s in calib.input_specs(session)):
        return float("nan")
    decoder = CachedDecoder(session)
    logits, cache = decoder.step(prompt, 0, decoder.empty_cache())
    t = time.perf_counter()
    for k in range(new_tokens):
        logits, cache = decoder.step(np.array([int(np.argmax(logits))]), prompt.size + k, cache)
    return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="the float model first")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--max-tokens", type=int, default=8192)
    args = ap.parse_args()
    ids = evaluation_ids(models.load_tokenizer(Path(args.tokenizer_dir)), None, args.max_tokens)
    print(f"{'model':<32} {'ms / 512-token pass':>19} {'x float':>7} {'eval s':>7} {'x float':>7} {'decode tok/s':>12} {'x float':>7} {'PPL':>8}")
    base = None
    for path in args.models:
        session = load_session(path)
        ms = forward_ms(session, ids[:512])
        res = perplexity(session, ids)
        tps = decode_tokens_per_second(session, ids[:512])
        base = base or (ms, res.seconds, tps)
        name = str(Path(path).parent.name or path)[-32:]
        print(f"{name:<32} {ms:>19.1f} {ms / base[0]:>7.2f} {res.seconds:>7.1f} {res.seconds / base[1]:>7.2f} "
              f"{tps:>12.1f} {base[2] / tps:>7.2f} {res.perplexity:>8.3f}")
    print(f"{ids.size} held-out tokens (seq 512, stride 256); 'x float' is time over the float model's; onnxruntime {ort.__version__}, CPU threads = ORT default")


if __name__ == "__main__":
    main()
