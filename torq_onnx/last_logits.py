"""A decoder graph that computes its logits at the last position only, for generation.

Generation reads one row of the ``logits`` output, ``[batch, T, vocab]``, per pass: the last
position's. A prefill of T prompt tokens still runs the LM head on all T positions, and a
session bound on a GPU copies all of them to the host: at T = 512 on SmolLM2-135M that is
96 MB of logits (tools/bench_prefill.py measures the time). ORT runs every node of a graph
whatever outputs a run asks for, so the graph itself is changed, in memory: the LM head's
input is sliced to its last position, and ``logits`` becomes ``[batch, 1, vocab]``.

Only the LM head's product is moved: the slice goes on the activation input of the MatMul
that (through Cast or Identity nodes) produces ``logits``, which computes each position's
row on its own; nothing else reads the sliced value, so every other output (the KV cache)
is computed as before. A graph whose logits come another way is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from torq_onnx.runtime_ops.functions import default_opset

LOGITS = "logits"
PASS_THROUGH = {"Cast", "Identity"}  # elementwise ops a logits chain may end with (e.g. a float16 graph's Cast)
MIN_OPSET = 13  # Slice with negative axes and inputs for starts/ends/axes
PREFIX = "torq_onnx_last_position"


def lm_head_chain(graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    """The nodes from the MatMul whose product becomes ``logits`` to the one that writes it
    (pass-through nodes only between them), MatMul first; None for any other form."""
    producers = {out: node for node in graph.node for out in node.output}
    chain: list[onnx.NodeProto] = []
    node = producers.get(LOGITS)
    while node is not None and node.domain in ("", "ai.onnx") and node.op_type in PASS_THROUGH:
        chain.append(node)
        node = producers.get(node.input[0])
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type != "MatMul":
        return None
    return [node, *reversed(chain)]


def slice_logits_to_last_position(model: onnx.ModelProto) -> bool:
    """Rewrite ``model`` in place so that ``logits`` is the last position's, ``[..., 1, vocab]``;
    False (``model`` untouched) where the graph does not have the form this handles."""
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if LOGITS not in outputs or default_opset(model, 0) < MIN_OPSET:
        return False
    chain = lm_head_chain(graph)
    if chain is None:
        return False
    matmul = chain[0]
    hidden = matmul.input[0]
    if hidden in {t.name for t in graph.initializer}:  # a weight first: not the [..., T, hidden] activation
        return False
    last = f"{PREFIX}/{hidden}"
    consts = {f"{PREFIX}/{name}": np.array([value], np.int64)
              for name, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", -2))}
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in consts.items())
    slice_node = helper.make_node("Slice", [hidden, *consts], [last], name=f"{PREFIX}/Slice")
    matmul.input[0] = last
    nodes = list(graph.node)
    nodes.insert(nodes.index(matmul), slice_node)  # keeps the node list in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    # the chain's values have one position now: drop shapes recorded for T positions
    changed = {out for node in chain for out in node.output}
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    dims = outputs[LOGITS].type.tensor_type.shape.dim
    if len(dims) >= 2:
        dims[-2].Clear()
        dims[-2].dim_value = 1
    return True
