"""``torq-onnx`` command line: export | eval | generate | inspect | build-ops."""

from __future__ import annotations

import json
import signal
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from torq_onnx.defaults import (
    DEFAULT_METHOD,
    DEFAULT_WEIGHT_ROUNDING,
    METHODS,
    SCALE_RULES,
    SOURCE_DTYPES,
    WEIGHT_MODES,
    WEIGHT_ROUNDINGS,
)
from torq_onnx.errors import TorqError

# typed choices: validated before any work starts, and listed by --help
Method = Enum("Method", {m.replace("-", "_"): m for m in METHODS}, type=str)
WeightRounding = Enum("WeightRounding", {r: r for r in WEIGHT_ROUNDINGS}, type=str)
ScaleRule = Enum("ScaleRule", {r: r for r in SCALE_RULES}, type=str)
SourceDtype = Enum("SourceDtype", {d: d for d in SOURCE_DTYPES}, type=str)
WeightMode = Enum("WeightMode", {m: m for m in WEIGHT_MODES}, type=str)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TORQ rotations + MXFP4 quantization for ONNX models.")
err = Console(stderr=True)


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _print_version(value: bool) -> None:
    if value:
        from torq_onnx import __version__

        ort = next((f"{d} {v}" for d in ("onnxruntime", "onnxruntime-gpu") if (v := _dist_version(d))), "no onnxruntime")
        typer.echo(f"torq-onnx {__version__} ({ort})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version (and onnxruntime's) and exit")) -> None:
    """Options before the command: --version."""


def _custom_ops_option():
    """eval's and generate's --custom-ops."""
    return typer.Option(False, help="Run the torq ops as the compiled custom-op library (see build-ops; built "
                        "and cached on first use) instead of their ONNX function bodies")


def _device_option():
    """eval's and generate's --device."""
    return typer.Option("cpu", metavar="cpu|cuda[:N]",
                        help="Where ONNX Runtime runs the model: cpu, or cuda / cuda:N (its CUDA execution provider on GPU 0 / N: "
                        "needs onnxruntime-gpu in place of onnxruntime; with --custom-ops the library's CUDA build, which needs nvcc)")


def _fail(exc: Exception) -> None:
    """One line, exit 2. An OSError (disk full, no permission) prints as the system's own
    message with the file it names."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}")  # a path in it may hold [brackets]
    raise typer.Exit(2)


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help="Local HF model folder, .onnx or .gguf file, or a packaged model: smollm2-135m (default), all-minilm-l6-v2"),
    out: Path = typer.Option(Path("torq-out"), "-o", "--out", help="Output folder (written atomically)"),
    method: Method = typer.Option(DEFAULT_METHOD, help="Activation transform: wush (data-aware per-block transform, the most accurate); "
                                  "torq (the paper's algorithm); torq-wush (TORQ's inter-block rotation, then WUSH per block); "
                                  "brq (block Hadamard); quarot; rtn (none)"),
    weight_rounding: WeightRounding = typer.Option(DEFAULT_WEIGHT_ROUNDING, help="MXFP4 weight rounding: gptq (error-compensating, "
                                                   "uses the calibrated input moment) or rtn (round-to-nearest)"),
    scale_search: bool = typer.Option(True, help="Weights: per block, keep the best of the exponents e-1, e, e+1"),
    act_order: bool = typer.Option(True, help="GPTQ: sweep MX blocks by input energy"),
    calib_samples: int = typer.Option(128, help="Calibration windows"),
    seq_len: int = typer.Option(512, help="Tokens per calibration window"),
    weights: WeightMode = typer.Option("mxfp4", help="mxfp4 (packed) | fake | float"),
    activations: str = typer.Option("mxfp4", help="mxfp4 | float (rotate only)"),
    scale_rule: ScaleRule = typer.Option("floor", help="MX scale rule: floor (OCP) | even | rceil"),
    text: Optional[str] = typer.Option(None, help="Calibration text file (default: built-in English corpus)"),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder for a bare .onnx model"),
    dtype: Optional[SourceDtype] = typer.Option(None, help="Graph dtype for an HF or GGUF source: fp32 (default; exact for "
                                                "bfloat16 checkpoints) | fp16. ONNX Runtime's CPU provider has no bfloat16 "
                                                "kernels; an ONNX source keeps its dtype"),
    plot_site: Optional[str] = typer.Option(None, help="Site to plot (activation/layer name or index; default: most uneven blocks)"),
    output_guard: bool = typer.Option(False, help="torq: per site, keep whichever of torq / torq-no-inter / torq-no-intra / brq "
                                      "has the lowest layer-output error on the calibration tokens"),
    inter_min_spread: float = typer.Option(0.0, help="torq: equalize blocks (R_inter) only at sites whose block-variance "
                                           "spread (max/mean) is at least this; 0 = everywhere, as in the paper"),
    intra_refine: bool = typer.Option(True, help="torq: refine R_intra by max-entropy Givens rotations (off: 32x32 Hadamard)"),
    quiet: bool = typer.Option(False, help="No progress bars"),
) -> None:
    """Rotate, fold and quantize MODEL; write OUT/model.onnx and OUT/report.json."""
    from torq_onnx.pipeline import ExportOptions
    from torq_onnx.pipeline import export as run_export

    try:
        if activations not in ("mxfp4", "float"):
            raise TorqError(f"--activations must be mxfp4 or float, got {activations!r}")
        opts = ExportOptions(method=method.value, calib_samples=calib_samples, seq_len=seq_len, weights=weights.value,
                             quantize_activations=activations == "mxfp4", scale_rule=scale_rule.value, progress=not quiet,
                             weight_rounding=weight_rounding.value, scale_search=scale_search, act_order=act_order,
                             plot_site=plot_site, output_guard=output_guard,
                             solver_options={"inter_min_spread": inter_min_spread, "intra_refine": intra_refine})
        path = run_export(model, out, opts, text_path=text, tokenizer_dir=tokenizer, dtype=dtype.value if dtype else None)
    except (TorqError, ValueError, OSError) as exc:
        _fail(exc)
    report = json.loads((path.parent / "report.json").read_text())
    s = report["summary"]
    Console().print(
        f"wrote [bold]{path}[/] ({s['sites']} rotation sites, {s['linear_layers']} linear layers); "
        f"activation MXFP4 error {s['mean_activation_quant_error']['before']:.4f} -> {s['mean_activation_quant_error']['after']:.4f}; "
        f"layer output error {s['mean_layer_output_error']['before']:.4f} -> {s['mean_layer_output_error']['after']:.4f}"
    )


@app.command("eval")
def eval_cmd(
    model_onnx: Path = typer.Argument(..., help="An ONNX causal LM (model.onnx or its folder), float or torq-exported"),
    text: Optional[str] = typer.Option(None, help="Text file; its last 25% is scored (default: built-in English corpus)"),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder (default: next to the model)"),
    seq_len: int = typer.Option(512, help="Tokens per window"),
    stride: int = typer.Option(256, help="New (scored) tokens per window; the rest is context"),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N held-out tokens"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here"),
    reference: Optional[str] = typer.Option(None, help="Float model to compare with (a MODEL as for export, e.g. smollm2-135m): "
                                            "adds KL divergence and top-1 agreement"),
    custom_ops: bool = _custom_ops_option(),
    device: str = _device_option(),
    quiet: bool = typer.Option(False, help="No progress bar"),
) -> None:
    """Perplexity of MODEL_ONNX in ONNX Runtime on held-out text (strided windows)."""
    from torq_onnx.evaluate import evaluate_model
    from torq_onnx.runtime_ops.providers import device_providers
    from torq_onnx.atomic import check_output_file, write_text_atomic

    try:
        if json_out is not None:
            check_output_file(json_out)  # before the evaluation, not after it
        res = evaluate_model(model_onnx, text, tokenizer, seq_len, stride, max_tokens, progress=not quiet, reference=reference,
                             providers=device_providers(device), custom_ops=custom_ops)
        if json_out is not None:
            write_text_atomic(json_out, json.dumps(res.as_dict(), indent=2))
    except (TorqError, ValueError, OSError) as exc:
        _fail(exc)
    Console().print(
        f"perplexity [bold]{res.perplexity:.3f}[/] over {res.scored_tokens} tokens "
        f"({res.windows} windows of {res.seq_len}, stride {res.stride}; {res.seconds:.1f} s)"
    )
    if res.kl_divergence is not None:
        Console().print(f"vs reference: mean KL [bold]{res.kl_divergence:.4f}[/] nats/token (p99 {res.kl_divergence_p99:.3f}), "
                        f"top-1 agreement [bold]{res.top1_agreement * 100:.2f}%[/]")
    for warning in res.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="An exported decoder (OUT folder or its model.onnx), with tokenizer/ beside it"),
    prompt: str = typer.Argument(..., help="The text to continue"),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate at most (stops earlier at end-of-sequence)"),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; else sample from softmax(logits / T)"),
    top_p: float = typer.Option(1.0, max=1.0, help="Sample only from the most likely tokens holding this much mass"),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling"),
    custom_ops: bool = _custom_ops_option(),
    device: str = _device_option(),
) -> None:
    """Generate text with the KV cache in ONNX Runtime, streamed; prints prefill and decode speed."""
    from torq_onnx.generate import SamplingOptions, generate as run_generation
    from torq_onnx.runtime_ops.providers import device_providers

    out = Console(highlight=False)
    try:
        res = run_generation(model_dir, prompt, SamplingOptions(max_new_tokens, temperature, top_p, seed),
                             providers=device_providers(device),
                             on_text=lambda piece: out.print(piece, end="", markup=False, soft_wrap=True), custom_ops=custom_ops)
    except (TorqError, ValueError, OSError) as exc:
        _fail(exc)
    out.print()
    err.print(f"prefill: {res.prompt_tokens} tokens, {res.prefill_tokens_per_second:.1f} tokens/s; "
              f"decode: {len(res.tokens)} tokens, {res.decode_tokens_per_second:.1f} tokens/s")


@app.command()
def inspect(model_onnx: Path = typer.Argument(..., help="An exported model.onnx (or any ONNX model), or an export's folder")) -> None:
    """Summarize an ONNX model without loading its weights.

    The export's settings, the torq ops, the transforms' shapes, inputs and outputs, weight
    sizes by kind, and its files."""
    from torq_onnx.summary import summarize

    try:
        rows = summarize(model_onnx)
    except TorqError as exc:
        _fail(exc)
    table = Table(title=f"{model_onnx}")
    table.add_column("field")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


@app.command("build-ops")
def build_ops(
    cuda: bool = typer.Option(False, help="Also build the CUDA execution provider's kernel (needs nvcc)"),
    ort_include: Optional[Path] = typer.Option(None, help="ONNX Runtime's C API headers (an ORT release's include folder; default: "
                                               "$TORQ_ORT_INCLUDE, else fetched once from the npm registry)"),
    kernel: Optional[str] = typer.Option(None, help="CUDA: the fused kernel (thread | warp; default thread)"),
    arch: Optional[list[str]] = typer.Option(None, help="CUDA: GPU architectures to build for (repeatable; default: "
                                             "sm_80 and sm_90)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the library here (default: the cache, reused while "
                                       "nothing changes)"),
    genai: Optional[Path] = typer.Option(None, help="An export folder: copy the library into it and name it in its "
                                         "genai_config.json, so onnxruntime-genai runs the compiled ops"),
) -> None:
    """Build the compiled torq custom-op library and print its path.

    Load it with SessionOptions.register_custom_ops_library(PATH), or pass --custom-ops to
    eval/generate, or bundle it into an export for onnxruntime-genai with --genai OUT."""
    from torq_onnx.genai import bundle_config, bundle_custom_ops
    from torq_onnx.runtime_ops import compiled

    try:
        if genai is not None:
            bundle_config(genai)  # a wrong folder is named before a build that can take minutes
        path = compiled.build_library(cuda=cuda, include=ort_include, kernel=kernel, archs=tuple(arch) if arch else None,
                                      output=out)
        if genai is not None:
            path = bundle_custom_ops(genai, path)
    except (TorqError, ValueError, OSError) as exc:
        _fail(exc)
    Console(highlight=False, soft_wrap=True).print(str(path))  # a path to copy: never wrapped


def _unwind_on_termination(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """The ``torq-onnx`` command. SIGTERM and SIGHUP (a CI timeout, ``kill``, a container
    stop, a closed terminal) unwind the program as Ctrl-C does, so the temporary folders an
    export works in (a copy of the model each, 1.7 GB for SmolLM2 in all) are removed, the
    conversion child process is stopped and no partial output is left; by default Python
    would die on the spot and leave them all behind."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _unwind_on_termination)
    app()
