"""Output paths: refused before any work when they cannot be written or when replacing them
would destroy something that is not an earlier output; replaced safely when they can."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from torq_onnx import atomic, pipeline
from torq_onnx.cli import app
from torq_onnx.errors import TorqError


@pytest.fixture
def no_work(monkeypatch):
    """Make any start of the expensive part of an export or an evaluation fail the test."""
    import torq_onnx.evaluate as evaluate
    import torq_onnx.models as models

    monkeypatch.setattr(models, "resolve", lambda *a, **k: pytest.fail("the model was loaded despite a bad path"))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("the evaluation ran despite a bad path"))


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return " ".join(res.output.split())  # rich wraps long messages


def test_a_folder_that_is_not_an_export_is_refused_and_left_whole(tmp_path, no_work):
    victim = tmp_path / "project"
    (victim / "src").mkdir(parents=True)
    (victim / "src" / "notes.txt").write_text("not ours")
    (victim / "report.json").write_text(json.dumps({"some": "other tool"}))
    before = tree(victim)
    out = invoke("export", "-o", str(victim))
    assert "is not empty and is not an earlier torq-onnx export" in out
    assert tree(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary sibling either


def test_an_earlier_export_holding_a_users_files_is_refused_and_kept(tmp_path, no_work):
    """An earlier export may be replaced, but not once a user has put files of their own into
    it: its report lists what the export wrote, and anything else is named."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"torq_onnx_version": "0", "files": ["model.onnx", "report.json"]}))
    (out / "model.onnx").write_text("a model")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    msg = invoke("export", "-o", str(out))
    assert "is an earlier export that also holds what it did not write (notes.txt)" in msg, msg
    assert tree(out) == before
    (out / "notes.txt").unlink()
    assert pipeline.check_out_dir(out) == out  # only what it wrote: replaceable


def test_a_users_file_inside_an_earlier_exports_tokenizer_folder_is_named(tmp_path, no_work):
    """The report lists the paths inside tokenizer/ too, so a file added there is named (by its
    path) and kept; a folder the export did not write is named once."""
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    files = ["model.onnx", "report.json", "tokenizer/", "tokenizer/tokenizer.json"]
    (out / "report.json").write_text(json.dumps({"torq_onnx_version": "0", "files": files}))
    (out / "model.onnx").write_text("a model")
    assert pipeline.added_entries(out) == []
    (out / "tokenizer" / "vocab-notes.txt").write_text("mine")
    (out / "mine" / "deep").mkdir(parents=True)
    (out / "mine" / "deep" / "a.txt").write_text("mine")
    before = tree(out)
    assert pipeline.added_entries(out) == ["mine", "tokenizer/vocab-notes.txt"]
    msg = invoke("export", "-o", str(out))
    assert "also holds what it did not write (mine, tokenizer/vocab-notes.txt)" in msg, msg
    assert tree(out) == before


def test_a_top_level_file_list_counts_its_folders_as_written_whole(tmp_path):
    """Exports whose list names only top-level entries ("tokenizer", no trailing /) stay
    replaceable: whatever lies in such a folder counts as the export's."""
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "anything.json").write_text("{}")
    (out / "report.json").write_text(json.dumps({"torq_onnx_version": "0", "files": ["report.json", "tokenizer"]}))
    assert pipeline.added_entries(out) == []
    assert pipeline.check_out_dir(out) == out


@pytest.mark.parametrize("given", ["model", "--text", "--tokenizer"])
def test_an_input_inside_the_output_folder_is_refused_and_kept(tmp_path, no_work, given):
    """An earlier export's folder may be replaced, but not while it holds an input of the new
    export: the replacement would delete the user's source, text or tokenizer."""
    out = tmp_path / "out"
    (out / "tok").mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"torq_onnx_version": "0"}))
    (out / "source.onnx").write_text("a model")
    (out / "calib.txt").write_text("some text")
    (out / "tok" / "tokenizer.json").write_text("{}")
    before = tree(out)
    args = {"model": ["export", str(out / "source.onnx")], "--text": ["export", "--text", str(out / "calib.txt")],
            "--tokenizer": ["export", "--tokenizer", str(out / "tok")]}[given]
    msg = invoke(*args, "-o", str(out))
    assert f"{given if given != 'model' else 'the model'} " in msg and "is inside the output folder" in msg, msg
    assert tree(out) == before


@pytest.mark.parametrize("where", [".", "..", "HERE"])
def test_the_current_folder_and_its_ancestors_are_refused(tmp_path, monkeypatch, no_work, where):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "work")
    out = invoke("export", "-o", str(tmp_path / "work") if where == "HERE" else where)
    assert "is the current folder or holds it" in out
    assert (tmp_path / "work" / "keep.txt").read_text() == "x"


def test_an_output_folder_that_is_a_file_or_under_one_is_refused(tmp_path, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    assert "exists and is a file" in invoke("export", "-o", str(f))
    assert f"{f} is a file, not a folder" in invoke("export", "-o", str(f / "out"))
    assert f.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_an_unwritable_output_location_is_refused(no_work):
    assert "cannot write in /proc" in invoke("export", "-o", "/proc/torq-out")
    assert "cannot write in /proc" in invoke("eval", "some/model.onnx", "--json", "/proc/result.json")


def test_eval_json_to_a_folder_is_refused_before_the_evaluation(tmp_path, no_work):
    assert "is a folder: give the output a file name" in invoke("eval", "some/model.onnx", "--json", str(tmp_path))


def test_bad_text_and_tokenizer_paths_are_refused_before_the_model_is_loaded(tmp_path, no_work):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "text file not found" in invoke("export", "-o", str(tmp_path / "o"), "--text", str(tmp_path / "none.txt"))
    assert "text file is empty" in invoke("export", "-o", str(tmp_path / "o"), "--text", str(empty))
    assert "tokenizer folder not found" in invoke("export", "-o", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok"))
    (tmp_path / "tok").mkdir()  # a folder, but no tokenizer in it
    assert ("holds no tokenizer: a saved Hugging Face tokenizer has tokenizer.json or tokenizer_config.json"
            in invoke("export", "-o", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok")))
    noise = tmp_path / "noise.txt"  # a binary file given as text would calibrate on noise
    noise.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    assert "is not a UTF-8 text file" in invoke("export", "-o", str(tmp_path / "o"), "--text", str(noise))
    assert not (tmp_path / "o").exists()


def test_text_with_a_few_stray_bytes_is_read_with_them_replaced(tmp_path):
    """A Latin-1 byte or two in UTF-8 text is replaced and the text used; NUL bytes or more than
    1% undecodable characters make it not text."""
    from torq_onnx.text import load_text

    path = tmp_path / "t.txt"
    path.write_bytes(b"caf\xe9 " + b"plain words of a calibration text. " * 20)
    assert load_text(str(path)).startswith("caf\ufffd plain")
    path.write_bytes(b"plain words\x00 of a calibration text. " * 20)
    with pytest.raises(TorqError, match="holds NUL bytes"):
        load_text(str(path))
    path.write_bytes("caf\xe9 au lait, ".encode("latin-1") * 40)  # Latin-1, not UTF-8: 1 in 15 characters
    with pytest.raises(TorqError, match=r"\(7% of it is not UTF-8\)"):
        load_text(str(path))


def test_a_missing_tokenizer_folder_is_named_not_taken_for_a_hub_id(tmp_path):
    from torq_onnx.models import load_tokenizer

    with pytest.raises(TorqError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "tok")


def test_an_empty_folder_or_an_earlier_export_may_be_replaced(tmp_path, exported_decoder):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pipeline.check_out_dir(empty) == empty
    assert pipeline.check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    earlier = exported_decoder.parent  # a real export's folder, so the marker cannot drift from what exports write
    assert pipeline.is_export_folder(earlier)
    assert pipeline.check_out_dir(earlier) == earlier
    # its report lists everything it wrote
    files = json.loads((earlier / "report.json").read_text())["files"]
    assert pipeline.added_entries(earlier) == [] and "model.onnx" in files
    inside = [p.relative_to(earlier).as_posix() for p in (earlier / "tokenizer").rglob("*") if p.is_file()]
    assert inside and {"tokenizer/", *inside} <= set(files)  # the paths inside tokenizer/ too
    (empty / "report.json").write_text("{not json")
    assert not pipeline.is_export_folder(empty)


def test_replacing_a_link_to_an_export_keeps_the_folder_it_named(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "model.onnx").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(target)
    new = tmp_path / "staged"
    new.mkdir()
    (new / "model.onnx").write_text("new")
    atomic.replace_dir(new, link)
    assert not link.is_symlink() and (link / "model.onnx").read_text() == "new"
    assert (target / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]  # no stale link left behind


def test_an_atomic_file_write_onto_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TorqError, match="is a folder"):
        atomic.write_text_atomic(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def terminated_export(tiny_llama_dir: Path, tmp_path: Path, entry: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``torq-onnx export`` through ``entry`` of torq_onnx.cli in a child process that sends
    itself SIGTERM in the middle of the export, once its working copy is made."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = f"""
import os, signal, sys, time
import torq_onnx.pipeline as pipeline

def terminated(*args, **kwargs):  # where calibration would start: the working copy exists
    print(sorted(p for p in os.listdir({str(tmp)!r}) if p.startswith("torq-")), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a CI timeout would
    time.sleep(120)

pipeline.calibration_windows = terminated
sys.argv = ["torq-onnx", "export", {str(tiny_llama_dir)!r}, "-o", {str(tmp_path / "out")!r}, "--quiet"]
from torq_onnx.cli import {entry}
{entry}()
"""
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True,
                         timeout=600)
    return res, tmp


def test_a_terminated_export_leaves_no_temporary_folders_and_no_output(tiny_llama_dir, tmp_path):
    res, tmp = terminated_export(tiny_llama_dir, tmp_path, "main")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert any(name.startswith("torq-work-") for name in ast.literal_eval(res.stdout.splitlines()[0]))  # there was work to undo
    assert [p.name for p in tmp.iterdir() if p.name.startswith("torq-")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no output, no temporary sibling
