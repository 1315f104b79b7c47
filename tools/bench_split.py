"""The split runner's own cost against the whole graph, in one run of this script.

Rows, each one ``model.onnx`` run on the same 512-token window, each in a fresh process
(so a row's peak memory is its own, and no row's threads or arenas weigh on another):
  whole graph       one ORT session, the op as its inlined ONNX function
  naive split       segments cut in exported order, with ORT's session defaults: thread
                    pools that spin, an arena per session
  + no spinning     the same cut, thread pools that sleep when idle
  + recompute       segments that recompute the constant and shape values they read
  split             + one arena shared by all segment sessions: SplitSession's default
For each: segments per pass, the values crossing between segments (dequantized weights,
shape values, data tensors), the median and the fastest of the timed forward passes after
a warm-up one, the peak RSS of the process, and the largest logit difference from the
whole graph. CPU: the kernel is the op's ONNX function, so every split row must be
bit-identical to the whole graph. ``--device cuda`` (onnxruntime-gpu and CuPy): the whole
graph on the CUDA EP against split runs with the fused CuPy kernel; the "split" row then
also turns the shared arena on, which is off by default on CUDA.

Run: python tools/bench_split.py OUT/model.onnx [--device cpu|cuda] [--passes 5] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = {  # name: (recompute, spinning, shared arena); None: the whole graph
    "whole graph": None,
    "naive split": (False, True, False),
    "+ no spinning": (False, False, False),
    "+ recompute": (True, False, False),
    "split": (True, False, True),
}


def build(row: str, path: str, device: str):
    import onnxruntime as ort

    from torq_onnx.runtime_ops import load_session
    from torq_onnx.runtime_ops.split_runner import SPINNING_KEYS, SplitSession, ort_function_kernel

    if ROWS[row] is None:
        return load_session(path, providers=["CUDAExecutionProvider"] if device == "cuda" else None)
    recompute, spinning, shared = ROWS[row]
    opts = ort.SessionOptions()
    for key in SPINNING_KEYS:
        opts.add_session_config_entry(key, "1" if spinning else "0")
    # on CPU the op's one-node sessions are set up like the segments
    kernel = None if device == "cuda" else ort_function_kernel(opts, shared)
    return SplitSession(path, kernel=kernel, device=device, sess_options=opts, recompute=recompute, shared_arena=shared)


def measure(row: str, path: str, device: str, tokens: int, passes: int, logits_file: str) -> dict:
    """One row, in this process: times, peak RSS, crossing values; the logits go to ``logits_file``."""
    import onnx

    from torq_onnx import calibration as calib
    from torq_onnx.evaluate import logits_output
    from torq_onnx.runtime_ops.segments import Segment, crossing_values
    from torq_onnx.runtime_ops.split_runner import SplitSession

    session = build(row, path, device)
    ids = np.random.default_rng(0).integers(0, 1000, tokens).astype(np.int64)
    feeds = calib.feeds_for_inputs(calib.input_specs(session), ids)
    out = logits_output(session)
    times = []
    for k in range(passes + 1):  # pass 0 warms up
        t = time.perf_counter()
        logits = session.run([out], feeds)[0]
        if k:
            times.append(time.perf_counter() - t)
    counts = [1, 0, 0, 0]
    if isinstance(session, SplitSession):
        crossing = crossing_values(onnx.load(path, load_external_data=False), session.parts)
        counts = [sum(isinstance(p, Segment) for p in session.parts), *(len(crossing[k]) for k in ("constant", "shape", "data"))]
    np.save(logits_file, logits)
    return {"ms": float(np.median(times)) * 1e3, "min_ms": min(times) * 1e3, "counts": counts,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # a child process: measure one row
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        json.dump(measure(args.row, args.model, args.device, args.tokens, args.passes, args.logits), sys.stdout)
        return
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, row in enumerate(ROWS):
            file = os.path.join(tmp, f"{k}.npy")
            cmd = [sys.executable, __file__, args.model, "--device", args.device, "--passes", str(args.passes),
                   "--tokens", str(args.tokens), "--row", row, "--logits", file]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{row}: {res.stderr.strip()[-2000:]}")
            results[row], logits[row] = json.loads(res.stdout), np.load(file)
    reference = logits["whole graph"]
    base = results["whole graph"]["ms"]
    print(f"{'run':<14} {'segments':>8} {'const':>6} {'shape':>6} {'data':>6} {'ms / pass':>10} {'fastest':>8} {'x whole':>8} "
          f"{'peak RSS MB':>11} {'max |diff|':>11}")
    diffs = {}
    for row, r in results.items():
        diffs[row] = float(np.max(np.abs(logits[row] - reference)))
        c = r["counts"]
        print(f"{row:<14} {c[0]:>8} {c[1]:>6} {c[2]:>6} {c[3]:>6} {r['ms']:>10.1f} {r['min_ms']:>8.1f} {r['ms'] / base:>8.2f} "
              f"{r['rss_mb']:>11.0f} {diffs[row]:>11.3g}")
    import onnxruntime as ort

    kernel = "fused CuPy kernel" if args.device == "cuda" else "the op's ONNX function"
    print(f"{args.tokens} tokens, median of {args.passes} passes after a warm-up, each row in its own process; op between "
          f"segments: {kernel}; {args.device}, {os.cpu_count()} cores; onnxruntime {ort.__version__}")
    if args.device == "cpu" and any(diffs.values()):
        raise SystemExit("a CPU split run differs from the whole graph")


if __name__ == "__main__":
    main()
