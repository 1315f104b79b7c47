"""Export passes on a tiny transformer-shaped graph built here: exactness, quantization, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from torq_onnx.cli import app
from torq_onnx.errors import TorqError
from torq_onnx.passes import save_atomic
from torq_onnx.pipeline import ExportOptions, calibrate, rewrite

from tiny_models import D, FF, VOCAB, batches, run, tiny_transformer


def opts(**kw) -> ExportOptions:
    return ExportOptions(progress=False, **kw)


@pytest.mark.parametrize("method", ["rtn", "brq", "quarot", "torq", "wush", "torq-wush"])
def test_rotation_and_folding_preserve_the_function(method):
    base = tiny_transformer()
    model = ir.serde.deserialize_model(base)
    ctx = rewrite(model, batches(), opts(method=method, weights="float", quantize_activations=False))
    assert [s.activation for s in ctx.sites] == ["x", "attn", "h", "act"]  # qkv, o, gate/up, down inputs
    feeds = batches(1, 24, seed=9)[0]
    ref = run(base, feeds)
    out = run(model, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_float_export_runs_the_source_graph():
    """rtn with float weights and activations: no online node, no weight rewritten, and the
    outputs bit-identical to the source's; with MXFP4 activations every site keeps its op."""
    base = tiny_transformer()
    model = ir.serde.deserialize_model(base)
    rewrite(model, batches(), opts(method="rtn", weights="float", quantize_activations=False))
    proto = ir.serde.serialize_model(model)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in base.graph.node]
    source_weights = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), source_weights[t.name])
    feeds = batches(1, 24, seed=9)[0]
    np.testing.assert_array_equal(run(model, feeds), run(base, feeds))

    model = ir.serde.deserialize_model(base)
    ctx = rewrite(model, batches(), opts(method="rtn", weights="float"))
    ops = [n.op_type for n in ir.serde.serialize_model(model).graph.node]
    assert ops.count("TorqRotateQuantize") == len(ctx.sites) and "TorqRotate" not in ops


def test_sites_group_shared_activations_and_skip_lm_head():
    ctx = rewrite(ir.serde.deserialize_model(tiny_transformer()), batches(), opts(method="rtn", weights="float"))
    groups = {s.activation: sorted(c.weight_name for c in s.consumers) for s in ctx.sites}
    assert groups["x"] == ["wk", "wq", "wv"]
    assert groups["h"] == ["wg", "wu"]
    assert groups["act"] == ["wd"]  # down_proj input, B = d_ff / 32
    assert any("LM head" in s["reason"] for s in ctx.skipped)


def test_quantized_graph_matches_numpy_simulation():
    """W4A4 graph: every rotated weight packed, one quantizer per site, bounded output error."""
    base = tiny_transformer()
    model = ir.serde.deserialize_model(base)
    ctx = rewrite(model, batches(), opts(method="torq", weights="mxfp4"))
    feeds = batches(1, 24, seed=9)[0]
    out = run(model, feeds)
    ref = run(base, feeds)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.5
    proto = ir.serde.serialize_model(model)
    assert sum(n.op_type == "TorqDequantizeMXFP4" for n in proto.graph.node) == 7
    assert sum(n.op_type == "TorqRotateQuantize" for n in proto.graph.node) == len(ctx.sites)


def export_and_error(base: onnx.ModelProto, calib: list[dict], options: ExportOptions, feeds: dict):
    """(rewritten model, context, relative output error against ``base`` on ``feeds``)."""
    model = ir.serde.deserialize_model(base)
    ctx = rewrite(model, calib, options)
    ref = run(base, feeds)
    return model, ctx, float(np.linalg.norm(run(model, feeds) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("method", ["brq", "wush"])
def test_gptq_weights_in_the_graph(method):
    """W4A4 with GPTQ weights: the packed codes are what GPTQ chose, its Hessian-weighted
    error is below RTN's at every site, and the deployed model is closer to float."""
    base = tiny_transformer()
    errs = {}
    for rounding in ("rtn", "gptq"):
        model, ctx, errs[rounding] = export_and_error(base, batches(16, 32), opts(method=method, weight_rounding=rounding, scale_search=True),
                                                      batches(1, 64, seed=11)[0])
        proto = ir.serde.serialize_model(model)
        assert sum(n.op_type == "TorqDequantizeMXFP4" for n in proto.graph.node) == 7
        if rounding == "gptq":
            for site in ctx.sites:
                we = site.report["weight_error"]
                assert set(we) == {"rtn", "gptq+search+act-order"}
                assert we["gptq+search+act-order"] < we["rtn"], (site.activation, we)
    assert errs["gptq"] < errs["rtn"], errs


def test_wush_graph_carries_per_block_transforms():
    model = ir.serde.deserialize_model(tiny_transformer())
    ctx = rewrite(model, batches(), opts(method="wush"))
    inits = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    for i, site in enumerate(ctx.sites):
        assert inits[f"torq_site{i}_r_intra"].shape == (site.blocks, 32, 32)
        np.testing.assert_array_equal(inits[f"torq_site{i}_r_inter"], [[1.0]])  # identity: no [B, B] GEMM
        assert not site.rotation.orthogonal


def test_torq_reduces_output_error_vs_rtn():
    errs = {m: export_and_error(tiny_transformer(), batches(12, 32), opts(method=m, weights="float"), batches(1, 64, seed=11)[0])[2]
            for m in ("rtn", "torq")}
    assert errs["torq"] < errs["rtn"], errs


def test_no_linear_layer_is_a_clear_error():
    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 32])])
    with pytest.raises(TorqError, match="no linear layer"):
        rewrite(ir.serde.deserialize_model(helper.make_model(graph)), [], opts(method="rtn"))


def test_hidden_size_not_multiple_of_32_is_a_clear_error():
    with pytest.raises(TorqError, match="hidden size 48 is not a multiple of 32"):
        rewrite(ir.serde.deserialize_model(tiny_transformer(d=48, ff=72)), batches(), opts(method="rtn"))


def test_an_export_is_refused_as_a_source():
    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), opts(method="wush"))
    with pytest.raises(TorqError, match=r"already a torq-onnx export \(TorqDequantizeMXFP4, TorqRotateQuantize; method wush\)"):
        rewrite(model, batches(), opts(method="wush"))


def test_nan_activations_are_a_clear_error():
    base = tiny_transformer()
    base.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((VOCAB, D), np.nan, np.float32), "emb"))
    with pytest.raises(TorqError, match="NaN/Inf in calibration activations at 'x'"):
        rewrite(ir.serde.deserialize_model(base), batches(), opts(method="torq"))


@pytest.mark.parametrize("site, message", [("nope", "no rotation site named 'nope'"), ("99", "site index 99 out of range")])
def test_an_unknown_plot_site_is_refused_before_calibration(site, message):
    def windows():
        pytest.fail("calibration started despite the bad --plot-site")
        yield

    with pytest.raises(TorqError, match=message):
        calibrate(ir.serde.deserialize_model(tiny_transformer()), windows(), opts(method="brq", plot_site=site))


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), opts(method="brq"))
    out = tmp_path / "out"
    path = save_atomic(model, out, {"report.json": {"ok": 1}})
    assert path.is_file() and json.loads((out / "report.json").read_text()) == {"ok": 1}
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError):
        save_atomic(model, out, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left
    assert (out / "report.json").is_file()  # the previous output is intact


def test_exported_file_loads_with_one_call(tmp_path):
    import torq_onnx

    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), opts(method="torq"))
    path = save_atomic(model, tmp_path / "m")
    sess = torq_onnx.load_session(path)
    out = sess.run(None, batches(1, 8, seed=3)[0])[0]
    assert out.shape == (1, 8, VOCAB) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "/nonexistent/model.onnx"], "model not found"),
        (["export", "__NOT_ONNX__"], "not a readable ONNX model"),
        (["export", "__EMPTY_ONNX__"], "not a readable ONNX model"),
        (["export", "__NOT_GGUF__"], "is not a GGUF model (it does not begin with GGUF)"),
        (["export", "x", "--activations", "int8"], "--activations must be"),
        (["export", "x", "--method", "wush", "--output-guard"], "apply to --method torq only"),
        (["export", "x", "--method", "brq", "--inter-min-spread", "20"], "torq and torq-wush only"),
        (["inspect", "/nonexistent.onnx"], "no file at"),
    ],
)
def test_cli_bad_input_messages(tmp_path, args, message):
    if "__NOT_ONNX__" in args:
        bad = tmp_path / "bad.onnx"
        bad.write_text("this is not protobuf")
        args = [str(bad) if a == "__NOT_ONNX__" else a for a in args]
    if "__EMPTY_ONNX__" in args:  # parses as an empty message: must not be reported as a missing tokenizer
        empty = tmp_path / "empty.onnx"
        empty.write_bytes(b"")
        args = [str(empty) if a == "__EMPTY_ONNX__" else a for a in args]
    if "__NOT_GGUF__" in args:  # named by its first bytes, not by a conversion that fails deep inside
        bad = tmp_path / "bad.gguf"
        bad.write_text("this is not a GGUF file")
        args = [str(bad) if a == "__NOT_GGUF__" else a for a in args]
    res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o")] if args[0] == "export" else args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value", [("--method", "foo"), ("--weight-rounding", "awq"), ("--scale-rule", "ceil")])
def test_cli_rejects_bad_choices_before_any_work(tmp_path, option, value, monkeypatch):
    """A bad choice fails at argument parsing: nothing is exported or calibrated."""
    import torq_onnx.pipeline as pipeline

    monkeypatch.setattr(pipeline, "export", lambda *a, **k: pytest.fail("export started despite a bad option"))
    res = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), option, value])
    assert res.exit_code == 2
    assert "Invalid value" in res.output and value in res.output
    assert not (tmp_path / "o").exists()


def test_cli_version_names_this_package_and_its_onnxruntime():
    import onnxruntime

    import torq_onnx

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    out = res.output.strip()  # the onnxruntime distribution is onnxruntime or onnxruntime-gpu
    assert out.startswith(f"torq-onnx {torq_onnx.__version__} (onnxruntime") and out.endswith(f" {onnxruntime.__version__})"), out


def test_python_m_torq_onnx_is_the_command():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "torq_onnx", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("torq-onnx "), res.stderr


def test_cli_help_lists_the_choices():
    res = CliRunner().invoke(app, ["export", "--help"])
    assert res.exit_code == 0
    for choice in ("torq-wush", "wush", "gptq", "rceil"):
        assert choice in res.output


@pytest.mark.parametrize("method", ["torq", "wush"])
def test_cli_inspect(tmp_path, method):
    model = ir.serde.deserialize_model(tiny_transformer())
    rewrite(model, batches(), opts(method=method))
    path = save_atomic(model, tmp_path / "m")
    res = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})  # no wrapped cells
    assert res.exit_code == 0, res.output
    assert "TorqRotateQuantize" in res.output and "torq.method" in res.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in res.output.splitlines() if line.count("│") == 3}
    shapes, intra = rows["R_inter shapes"], rows["R_intra shapes"]
    if method == "wush":  # per-block transforms, no block mixing
        assert shapes == "1x1 (identity)" and set(intra.split(", ")) <= {f"{b}x32x32" for b in (D // 32, FF // 32)}, rows
    else:  # torq: dense [B, B] factors of the sites' widths, nothing else (no weight scales); one shared R_intra
        assert "identity" not in shapes and set(shapes.split(", ")) <= {f"{b}x{b}" for b in (D // 32, FF // 32)}, rows
        assert intra == "32x32", rows
    assert rows["inputs"] == ", ".join(i.name for i in model.graph.inputs) and rows["outputs"] == "logits"
    packed = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.name.endswith(("codes", "scales")))
    assert packed > 0 and f"MXFP4 (codes and scales) {packed / 2**20:.1f} MiB" in rows["weights"], rows
    assert rows["files"] == f"model.onnx {path.stat().st_size / 2**20:.1f} MiB"
    folder = CliRunner().invoke(app, ["inspect", str(path.parent)], env={"COLUMNS": "200"})  # OUT, as eval and generate take it
    assert folder.exit_code == 0 and folder.output.split("\n", 1)[1] == res.output.split("\n", 1)[1], folder.output


def test_inspect_names_external_weight_files_and_their_sizes(tmp_path):
    from torq_onnx.summary import summarize

    model = tiny_transformer()
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    rows = dict(summarize(tmp_path / "m.onnx"))
    assert rows["files"] == (f"m.onnx {(tmp_path / 'm.onnx').stat().st_size / 2**20:.1f} MiB, "
                             f"m.data {(tmp_path / 'm.data').stat().st_size / 2**20:.1f} MiB")
    assert rows["weights"].startswith("float ") and "R_inter shapes" in rows and rows["R_inter shapes"] == "-"
    (tmp_path / "m.data").unlink()
    assert dict(summarize(tmp_path / "m.onnx"))["files"].endswith("m.data MISSING")


@pytest.mark.parametrize("options, message", [
    ({"method": "foo"}, "--method must be one of"),
    ({"weights": "int4"}, "--weights must be one of"),
    ({"scale_rule": "ceil"}, "--scale-rule must be one of"),
    ({"weight_rounding": "awq"}, "--weight-rounding must be one of"),
    ({"seq_len": 0}, "must be positive"),
    ({"solver_options": {"intra_refin": False}}, "unknown solver option"),
    ({"method": "wush", "output_guard": True}, "apply to --method torq only"),
    ({"method": "brq", "solver_options": {"inter_min_spread": 20.0}}, "torq and torq-wush only"),
    ({"calib_sampels": 8}, "unknown export option"),
    ({"dtype": "bf16"}, "--dtype must be one of"),
    ({"calib_samples": "8"}, "export option calib_samples must be int, got '8'"),  # not a TypeError deep inside
    ({"seq_len": True}, "export option seq_len must be int, got True"),
    ({"progress": "no"}, "export option progress must be bool, got 'no'"),
    ({"reservoir_tokens": 2.5}, r"export option reservoir_tokens must be int or None, got 2.5"),
    ({"solver_options": ["intra_refine"]}, "export option solver_options must be dict"),
])
def test_the_python_export_checks_its_options_before_any_work(tmp_path, monkeypatch, options, message):
    import torq_onnx
    import torq_onnx.models as models

    monkeypatch.setattr(models, "resolve", lambda *a, **k: pytest.fail("the model was loaded despite a bad option"))
    with pytest.raises(TorqError, match=message):
        torq_onnx.export("smollm2-135m", tmp_path / "o", **options)
    assert not (tmp_path / "o").exists()


def test_options_of_numpy_types_are_accepted():
    """A count computed with numpy is a count; every default passes its own type check."""
    ExportOptions().validate()
    ExportOptions(calib_samples=np.int64(8), seq_len=np.int32(64), progress=np.bool_(False), plot_site=3,
                  reservoir_tokens=256, calib_sample_seed=1).validate()


def test_the_cli_choices_are_the_formats_own():
    from typing import get_args

    from torq_onnx import mxfp4
    from torq_onnx.defaults import SCALE_RULES

    assert SCALE_RULES == get_args(mxfp4.ScaleRule)


def test_the_python_export_writes_what_the_cli_writes(tiny_llama_dir, tmp_path):
    import torq_onnx

    path = torq_onnx.export(tiny_llama_dir, tmp_path / "out", method="brq", weight_rounding="rtn", calib_samples=2, seq_len=32,
                            progress=False)
    report = json.loads((path.parent / "report.json").read_text())
    assert path == tmp_path / "out" / "model.onnx"
    assert report["options"]["method"] == "brq" and report["options"]["weight_rounding"] == "rtn"
    assert report["calibration"] == {"windows": 2, "seq_len": 32, "text": report["calibration"]["text"]}
    sess = torq_onnx.load_session(path)
    assert "logits" in [o.name for o in sess.get_outputs()]
