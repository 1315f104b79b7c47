"""Where an ONNX model's time goes in ONNX Runtime: per-op-type totals from ORT's profiler.

Runs a few 512-token forward passes of model.onnx (random token ids) with profiling on and
prints, per (op type, execution provider), the node count per pass, the total time per pass
and its share. Run: python tools/profile_session.py MODEL.onnx [--provider CUDAExecutionProvider]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import calibration as calib
from torq_onnx.runtime_ops import register


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    opts = register()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "torq_profile")
    sess = ort.InferenceSession(args.model, sess_options=opts, providers=[args.provider])
    specs = calib.input_specs(sess)
    vocab = 1000
    feeds = calib.feeds_for_inputs(specs, np.random.default_rng(0).integers(0, vocab, args.tokens))
    sess.run(None, feeds)  # warm-up, excluded below
    for _ in range(args.passes):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cutoff = runs[0]["ts"] + runs[0]["dur"] if runs else 0  # skip the warm-up pass
    per = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
            key = (e["args"].get("op_name", "?"), e["args"].get("provider", "?"))
            per[key][0] += 1
            per[key][1] += e["dur"] / 1e3
    total = sum(v[1] for v in per.values())
    wall = np.median([r["dur"] for r in runs[1:]]) / 1e3 if len(runs) > 1 else float("nan")
    print(f"{args.model} on {args.provider}: {wall:.1f} ms per {args.tokens}-token pass (median), kernels {total / args.passes:.1f} ms")
    print(f"{'op type':<28} {'provider':<24} {'nodes':>6} {'ms/pass':>8} {'share':>6}")
    for (op, prov), (n, ms) in sorted(per.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{op:<28} {prov:<24} {n // args.passes:>6} {ms / args.passes:>8.2f} {100 * ms / total:>5.1f}%")


if __name__ == "__main__":
    main()
