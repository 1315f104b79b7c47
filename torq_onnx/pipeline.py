"""The export pipeline: float ONNX model -> rotated, MXFP4-quantized ONNX model + report.json."""

from __future__ import annotations

import json
import numbers
import resource
import tempfile
import time
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassError, Sequential
from tqdm.auto import tqdm

from torq_onnx import __version__, mxfp4, torq
from torq_onnx import calibration as calib
from torq_onnx import genai, heap, models, plots, text
from torq_onnx.atomic import check_output_folder, refuse_inputs_inside
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
from torq_onnx.passes import (
    Calibrate,
    ExportContext,
    Finalize,
    FindLinearInputs,
    FoldRotations,
    InsertRotateQuantize,
    NameNodes,
    QuantizeWeights,
    SolveRotations,
    save_atomic,
)
from torq_onnx.passes.context import EXTERNAL_MIN_BYTES, external_weights_folder
from torq_onnx.passes.finalize import MODEL_FILES


@dataclass
class ExportOptions:
    method: str = DEFAULT_METHOD
    calib_samples: int = 128
    seq_len: int = 512
    weights: str = "mxfp4"  # mxfp4 | fake | float
    quantize_activations: bool = True
    scale_rule: mxfp4.ScaleRule = "floor"
    include_lm_head: bool = False
    reservoir_tokens: int | None = None  # per-site token sample; None: 2048 where the solver fits it, else 512 (report only)
    seed: int = 0
    progress: bool = True
    plot_site: str | int | None = None  # site plotted next to report.json, by name or index (default: most uneven blocks)
    solver_options: dict = field(default_factory=dict)  # torq.solve_rotation keywords, e.g. inter_block=False
    output_guard: bool = False  # torq: per site keep the lowest layer-output error of torq and its ablations / brq
    calib_sample_seed: int | None = None  # None: calibration windows evenly spread; else a random choice
    weight_rounding: str = DEFAULT_WEIGHT_ROUNDING  # rtn | gptq
    scale_search: bool = True  # weights: per block try exponents e-1, e, e+1, keep the lowest error
    act_order: bool = True  # gptq: sweep MX blocks by input energy

    collect_hessian: bool = False  # collect the full input moments even if this export does not need them

    def validate(self) -> None:
        """Raise a TorqError naming the first bad option, as ``torq-onnx export`` spells it;
        :func:`export` calls this before any work."""
        self._check_types()
        for flag, value, allowed in (("--method", self.method, METHODS), ("--weights", self.weights, WEIGHT_MODES),
                                     ("--scale-rule", self.scale_rule, SCALE_RULES),
                                     ("--weight-rounding", self.weight_rounding, WEIGHT_ROUNDINGS)):
            if value not in allowed:
                raise TorqError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.calib_samples < 1 or self.seq_len < 1:
            raise TorqError("--calib-samples and --seq-len must be positive")
        unknown = sorted(set(self.solver_options) - set(torq.SOLVER_OPTIONS))
        if unknown:
            raise TorqError(f"unknown solver option(s) {', '.join(unknown)}; the solver takes {', '.join(torq.SOLVER_OPTIONS)}")
        if self.method != "torq" and (self.output_guard or not self.solver_options.get("intra_refine", True)):
            raise TorqError(f"--output-guard and --no-intra-refine apply to --method torq only (got --method {self.method})")
        if self.method not in ("torq", "torq-wush") and self.solver_options.get("inter_min_spread", 0.0):
            raise TorqError(f"--inter-min-spread applies to --method torq and torq-wush only (got --method {self.method})")

    def _check_types(self) -> None:
        """Each field of the type it is declared with (the Python API takes any value; the CLI
        has parsed them already), so that a ``calib_samples="8"`` is named here rather than
        failing as a TypeError deep inside."""
        hints = typing.get_type_hints(type(self), {"mxfp4": mxfp4})
        for f in fields(self):
            value, allowed = getattr(self, f.name), _value_types(hints[f.name])
            if not any(_is_a(value, t) for t in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise TorqError(f"export option {f.name} must be {names}, got {value!r}")

    def reservoir_capacity(self) -> int:
        """Tokens kept per site: torq fits its intra-block rotation on them; the other methods
        only report statistics on them, and 512 tokens x D values is plenty for that."""
        if self.reservoir_tokens is not None:
            return self.reservoir_tokens
        return 2048 if self.method in torq.FITS_ON_SAMPLES else 512

    def needs_hessian(self) -> bool:
        """Whether calibration must collect each site's full D x D input moment."""
        return self.collect_hessian or self.method in torq.NEEDS_HESSIAN or (self.weight_rounding == "gptq" and self.weights != "float")


def _value_types(hint) -> tuple[type, ...]:
    """The runtime types a field's annotation allows: ``int | None`` -> (int, NoneType),
    ``Literal["floor", ...]`` -> (str,), ``dict`` -> (dict,)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _value_types(arg))
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    return (origin or hint,)


def _is_a(value, t: type) -> bool:
    """``isinstance`` for an option's declared type, numpy scalars included (an ``np.int64``
    count is an int), and a bool never a number (an option that counts something)."""
    if t is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if t is int:
        return isinstance(value, numbers.Integral)
    if t is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, t)


def _bar(enabled: bool, desc: str, total: int | None = None):
    return lambda it: tqdm(it, desc=desc, total=total, disable=not enabled, leave=False)


def _run(model: ir.Model, *passes) -> None:
    try:
        Sequential(*passes)(model)
    except PassError as exc:  # onnx-ir wraps pass failures: surface the user-facing cause
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, TorqError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        inner: BaseException = exc
        while inner.__cause__ is not None:
            inner = inner.__cause__
        raise TorqError(f"{type(inner).__name__}: {inner}") from exc  # the root cause, not onnx-ir's wrapper


def calibrate(model: ir.Model, batches: Iterable[dict[str, np.ndarray]], opts: ExportOptions, n_batches: int | None = None) -> ExportContext:
    """Name nodes, find the rotation sites and calibrate them (the method-independent half)."""
    ctx = ExportContext()
    _run(model, NameNodes(), FindLinearInputs(ctx, include_lm_head=opts.include_lm_head))
    if opts.plot_site is not None:  # a site that does not exist fails now, not after the export's work
        plots.choose_site({"sites": [{"activation": s.activation, "layers": s.layers} for s in ctx.sites]}, opts.plot_site)
    _run(
        model,
        Calibrate(ctx, batches, reservoir_tokens=opts.reservoir_capacity(), seed=opts.seed, progress=_bar(opts.progress, "calibrate", n_batches),
                  hessian=opts.needs_hessian()),
    )
    return ctx


def transform(model: ir.Model, ctx: ExportContext, opts: ExportOptions) -> None:
    """Solve, fold, quantize and insert the online ops in place. ``ctx`` comes from
    :func:`calibrate` on this model or on another load of the same file."""
    _run(
        model,
        NameNodes(),  # deterministic: a fresh load of the same file gets the same names
        SolveRotations(ctx, opts.method, opts.scale_rule, opts.seed, progress=_bar(opts.progress, f"solve ({opts.method})"),
                       solver_options=opts.solver_options, quantize_weights=opts.weights != "float",
                       quantize_activations=opts.quantize_activations, output_guard=opts.output_guard),
        FoldRotations(ctx),
        QuantizeWeights(ctx, opts.weights, opts.scale_rule, rounding=opts.weight_rounding, scale_search=opts.scale_search,
                        act_order=opts.act_order),
        InsertRotateQuantize(ctx, opts.quantize_activations, opts.scale_rule),
        Finalize({"method": opts.method, "scale_rule": opts.scale_rule, "weights": opts.weights,
                  "weight_rounding": opts.weight_rounding if opts.weights != "float" else "none",
                  "activations": "mxfp4" if opts.quantize_activations else "float", "version": __version__,
                  "output_guard": opts.output_guard and opts.method == "torq"}),
    )


def rewrite(model: ir.Model, batches: Iterable[dict[str, np.ndarray]], opts: ExportOptions, n_batches: int | None = None) -> ExportContext:
    """The whole pass sequence, in place on ``model``; returns the context (sites, report data)."""
    ctx = calibrate(model, batches, opts, n_batches)
    transform(model, ctx, opts)
    return ctx


def build_report(ctx: ExportContext, opts: ExportOptions, timings: dict[str, float], source: str) -> dict:
    sites = [s.report for s in ctx.sites]
    mean = lambda key, when: float(np.mean([r[key][when] for r in sites]))  # noqa: E731
    return {
        "torq_onnx_version": __version__,
        "source": source,
        "options": asdict(opts),
        "summary": {
            "sites": len(sites),
            "linear_layers": sum(len(s.consumers) for s in ctx.sites),
            "mean_activation_quant_error": {"before": mean("activation_quant_error", "before"), "after": mean("activation_quant_error", "after")},
            "mean_codebook_entropy_bits": {"before": mean("codebook_entropy_bits", "before"), "after": mean("codebook_entropy_bits", "after")},
            "mean_block_variance_spread": {"before": mean("block_variance_spread", "before"), "after": mean("block_variance_spread", "after")},
            "mean_layer_output_error": {"before": mean("layer_output_error", "before"), "after": mean("layer_output_error", "after")},
        },
        "timings_s": timings,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "skipped_layers": ctx.skipped,
        "sites": sites,
    }


def load_ir(path: Path) -> ir.Model:
    try:
        return ir.load(str(path))
    except Exception as exc:
        raise TorqError(f"could not read ONNX model {path}: {exc}") from None


WORKING_WEIGHTS = "weights.data"


def load_working_copy(path: Path, work_dir: Path) -> ir.Model:
    """``path`` loaded with its weights as memory-mapped external data in ``work_dir`` (or
    where they already are, for a model saved with all its weights external).

    The passes then hold one layer's weights at a time, and the calibration session maps
    the same file, so the export never keeps a second in-memory copy of the model."""
    model = load_ir(path)
    if external_weights_folder(model) is not None:
        return model
    ir.external_data.unload_from_model(model, work_dir, WORKING_WEIGHTS, size_threshold_bytes=EXTERNAL_MIN_BYTES, alignment=4096)
    ir.save(model, work_dir / "model.onnx")
    del model  # frees the source proto, which the in-memory tensors pinned
    heap.trim()
    return load_ir(work_dir / "model.onnx")


def calibration_text(text_path: str | None) -> str:
    """The calibration part of the text (the rest is held out for ``eval``)."""
    return text.read_corpus(text_path).calibration


def calibration_windows(model_ir: ir.Model, ids: np.ndarray, opts: ExportOptions) -> list[dict[str, np.ndarray]]:
    """Feed dicts of ``opts.calib_samples`` windows of the calibration token ids."""
    specs = calib.input_specs(model_ir)
    return [calib.feeds_for_inputs(specs, w) for w in calib.token_windows(ids, opts.seq_len, opts.calib_samples, opts.calib_sample_seed)]


def model_facts(model_ir: ir.Model, hf_dir: Path | None) -> dict:
    """What users of the export need to know about the source: its context length (from
    the HF config, when there is one) and whether the graph takes a KV cache."""
    facts: dict = {"kv_cache": any(calib.is_past_input(v.name) for v in model_ir.graph.inputs)}
    config = hf_dir / "config.json" if hf_dir is not None else None
    if config is not None and config.is_file():
        n = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(n, int):
            facts["context_length"] = n
    return facts


def export_report(folder: Path) -> dict | None:
    """The report.json of an earlier torq-onnx export in ``folder`` (it names our version), or
    None where ``folder`` holds none."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "torq_onnx_version" in report else None


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier torq-onnx export, which a new export to the same
    folder may replace."""
    return export_report(folder) is not None


def written_paths(extras: dict[str, object]) -> list[str]:
    """What an export writes, as report.json's ``files`` lists it: the model files and every
    extra, and for an extra that is a folder (tokenizer/) the folder as ``name/`` and each
    path inside it (POSIX, relative to OUT; folders again with a trailing ``/``)."""
    paths = {*MODEL_FILES}
    for name, obj in extras.items():
        if isinstance(obj, Path) and obj.is_dir():
            paths.add(f"{name}/")
            paths.update(f"{name}/{p.relative_to(obj).as_posix()}{'/' if p.is_dir() else ''}" for p in obj.rglob("*"))
        else:
            paths.add(name)
    return sorted(paths)


def added_entries(folder: Path) -> list[str]:
    """The paths in an earlier export's folder that the export did not write (files a user
    put there, also inside its tokenizer/), by the list its report.json keeps; none known for
    an export without one, or for a folder that holds no export. A folder the list names
    without a trailing ``/`` (lists of top-level entries only) counts as written whole."""
    written = (export_report(folder) or {}).get("files")
    if not isinstance(written, list):
        return []
    listed = set(written)
    added: list[str] = []

    def walk(d: Path, prefix: str) -> None:
        for p in sorted(d.iterdir()):
            rel = prefix + p.name
            if rel in listed:
                continue
            if p.is_dir() and not p.is_symlink() and rel + "/" in listed:
                walk(p, rel + "/")
            else:
                added.append(rel)  # a folder the export did not write is named once, not file by file

    walk(folder, "")
    return added


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` made absolute, once it is known that an export may be written there."""
    p = check_output_folder(out_dir, is_export_folder, "an earlier torq-onnx export")
    added = added_entries(p) if p.is_dir() else []
    if added:
        names = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise TorqError(f"output folder {out_dir} is an earlier export that also holds what it did not write ({names}): "
                        "the output replaces its folder whole, so move those out or give another folder")
    return p


def write_output(model_ir: ir.Model, out_dir: str | Path, tokenizer_files: Path, report: dict, opts: ExportOptions,
                 hf_dir: Path | None = None) -> Path:
    """Atomically write OUT/model.onnx, report.json, the two site plots and tokenizer/ (a copy
    of ``tokenizer_files``, a saved tokenizer); for a KV-cache decoder also genai_config.json
    and the tokenizer files beside model.onnx, so onnxruntime-genai can load OUT as it is."""
    out_dir = check_out_dir(out_dir)  # again: the folder may have changed during the export
    site = plots.choose_site(report, opts.plot_site)
    pngs = plots.site_plots(site, opts.method)
    report["plots"] = {"site": site["activation"], "layers": site["layers"], "files": sorted(pngs)}
    extras: dict[str, object] = {"report.json": report, **pngs, "tokenizer": tokenizer_files}
    config = genai.genai_config(model_ir, hf_dir)
    if config is not None:
        extras[genai.CONFIG_FILE] = config
        extras.update({f: (tokenizer_files / f).read_bytes() for f in genai.TOKENIZER_FILES if (tokenizer_files / f).is_file()})
    # what this export writes, so that a later export into OUT can tell a user's files from its own
    report["files"] = written_paths(extras)
    return save_atomic(model_ir, out_dir, extras)


def export(model: str | Path | None, out_dir: str | Path, opts: ExportOptions | None = None, text_path: str | Path | None = None,
           tokenizer_dir: str | Path | None = None, dtype: str | None = None) -> Path:
    """``torq-onnx export``: MODEL (.onnx, .gguf, HF folder, packaged name, or None for the
    default) -> OUT_DIR. ``dtype`` (fp32 | fp16) is the graph dtype of an HF or GGUF source."""
    opts = opts or ExportOptions()
    # paths as strings: they go into report.json as the user gave them
    model, text_path, tokenizer_dir = (None if a is None else str(a) for a in (model, text_path, tokenizer_dir))
    t0 = time.perf_counter()
    # options, inputs and output checked first: a mistake must not cost a model conversion
    opts.validate()
    if dtype not in (None, *SOURCE_DTYPES):
        raise TorqError(f"--dtype must be one of {', '.join(SOURCE_DTYPES)}, got {dtype!r}")
    out_dir = check_out_dir(out_dir)
    refuse_inputs_inside(out_dir, {"the model": model, "--text": text_path, "--tokenizer": tokenizer_dir})
    corpus = text.read_corpus(text_path)
    if tokenizer_dir is not None:
        models.require_tokenizer_dir(Path(tokenizer_dir))
    src = models.resolve(model, dtype)
    try:
        with tempfile.TemporaryDirectory(prefix="torq-work-") as work:
            t_export = time.perf_counter() - t0
            tokenizer_files = Path(work) / "tokenizer"
            ids = models.tokenize_isolated(Path(tokenizer_dir) if tokenizer_dir else src.tokenizer_dir, corpus.calibration, tokenizer_files)
            model_ir = load_working_copy(src.onnx_path, Path(work))
            batches = calibration_windows(model_ir, ids, opts)
            t1 = time.perf_counter()
            ctx = rewrite(model_ir, batches, opts, n_batches=len(batches))
            timings = {"hf_to_onnx": t_export, "passes": time.perf_counter() - t1, "total_before_save": time.perf_counter() - t0}
            report = build_report(ctx, opts, timings, model or f"{models.DEFAULT_MODEL} (default)")
            for site in ctx.sites:  # the calibration statistics are in the report: free them before the save
                site.stats = None
            heap.trim()
            report["model"] = model_facts(model_ir, src.tokenizer_dir)
            report["calibration"] = {"windows": len(batches), "seq_len": opts.seq_len, "text": {**corpus.identity, "part": "first 75%"}}
            return write_output(model_ir, out_dir, tokenizer_files, report, opts, src.tokenizer_dir)
    finally:
        src.cleanup()
