"""Generation's prefill with the logits of every position against the last position's only.

``torq-onnx generate`` loads its session with ``last_position_logits=True`` (the LM head runs
on the last position; :mod:`torq_onnx.last_logits`); ``eval`` needs every position's logits.
For prompts of several lengths, one prefill as ``generate`` runs it (``CachedDecoder.step``
on an empty cache: the last position's logits read on the host, the KV cache kept where the
session computes), in both sessions, timed round-robin (median of ``--rounds``), with the
logits each pass produces, and the check that both give the same next-token logits (their
largest difference) and the same KV cache (bit for bit).

Run: python tools/bench_prefill.py OUT/model.onnx --tokenizer-dir OUT/tokenizer
                                   [--tokens 128,512,2048] [--device cpu|cuda|cuda:N] [--custom-ops]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import models
from torq_onnx.evaluate import evaluation_ids, round_robin
from torq_onnx.generate import CachedDecoder
from torq_onnx.runtime_ops import load_session
from torq_onnx.runtime_ops.providers import device_providers


def as_numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def logits_itemsize(decoder: CachedDecoder) -> int:
    [out] = [o for o in decoder.session.get_outputs() if o.name == decoder.logits]
    return 2 if out.type == "tensor(float16)" else 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--tokens", default="128,512,2048", help="prompt lengths")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--custom-ops", action="store_true", help="run the torq ops as the compiled library")
    args = ap.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    ids = evaluation_ids(models.load_tokenizer(Path(args.tokenizer_dir)), None, max(lengths))
    providers = device_providers(args.device)
    decoders = [CachedDecoder(load_session(args.model, providers=providers, custom_ops=args.custom_ops or None, last_position_logits=last))
                for last in (False, True)]
    print(f"{args.model}, {args.device}, onnxruntime {ort.__version__}, {platform.machine()}; median of {args.rounds} prefills, round-robin")
    hdr = (f"{'prompt':>6} {'all positions ms':>16} {'logits MB':>9} {'last position ms':>16} {'logits MB':>9} {'speed-up':>8} "
           f"{'max |diff| next-token logits':>28} {'KV cache':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for t in lengths:
        prompt = ids[:t]
        steps = [lambda d=d: d.step(prompt, 0, d.empty_cache()) for d in decoders]
        full_s, last_s = round_robin(steps, args.rounds)
        (full_logits, full_cache), (last_logits, last_cache) = (step() for step in steps)
        row_mb = full_logits.size * logits_itemsize(decoders[0]) / 2**20
        same_cache = all(np.array_equal(as_numpy(a), as_numpy(b)) for a, b in zip(full_cache, last_cache))
        print(f"{t:>6} {1e3 * full_s:>16.1f} {t * row_mb:>9.3g} {1e3 * last_s:>16.1f} {row_mb:>9.3g} "
              f"{full_s / last_s:>7.2f}x {float(np.abs(full_logits - last_logits).max()):>28.3g} "
              f"{'same' if same_cache else 'DIFFERS':>9}")
    print("logits MB: what one prefill's logits output holds (on a GPU session, also what is copied to the host)")


if __name__ == "__main__":
    main()
