"""The split runner (ORT segments cut at the online op, the op computed by a kernel between
them) against the whole-graph session, on CPU: the route the CUDA kernel takes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from torq_onnx import calibration as calib
from torq_onnx.cli import app
from torq_onnx.pipeline import ExportOptions, rewrite
from torq_onnx.runtime_ops import load_session
from torq_onnx.runtime_ops.split_runner import OnlineOp, Segment, SplitSession, numpy_kernel, ort_function_kernel, split_model

from tiny_models import batches, tiny_transformer


def check_split_matches_whole(path, feeds: dict) -> None:
    whole = load_session(path).run(None, feeds)[0]
    exact = SplitSession(path, kernel=ort_function_kernel()).run(None, feeds)[0]
    np.testing.assert_array_equal(exact, whole)  # same op arithmetic: bit-identical logits
    ref = SplitSession(path, kernel=numpy_kernel).run(None, feeds)[0]
    np.testing.assert_allclose(ref, whole, rtol=1e-3, atol=1e-3 * np.abs(whole).max())


@pytest.mark.parametrize("method", ["torq", "wush"])
def test_tiny_graph_split_at_every_site(tmp_path, method):
    model = ir.serde.deserialize_model(tiny_transformer())
    ctx = rewrite(model, batches(), ExportOptions(progress=False, method=method))
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    parts = split_model(onnx.load(path))
    assert sum(isinstance(p, OnlineOp) for p in parts) == len(ctx.sites)
    assert all(isinstance(p, Segment) and p.outputs for p in parts if not isinstance(p, OnlineOp))
    check_split_matches_whole(path, batches(1, 40, seed=3)[0])


def test_exported_hf_decoder_split_matches_the_whole_graph(tiny_llama_dir, tmp_path):
    """A real optimum export (attention, rotary embeddings, shape ops) with the default method."""
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-o", str(out), "--calib-samples", "2", "--seq-len", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    runner = SplitSession(out / "model.onnx")
    assert sum(isinstance(p, OnlineOp) for p in runner.parts) == 8  # 4 sites x 2 layers
    ids = np.random.default_rng(0).integers(0, 50, 48).astype(np.int64)
    # the export takes a KV cache: an empty one makes this a plain full-sequence pass
    feeds = calib.feeds_for_inputs(calib.input_specs(load_session(out / "model.onnx")), ids)
    assert any(calib.is_past_input(k) for k in feeds)
    check_split_matches_whole(out / "model.onnx", feeds)
