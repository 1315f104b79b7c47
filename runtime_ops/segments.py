"""Cut an exported torq model at its online ops into ORT sub-graphs ("segments").

A plain cut in the exported node order leaves two kinds of values crossing segment
boundaries that should not:

- *constant* values (computed from initializers only: the packed weights' dequantized
  float copies, ``Constant`` nodes). Left in the segment the exporter happened to put them
  in, they become that segment's outputs, copied out on every run, and the reading
  segment gets them as inputs, which ORT can neither fold nor prepack.
- *shape* values (``Shape``/``Size`` and small integer arithmetic on them: the batch and
  sequence lengths an attention block reshapes with). Bound to device memory between
  segments, each one costs the consumer a device-to-host copy, which waits for the stream
  and so stalls the host's queueing of the forward pass.

So each segment recomputes the constant and shape values it reads: their producing nodes
are cloned into it (a cloned ``Shape`` reads its tensor's metadata only), and nodes whose
outputs no segment reads any more are dropped. Only data tensors and graph inputs cross.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from torq_onnx.errors import TorqError
from torq_onnx.runtime_ops.functions import DEQUANTIZE_WEIGHT, DOMAIN, ROTATE_QUANTIZE, bump_threshold, scale_rule_of

SHAPE_SOURCES = frozenset({"Shape", "Size"})
# ops that, on shape-sized inputs, compute shape-sized outputs on the host: safe to repeat
SHAPE_ARITHMETIC = frozenset({
    "Add", "And", "Cast", "Ceil", "Concat", "Div", "Equal", "Floor", "Gather", "Greater", "Identity", "Less",
    "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "ReduceProd", "Reshape", "Slice", "Sqrt", "Squeeze", "Sub",
    "Unsqueeze", "Where",
})
NONDETERMINISTIC = frozenset({"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"})


@dataclass
class OnlineOp:
    """One ``TorqRotateQuantize`` node, taken out of the graph."""

    x: str
    y: str
    r_inter: np.ndarray
    r_intra: np.ndarray
    bump_threshold: float

    @property
    def scale_rule(self) -> str:
        return scale_rule_of(self.bump_threshold)


@dataclass
class Segment:
    """A run of ordinary nodes as its own ONNX model."""

    model: onnx.ModelProto | None  # None once SplitSession has built the session (which holds the weights)
    inputs: list[str]
    outputs: list[str]
    session: object = None  # the ORT session, created by SplitSession
    drop_after: list[str] = field(default_factory=list)  # values no later part reads


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}


def _is_online_op(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == ROTATE_QUANTIZE


def _rank_at_most_one(t: onnx.TypeProto | None) -> bool:
    return t is not None and t.tensor_type.HasField("shape") and len(t.tensor_type.shape.dim) <= 1


def recomputable_values(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> tuple[set[str], set[str]]:
    """(constant, shape) value names of ``graph``, nodes in topological order.

    constant: every input an initializer or constant (a ``Constant`` node has none), the op
    deterministic, standard or a torq weight dequantization, without subgraphs.
    shape: the output of ``Shape``/``Size``, or of shape arithmetic whose inputs are all
    shape values or constant scalars and vectors (never a weight table), known to be a
    scalar or a vector itself (a shape, not data).
    """
    initializers = {t.name for t in graph.initializer}
    constant, shape = set(initializers), set()
    small_constant = {t.name for t in graph.initializer if len(t.dims) <= 1}
    for node in graph.node:
        inputs = [v for v in node.input if v]
        outputs = [v for v in node.output if v]
        standard = node.domain in ("", "ai.onnx")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if (standard and node.op_type not in NONDETERMINISTIC or node.domain == DOMAIN and node.op_type == DEQUANTIZE_WEIGHT) \
                and all(v in constant for v in inputs):
            constant.update(outputs)
            small_constant.update(v for v in outputs if _rank_at_most_one(types.get(v)))
        elif standard and all(_rank_at_most_one(types.get(v)) for v in outputs) and (
                node.op_type in SHAPE_SOURCES
                or node.op_type in SHAPE_ARITHMETIC and all(v in small_constant or v in shape for v in inputs)):
            shape.update(outputs)
    return constant - initializers, shape


def _groups(graph: onnx.GraphProto) -> list[list[onnx.NodeProto] | onnx.NodeProto]:
    """The nodes between online ops (lists) and the online ops themselves, in order."""
    groups: list[list[onnx.NodeProto] | onnx.NodeProto] = [[]]
    for node in graph.node:
        if _is_online_op(node):
            groups += [node, []]
        else:
            groups[-1].append(node)
    return groups


def _clone_recomputable_inputs(group: list[onnx.NodeProto], recomputable: set[str], producer: dict[str, onnx.NodeProto],
                               order: dict[int, int]) -> None:
    """Add to ``group`` (in place, original order) the producers of the recomputable values it
    reads from elsewhere, transitively."""
    have = {v for node in group for v in node.output}
    added: dict[int, onnx.NodeProto] = {}
    pending = [v for node in group for v in node.input if v in recomputable and v not in have]
    while pending:
        v = pending.pop()
        node = producer[v]
        if v in have or id(node) in added:
            continue
        added[id(node)] = node
        have.update(node.output)
        pending += [u for u in node.input if u in recomputable and u not in have]
    if added:
        group[:] = sorted([*group, *added.values()], key=lambda n: order[id(n)])


def _external_reads(group: list[onnx.NodeProto]) -> list[str]:
    produced: set[str] = set()
    reads: list[str] = []
    for node in group:
        reads += [v for v in node.input if v and v not in produced]
        produced.update(v for v in node.output if v)
    return list(dict.fromkeys(reads))


def split_model(model: onnx.ModelProto, recompute: bool = True) -> list[Segment | OnlineOp]:
    """Cut ``model`` (nodes in topological order, as exported) at its TorqRotateQuantize
    nodes: alternating segments and online ops, in execution order. Each segment
    recomputes the constant and shape values it reads (see the module docstring);
    ``recompute=False`` keeps the plain cut in exported order, the baseline it improves on."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    types = _value_types(model)
    constant, shape = recomputable_values(graph, types)
    recomputable = constant | shape
    producer = {v: node for node in graph.node for v in node.output if v}
    order = {id(node): i for i, node in enumerate(graph.node)}
    groups = _groups(graph)
    for group in groups:
        if recompute and isinstance(group, list):
            _clone_recomputable_inputs(group, recomputable, producer, order)

    # one backward sweep: drop nodes nothing later reads, and note what each group must output
    live = {o.name for o in graph.output}
    needed_after: list[set[str]] = [set() for _ in groups]
    for k in range(len(groups) - 1, -1, -1):
        group = groups[k]
        needed_after[k] = set(live)
        if not isinstance(group, list):
            live.add(group.input[0])
            continue
        kept = []
        for node in reversed(group):
            if any(v in live for v in node.output):
                kept.append(node)
                live.update(v for v in node.input if v)
        group[:] = kept[::-1]
        live -= {v for node in group for v in node.output}
        live.update(_external_reads(group))

    parts: list[Segment | OnlineOp] = []
    for k, group in enumerate(groups):
        if not isinstance(group, list):
            parts.append(_online_op(group, inits))
        elif group:
            parts.append(_segment(model, group, f"segment{k}", needed_after[k], inits, types))
    return parts


def _online_op(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> OnlineOp:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, r_inter, r_intra = node.input
    if r_inter not in inits or r_intra not in inits:
        raise TorqError(f"{node.name}: rotation inputs must be initializers to split the graph")
    return OnlineOp(x, node.output[0], numpy_helper.to_array(inits[r_inter]), numpy_helper.to_array(inits[r_intra]),
                    float(attrs.get("bump_threshold", bump_threshold("floor"))))


def _segment(model: onnx.ModelProto, group: list[onnx.NodeProto], name: str, needed_after: set[str],
             inits: dict[str, onnx.TensorProto], types: dict[str, onnx.TypeProto]) -> Segment:
    used = _external_reads(group)
    inputs = [v for v in used if v not in inits]
    outputs = [v for node in group for v in node.output if v and v in needed_after]
    missing = [v for v in inputs + outputs if v not in types]
    if missing:
        raise TorqError(f"cannot split the graph: no type known for {', '.join(missing[:5])}")
    sub = helper.make_graph(group, name, [helper.make_value_info(v, types[v]) for v in inputs],
                            [helper.make_value_info(v, types[v]) for v in outputs], [inits[v] for v in used if v in inits])
    seg_model = helper.make_model(sub, opset_imports=list(model.opset_import), functions=list(model.functions),
                                  ir_version=model.ir_version)
    return Segment(seg_model, inputs, outputs)


def crossing_values(model: onnx.ModelProto, parts: list[Segment | OnlineOp]) -> dict[str, list[str]]:
    """The values a segment reads from an earlier segment, by kind ("constant", "shape",
    "data"): what travels between ORT runs (graph inputs and op outputs not counted)."""
    constant, shape = recomputable_values(model.graph, _value_types(model))
    from_segments = {v for p in parts if isinstance(p, Segment) for v in p.outputs}
    read = list(dict.fromkeys(v for p in parts if isinstance(p, Segment) for v in p.inputs if v in from_segments))
    return {
        "constant": [v for v in read if v in constant],
        "shape": [v for v in read if v in shape],
        "data": [v for v in read if v not in constant and v not in shape],
    }
