"""The split runner (ORT segments cut at the online op, the op computed by a kernel between
them) against the whole-graph session, on CPU: the route the CUDA kernel takes."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from torq_onnx import calibration as calib
from torq_onnx.pipeline import ExportOptions, rewrite
from torq_onnx.runtime_ops import DEQUANTIZE_WEIGHT, load_session
from torq_onnx.runtime_ops.segments import crossing_values
from torq_onnx.runtime_ops.split_runner import OnlineOp, Segment, SplitSession, numpy_kernel, ort_function_kernel, split_model

from tiny_models import batches, tiny_transformer


def check_split_matches_whole(path, feeds: dict) -> None:
    whole = load_session(path).run(None, feeds)[0]
    exact = SplitSession(path, kernel=ort_function_kernel()).run(None, feeds)[0]
    np.testing.assert_array_equal(exact, whole)  # same op arithmetic: bit-identical logits
    # the CUDA route's binding code (OrtValues between segments, kernel outputs by pointer)
    bound = SplitSession(path, kernel=ort_function_kernel(), io_binding=True)
    np.testing.assert_array_equal(bound.run(None, feeds)[0], whole)
    np.testing.assert_array_equal(bound.run(None, feeds)[0], whole)  # nothing freed too early
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


def test_exported_hf_decoder_split_matches_the_whole_graph(exported_decoder):
    """A real optimum export (attention, rotary embeddings, shape ops) with the default method."""
    runner = SplitSession(exported_decoder)
    assert sum(isinstance(p, OnlineOp) for p in runner.parts) == 8  # 4 sites x 2 layers
    ids = np.random.default_rng(0).integers(0, 50, 48).astype(np.int64)
    # the export takes a KV cache: an empty one makes this a plain full-sequence pass
    feeds = calib.feeds_for_inputs(calib.input_specs(load_session(exported_decoder)), ids)
    assert any(calib.is_past_input(k) for k in feeds)
    check_split_matches_whole(exported_decoder, feeds)
    # the plain cut in exported order computes the same logits
    plain = SplitSession(exported_decoder, kernel=ort_function_kernel(), recompute=False).run(None, feeds)[0]
    np.testing.assert_array_equal(plain, load_session(exported_decoder).run(None, feeds)[0])


def test_split_session_computes_the_last_position_logits_only(exported_decoder):
    ids = np.random.default_rng(1).integers(0, 50, 24).astype(np.int64)
    feeds = calib.feeds_for_inputs(calib.input_specs(load_session(exported_decoder)), ids)
    model = onnx.load(str(exported_decoder))
    split = SplitSession(model, kernel=ort_function_kernel(), last_position_logits=True)
    whole = load_session(exported_decoder, last_position_logits=True)
    got, want = split.run(None, feeds), whole.run(None, feeds)
    assert got[0].shape == (1, 1, 50)
    for name, a, b in zip(split.outputs, got, want):  # the logits and the whole KV cache
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert [n.name for n in model.graph.node] == [n.name for n in onnx.load(str(exported_decoder)).graph.node]  # the caller's, unchanged


def test_only_data_tensors_cross_segments(exported_decoder):
    """Dequantized weights and shape values are recomputed in the segment that reads them
    (ORT folds the one, the host computes the other), where the plain cut passes both."""
    model = onnx.load(exported_decoder)
    plain_parts, parts = split_model(model, recompute=False), split_model(model)
    plain = crossing_values(model, plain_parts)
    assert plain["constant"] and plain["shape"]  # what this test guards against is there to fix
    crossing = crossing_values(model, parts)
    assert crossing["constant"] == [] and crossing["shape"] == []
    segments = [p for p in parts if isinstance(p, Segment)]
    assert len(segments) == sum(isinstance(p, Segment) for p in plain_parts) == 9
    for seg in segments:
        dequantized = {o for n in seg.model.graph.node if n.op_type == DEQUANTIZE_WEIGHT for o in n.output}
        read_here = {i for n in seg.model.graph.node for i in n.input}
        assert dequantized <= read_here and not dequantized & set(seg.outputs)


def test_split_sessions_share_an_arena_and_do_not_spin_unless_told(exported_decoder):
    spin, shared = "session.intra_op.allow_spinning", "session.use_env_allocators"

    def config(runner: SplitSession, key: str) -> str:
        seg = next(p for p in runner.parts if isinstance(p, Segment))
        return seg.session.get_session_options().get_session_config_entry(key)

    runner = SplitSession(exported_decoder)
    assert config(runner, spin) == "0" and config(runner, shared) == "1"
    opts = ort.SessionOptions()
    opts.add_session_config_entry(spin, "1")
    runner = SplitSession(exported_decoder, sess_options=opts, shared_arena=False)
    assert config(runner, spin) == "1"
    with pytest.raises(RuntimeError):  # not opted in
        config(runner, shared)


def test_shape_values_are_shapes_and_never_weight_rows():
    """Shape -> Gather -> Unsqueeze is shape arithmetic; a row gathered from a weight table
    by a shape index is data (recomputing it would copy the table into the segment)."""
    from onnx import TensorProto, helper, numpy_helper

    from torq_onnx.runtime_ops.segments import _value_types, recomputable_values

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Gather", ["table", "n"], ["row"], axis=0),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float32))),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.ones((8, 3), np.float32), "table")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in ("row", "y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    constant, shape = recomputable_values(graph, _value_types(model))
    assert shape == {"s", "n", "n1"} and constant == {"c"}


@pytest.mark.parametrize(("kwargs", "message"), [({"rotate_kernel": "block"}, r"unknown kernel 'block'; choose from \['thread', 'warp'\]"),
                                                 ({"mix": "tf32"}, r"unknown mix route 'tf32'; choose from \['cublas', 'fmaf'\]")])
def test_cupy_kernel_names_a_bad_choice_when_it_is_made(kwargs, message):
    """A misspelt kernel or mix route fails when the kernel is made (no GPU needed), not at the
    first site of the first run."""
    from torq_onnx.runtime_ops.split_runner import cupy_kernel

    with pytest.raises(ValueError, match=message):
        cupy_kernel(**kwargs)


def test_a_bad_model_path_or_a_missing_cuda_stack_is_named(tmp_path, monkeypatch):
    """SplitSession's bad inputs are TorqErrors naming the problem, as load_session's are: no
    file, a file that is not ONNX, external data that is missing; and device='cuda' where
    this onnxruntime has no CUDA EP, or (with one) CuPy does not import."""
    from onnx import TensorProto, helper, numpy_helper

    from torq_onnx.errors import TorqError
    from torq_onnx.runtime_ops import split_runner

    with pytest.raises(TorqError, match="no ONNX model at"):
        SplitSession(tmp_path / "missing.onnx")
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(TorqError, match="is not a readable ONNX model"):
        SplitSession(tmp_path / "notes.onnx")
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [w])
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path, save_as_external_data=True,
              location="ext.data", size_threshold=0)
    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    np.testing.assert_array_equal(SplitSession(path).run(None, {"x": x})[0], x)  # its external weights read
    (tmp_path / "ext.data").unlink()
    with pytest.raises(TorqError, match="the external data of .*ext.onnx could not be read"):
        SplitSession(path)
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_transformer().SerializeToString())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(TorqError, match="this onnxruntime has no CUDAExecutionProvider"):
            SplitSession(model, device="cuda")
    monkeypatch.setattr(split_runner, "require_installed", lambda *a: None)  # as with onnxruntime-gpu
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails
    with pytest.raises(TorqError, match="CuPy, which does not import here"):
        SplitSession(model, device="cuda")
