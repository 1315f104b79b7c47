"""Perplexity evaluation: window bookkeeping, NLL math, ORT runs, the eval CLI and plots."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import VOCAB, char_tokenizer, tiny_transformer
from typer.testing import CliRunner

from torq_onnx import evaluate, text
from torq_onnx.cli import app
from torq_onnx.errors import TorqError


@pytest.mark.parametrize("n, seq_len, stride", [(10, 4, 2), (1000, 128, 64), (129, 128, 127), (50, 64, 32), (2, 2, 1), (777, 100, 1)])
def test_windows_score_every_token_once_with_context(n, seq_len, stride):
    windows = evaluate.sliding_windows(n, seq_len, stride)
    scored = np.zeros(n, int)
    for w in windows:
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= seq_len
        assert 1 <= w.scored <= w.end - w.begin - 1  # a scored target always has its previous token in the window
        scored[w.end - w.scored : w.end] += 1
        if w.begin > 0:
            assert w.end - w.scored - w.begin >= seq_len - stride  # the promised context
    assert scored[0] == 0 and (scored[1:] == 1).all()


@pytest.mark.parametrize("seq_len, stride, message", [(1, 1, "at least 2"), (8, 8, "--stride"), (8, 0, "--stride")])
def test_window_arguments_are_checked(seq_len, stride, message):
    with pytest.raises(TorqError, match=message):
        evaluate.sliding_windows(100, seq_len, stride)


def test_token_nll_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 11)).astype(np.float32) * 30  # large logits: needs the max shift
    targets = rng.integers(0, 11, 7)
    z = logits.astype(np.float64)
    expected = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(7), targets]
    np.testing.assert_allclose(evaluate.token_nll(logits, targets), expected, rtol=1e-12)
    assert evaluate.token_nll(np.zeros((1, 5)), np.array([3]))[0] == pytest.approx(np.log(5))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_strided_perplexity_equals_direct_computation():
    """The tiny model has no cross-position mixing, so one full-sequence run gives every
    target's true logits: windowed evaluation must reproduce that NLL exactly."""
    model = tiny_transformer()
    ids = np.random.default_rng(5).integers(0, VOCAB, 300)
    logits = session(model).run(None, {"input_ids": ids.reshape(1, -1)})[0][0]
    direct = evaluate.token_nll(logits[:-1], ids[1:]).mean()
    res = evaluate.perplexity(session(model), ids, seq_len=64, stride=40)
    assert res.scored_tokens == ids.size - 1
    assert res.mean_nll == pytest.approx(direct, rel=1e-6)
    assert res.perplexity == pytest.approx(np.exp(direct), rel=1e-6)


def test_a_model_without_logits_is_a_clear_error():
    model = tiny_transformer()
    model.graph.output[0].name = "hidden"
    model.graph.node[-1].output[0] = "hidden"
    with pytest.raises(TorqError, match="no 'logits' output"):
        evaluate.perplexity(session(model), np.arange(10) % VOCAB)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model + character tokenizer exported twice through the CLI: rotate-only and W4A4."""
    root = tmp_path_factory.mktemp("eval")
    onnx.save(tiny_transformer(), root / "tiny.onnx")
    tok = char_tokenizer(root / "tok")
    outs = {}
    for name, extra in (("rotate_only", ["--weights", "float", "--activations", "float"]), ("w4a4", [])):
        res = CliRunner().invoke(app, ["export", str(root / "tiny.onnx"), "-o", str(root / name), "--tokenizer", str(tok),
                                       "--calib-samples", "4", "--seq-len", "64", "--quiet", *extra])
        assert res.exit_code == 0, res.output
        outs[name] = root / name
    return root, outs


def eval_json(args: list[str], tmp_path) -> dict:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", *args, "--seq-len", "64", "--stride", "32", "--max-tokens", "2000", "--quiet", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output
    return json.loads(out.read_text())


def test_eval_cli_same_code_for_float_and_exported(exported, tmp_path):
    root, outs = exported
    float_r = eval_json([str(root / "tiny.onnx"), "--tokenizer", str(root / "tok")], tmp_path)
    rot_r = eval_json([str(outs["rotate_only"])], tmp_path)  # folder; tokenizer/ found next to model.onnx
    q_r = eval_json([str(outs["w4a4"] / "model.onnx")], tmp_path)
    assert float_r["scored_tokens"] == rot_r["scored_tokens"] == q_r["scored_tokens"] == 1999
    # (the random tiny model is very confident and wrong: NLL ~ 240 nats, so compare NLL, not exp(NLL))
    assert rot_r["mean_nll"] == pytest.approx(float_r["mean_nll"], rel=1e-5)  # rotations alone are exact
    assert q_r["mean_nll"] != pytest.approx(float_r["mean_nll"], rel=1e-3)  # MXFP4 does change the model


def test_export_and_eval_record_the_text_they_read(exported, tmp_path):
    """report.json names the text the export calibrated on and eval's result the one it
    scored: the built-in corpus with the Python it came from (each release edits it), its
    SHA-256 and length; the same text, so no warning."""
    _, outs = exported
    corpus = text.builtin_corpus()
    want = {"source": f"{text.BUILTIN_SOURCE} of Python {platform.python_version()}",
            "sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(), "characters": len(corpus)}
    report = json.loads((outs["w4a4"] / "report.json").read_text())
    assert report["calibration"]["text"] == {**want, "part": "first 75%"}
    result = eval_json([str(outs["w4a4"])], tmp_path)
    assert result["text"] == want and result["warnings"] == []
    own = tmp_path / "own.txt"
    own.write_text(corpus[:40_000], encoding="utf-8")
    assert eval_json([str(outs["w4a4"]), "--text", str(own)], tmp_path)["text"]["source"] == str(own.resolve())


def test_eval_warns_when_the_text_is_not_the_one_the_export_calibrated_on(exported, tmp_path):
    """An export made under another Python (another built-in corpus) is scored with a warning
    on stderr and in the JSON, as is one whose --text file changed since; an unrelated text
    and an export that kept no record of its text are scored without one."""
    _, outs = exported
    folder = tmp_path / "export"
    shutil.copytree(outs["w4a4"], folder)
    report = json.loads((folder / "report.json").read_text())
    other_python = {"source": f"{text.BUILTIN_SOURCE} of Python 3.99.0", "sha256": "0" * 64, "characters": 500_000, "part": "first 75%"}
    report["calibration"]["text"] = other_python
    (folder / "report.json").write_text(json.dumps(report))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", str(folder), "--seq-len", "64", "--stride", "32", "--max-tokens", "500", "--quiet",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "warning: the text scored here is not the one this export calibrated on" in said and "Python 3.99.0" in said
    (warning,) = json.loads(out.read_text())["warnings"]
    assert "Python 3.99.0" in warning and f"Python {platform.python_version()}" in warning
    scored = text.text_identity(None, text.builtin_corpus())
    own = tmp_path / "own.txt"
    own.write_text("some text", encoding="utf-8")
    changed = {**text.text_identity(str(own), "the text as it was"), "part": "first 75%"}
    for calibrated, here, warned in [(other_python, scored, True), (changed, text.text_identity(str(own), "some text"), True),
                                     (changed, scored, False), ("builtin: CPython reference manual (pydoc_data), first 75%", scored, False),
                                     ({**scored, "part": "first 75%"}, scored, False)]:
        report["calibration"]["text"] = calibrated
        (folder / "report.json").write_text(json.dumps(report))
        assert (evaluate.calibration_mismatch(folder, here) is not None) == warned, (calibrated, here)
    (folder / "report.json").unlink()  # not an export's folder
    assert evaluate.calibration_mismatch(folder, scored) is None


def test_export_writes_plots_next_to_report(exported):
    _, outs = exported
    report = json.loads((outs["w4a4"] / "report.json").read_text())
    assert report["plots"]["files"] == ["block_variance.png", "codeword_occupancy.png"]
    for name in report["plots"]["files"]:
        assert (outs["w4a4"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    site = next(s for s in report["sites"] if s["activation"] == report["plots"]["site"])
    assert site["block_variance_spread"]["before"] == max(s["block_variance_spread"]["before"] for s in report["sites"])
    assert len(site["block_variances"]["before"]) == site["hidden_size"] // 32
    assert sum(site["codeword_occupancy"]["after"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model.onnx"], "no ONNX model at"),
        (["__MODEL__", "--stride", "64"], "--stride must be"),
        (["/nonexistent/model.onnx", "--stride", "64"], "--stride must be"),  # options are checked before anything is read
        (["/nonexistent/model.onnx", "--max-tokens", "1"], "--max-tokens must be"),
        (["__MODEL__", "--text", "/nonexistent.txt"], "text file not found"),
    ],
)
def test_eval_cli_bad_input(exported, args, message):
    _, outs = exported
    args = [str(outs["w4a4"]) if a == "__MODEL__" else a for a in args]
    res = CliRunner().invoke(app, ["eval", "--seq-len", "64", "--stride", "32", *args])  # a later option wins
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_plot_site_selection(exported):
    from torq_onnx import plots

    _, outs = exported
    report = json.loads((outs["w4a4"] / "report.json").read_text())
    assert plots.choose_site(report, "1")["activation"] == report["sites"][1]["activation"]
    assert plots.choose_site(report, report["sites"][2]["layers"][0]) is report["sites"][2]
    with pytest.raises(TorqError, match="no rotation site named"):
        plots.choose_site(report, "nope")


def test_divergence_from_reference():
    rng = np.random.default_rng(8)
    ref = evaluate.log_softmax(rng.standard_normal((6, 9)) * 3)
    other = evaluate.log_softmax(rng.standard_normal((6, 9)) * 3)
    kl, same = evaluate.divergence_from_reference(ref, ref)
    np.testing.assert_allclose(kl, 0.0, atol=1e-12)
    assert same.all()
    kl, same = evaluate.divergence_from_reference(ref, other)
    p, q = np.exp(ref), np.exp(other)
    np.testing.assert_allclose(kl, (p * np.log(p / q)).sum(1), rtol=1e-10)
    assert (kl > 0).all()
    np.testing.assert_array_equal(same, ref.argmax(1) == other.argmax(1))


def test_eval_cli_reference_metrics(exported, tmp_path):
    """Against the float model: a rotate-only export is the same distribution (KL ~ 0, all
    top-1 equal); the W4A4 export diverges."""
    root, outs = exported
    ref = ["--reference", str(root / "tiny.onnx")]
    rot_r = eval_json([str(outs["rotate_only"]), *ref], tmp_path)
    q_r = eval_json([str(outs["w4a4"]), *ref], tmp_path)
    assert rot_r["kl_divergence"] < 1e-6 and rot_r["top1_agreement"] == 1.0
    assert q_r["kl_divergence"] > 1e-3 and q_r["top1_agreement"] < 1.0
    assert q_r["kl_divergence_p99"] >= q_r["kl_divergence"]
    assert eval_json([str(outs["w4a4"])], tmp_path)["kl_divergence"] is None  # no reference, no KL


def test_eval_names_a_bad_reference_before_any_work(exported, tmp_path, monkeypatch):
    """A reference that is not a model is named before the text is tokenized or the scored
    model loaded: a missing path, a file that is not ONNX, a .gguf that is not GGUF."""
    from torq_onnx import models

    root, outs = exported
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("tokenized despite a bad reference"))
    (tmp_path / "ref.onnx").write_text("not a model")
    (tmp_path / "ref.gguf").write_text("not a model")
    for ref, message in ((tmp_path / "missing.onnx", "model not found"), (tmp_path / "ref.onnx", "is not a readable ONNX model"),
                         (tmp_path / "ref.gguf", "is not a GGUF model")):
        res = CliRunner().invoke(app, ["eval", str(outs["w4a4"]), "--reference", str(ref)])
        assert res.exit_code == 2 and message in " ".join(res.output.split()) and "Traceback" not in res.output, res.output


def test_compare_methods_refuses_bad_window_options_before_any_work():
    """tools/compare_methods.py: a stride at or above --seq-len is a usage error, given before
    the model is converted (no traceback)."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "compare_methods.py"
    res = subprocess.run([sys.executable, str(tool), "--seq-len", "128", "--stride", "200"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--stride must be in 1..127 (below --seq-len), got 200" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
