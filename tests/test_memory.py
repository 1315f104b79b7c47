"""What keeps the export's memory low: a memory-mapped working copy of the weights, tokenizer
work (transformers, torch) in its own process, bounded calibration statistics."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from torq_onnx import pipeline
from torq_onnx.passes import Calibrate
from torq_onnx.passes.context import external_weights_folder
from torq_onnx.pipeline import ExportOptions, rewrite

from tiny_models import batches, run, tiny_transformer


def _saved(model: ir.Model) -> bytes:
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model).SerializeToString()


def test_working_copy_changes_no_byte_of_the_export(tmp_path):
    """The passes on a working copy (weights as external data in a work folder, the
    calibration session mapping that folder) give the same model as on the in-memory load."""
    src = tmp_path / "src.onnx"
    onnx.save(tiny_transformer(), src)
    work = tmp_path / "work"
    work.mkdir()
    copy = pipeline.load_working_copy(src, work)
    assert external_weights_folder(copy) == work
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in copy.graph.initializers.values() if v.const_value.nbytes >= 1024)
    in_memory = pipeline.load_ir(src)
    assert external_weights_folder(in_memory) is None
    options = ExportOptions(progress=False, method="wush")
    ctx = rewrite(copy, batches(), options)
    rewrite(in_memory, batches(), options)
    assert _saved(copy) == _saved(in_memory)
    # wush fits no token sample: the reservoir is only the report's 512 tokens (torq keeps 2048)
    assert all(s.stats.reservoir.shape[0] <= 512 for s in ctx.sites)
    assert ExportOptions(method="torq").reservoir_capacity() == 2048


def test_a_model_saved_with_external_data_is_used_in_place(tmp_path):
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(tiny_transformer(), src, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    work = tmp_path / "work"
    work.mkdir()
    model = pipeline.load_working_copy(src, work)
    assert external_weights_folder(model) == src.parent and not any(work.iterdir())


def test_the_export_process_never_imports_torch(tiny_llama_dir, tmp_path):
    """HF->ONNX conversion and tokenization run in their own processes: the process that
    calibrates and rewrites never holds torch or transformers (~0.3 GB resident)."""
    script = textwrap.dedent(f"""
        import sys
        from torq_onnx import pipeline
        pipeline.export({str(tiny_llama_dir)!r}, {str(tmp_path / "out")!r},
                        pipeline.ExportOptions(calib_samples=2, seq_len=64, progress=False))
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_isolated_tokenization_equals_in_process(tiny_llama_dir, tmp_path):
    from torq_onnx import calibration, models

    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = models.tokenize_isolated(tiny_llama_dir, text, tmp_path / "tok")
    np.testing.assert_array_equal(ids, calibration.tokenize(models.load_tokenizer(tiny_llama_dir), text))
    np.testing.assert_array_equal(ids, calibration.tokenize(models.load_tokenizer(tmp_path / "tok"), text))


@pytest.mark.parametrize("threshold", [1 << 30, 1 << 10])  # output inline / in model.onnx.data
def test_the_output_never_points_into_the_source_data(tmp_path, monkeypatch, threshold):
    """A source with all tensors external (as optimum writes models over 2 GB, small ones
    and Constant attributes included) is used in place; the output is self-contained."""
    import shutil

    from torq_onnx.passes import finalize, save_atomic

    monkeypatch.setattr(finalize, "EXTERNAL_DATA_THRESHOLD", threshold)
    proto = tiny_transformer()
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["unused_c"], value=onnx.numpy_helper.from_array(np.arange(64, dtype=np.float32))))
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(proto, src, save_as_external_data=True, location="model.onnx_data", size_threshold=0, convert_attribute=True)
    model = pipeline.load_working_copy(src, tmp_path)
    rewrite(model, batches(), ExportOptions(progress=False))
    out = save_atomic(model, tmp_path / "out")
    shutil.rmtree(src.parent)
    assert (out.parent / "model.onnx.data").exists() == (threshold < 1 << 20)
    feeds = batches(1, 8, seed=3)[0]
    assert np.isfinite(run(onnx.load(str(out)), feeds)).all()


def test_calibration_runs_only_what_the_sites_need(tmp_path):
    """The calibration session's outputs are the site activations and nothing else: the LM
    head and whatever only feeds it are dead code there. The model itself keeps its outputs and nodes."""
    import onnxruntime as ort
    from onnx_ir.passes import Sequential

    from torq_onnx.passes import FindLinearInputs, NameNodes
    from torq_onnx.passes.context import ExportContext

    model = ir.serde.deserialize_model(tiny_transformer())
    ctx = ExportContext()
    Sequential(NameNodes(), FindLinearInputs(ctx))(model)
    before = ([v.name for v in model.graph.outputs], len(model.graph))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ran.onnx")  # the graph ORT actually runs
    sess = Calibrate(ctx, batches())._session(model, opts)
    assert [o.name for o in sess.get_outputs()] == [s.activation for s in ctx.sites]
    ran = onnx.load(str(tmp_path / "ran.onnx"), load_external_data=False)
    # the last MatMuls (down projection, LM head) only feed the logits: neither runs nor is loaded
    assert {t.name for t in ran.graph.initializer} == {"emb", "wq", "wk", "wv", "wo", "wg", "wu"}
    assert ([v.name for v in model.graph.outputs], len(model.graph)) == before
