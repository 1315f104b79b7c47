"""ONNX Runtime CPU speed of exported models side by side: the float model and torq exports.

For each model: the median time of one 512-token forward pass, the time to score the
held-out text (strided 512-token windows, as ``torq-onnx eval``) and, for models exported
with a KV cache, greedy decode tokens/s after a 512-token prefill (1 / the median of 64
steps), each with its ratio to the first model (the float one). Forward passes and decode
steps are timed round-robin across the models, so a machine whose speed drifts (a shared
VM) slows every model alike. With ``--custom-ops`` every model with online torq ops (those
the library compiles) also gets a row run with the compiled custom-op library (``NAME +lib``)
beside its function-body row. Run:
  python tools/bench_cpu_speed.py FLOAT.onnx QUANT.onnx [MORE.onnx ...] --tokenizer-dir DIR [--max-tokens 8192] [--custom-ops]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import calibration as calib
from torq_onnx import models
from torq_onnx.evaluate import evaluation_ids, logits_output, perplexity, round_robin
from torq_onnx.generate import greedy_decode_step
from torq_onnx.runtime_ops import DOMAIN, load_session
from torq_onnx.runtime_ops.functions import ONLINE_OPS


def forward_pass(session, ids: np.ndarray):
    feeds = calib.feeds_for_inputs(calib.input_specs(session), ids)
    out = logits_output(session)
    return lambda: session.run([out], feeds)


def has_online_ops(path: str) -> bool:
    """Whether the model runs a torq op the compiled library implements (packed weights alone,
    whose dequantization ORT folds, do not make a +lib row differ)."""
    import onnx

    return any(n.domain == DOMAIN and n.op_type in ONLINE_OPS for n in onnx.load(path, load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="the float model first")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--custom-ops", action="store_true", help="add a row per quantized model with the compiled op library")
    args = ap.parse_args()
    ids = evaluation_ids(models.load_tokenizer(Path(args.tokenizer_dir)), None, args.max_tokens)
    rows = [(str(Path(path).parent.name or path), path, False) for path in args.models]
    if args.custom_ops:  # a float model (plain, or a float export) has no online op: no library row for it
        rows = [r for name, path, _ in rows for r in ((name, path, False), (f"{name} +lib", path, True)) if not r[2] or has_online_ops(path)]
    sessions = [load_session(path, custom_ops=lib) for _, path, lib in rows]
    pass_ms = [1e3 * t for t in round_robin([forward_pass(s, ids[:512]) for s in sessions], rounds=7)]
    steps = [greedy_decode_step(s, ids[:512]) for s in sessions]
    step_s = iter(round_robin([st for st in steps if st], rounds=64))
    tps = [1 / next(step_s) if st else float("nan") for st in steps]
    print(f"{'model':<32} {'ms / 512-token pass':>19} {'x float':>7} {'eval s':>7} {'x float':>7} {'decode tok/s':>12} {'x float':>7} {'PPL':>8}")
    base = None
    for (name, _, _), session, ms, tok_s in zip(rows, sessions, pass_ms, tps):
        res = perplexity(session, ids)
        base = base or (ms, res.seconds, tok_s)
        name = name[-32:]
        print(f"{name:<32} {ms:>19.1f} {ms / base[0]:>7.2f} {res.seconds:>7.1f} {res.seconds / base[1]:>7.2f} "
              f"{tok_s:>12.1f} {base[2] / tok_s:>7.2f} {res.perplexity:>8.3f}")
    print(f"{ids.size} held-out tokens (seq 512, stride 256); 'x float' is time over the float model's; "
          f"pass and decode times round-robin; onnxruntime {ort.__version__}, CPU threads = ORT default")


if __name__ == "__main__":
    main()
