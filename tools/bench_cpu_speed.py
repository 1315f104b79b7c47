"""ONNX Runtime CPU speed of exported models side by side: the float model and torq exports.

For each model: the median time of one 512-token forward pass and the time to score the
held-out text (strided 512-token windows, as ``torq-onnx eval``), with the ratio to the
first model (the float one). Run:
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
from torq_onnx.evaluate import evaluation_ids, logits_output, perplexity
from torq_onnx.runtime_ops import load_session


def pass_ms(session, ids: np.ndarray, repeat: int = 5) -> float:
    feeds = calib.feeds_for_inputs(calib.input_specs(session), ids)
    out = logits_output(session)
    session.run([out], feeds)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run([out], feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="the float model first")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--max-tokens", type=int, default=8192)
    args = ap.parse_args()
    ids = evaluation_ids(models.load_tokenizer(Path(args.tokenizer_dir)), None, args.max_tokens)
    print(f"{'model':<40} {'ms / 512-token pass':>19} {'x float':>7} {'eval s':>7} {'x float':>7} {'PPL':>8}")
    base = None
    for path in args.models:
        session = load_session(path)
        ms = pass_ms(session, ids[:512])
        res = perplexity(session, ids)
        base = base or (ms, res.seconds)
        name = str(Path(path).parent.name or path)[-40:]
        print(f"{name:<40} {ms:>19.1f} {ms / base[0]:>7.2f} {res.seconds:>7.1f} {res.seconds / base[1]:>7.2f} {res.perplexity:>8.3f}")
    print(f"{ids.size} held-out tokens (seq 512, stride 256); onnxruntime {ort.__version__}, CPU threads = ORT default")


if __name__ == "__main__":
    main()
