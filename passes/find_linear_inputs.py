"""FindLinearInputs: locate rotation sites (activations feeding MatMul/Gemm with constant weights)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx.errors import TorqError
from torq_onnx.passes.context import Consumer, ExportContext, Site
from torq_onnx.runtime_ops import DOMAIN


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """The constant 2-D weight of a linear node and whether it is stored transposed, else None."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or len(w.const_value.shape) != 2:
        return None
    if node.op_type == "MatMul":
        return w, False
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0 or attrs.get_float("alpha", 1.0) != 1.0:
            return None
        return w, attrs.get_int("transB", 0) == 1
    return None


def _feeds_graph_output(node: ir.Node, outs: set[int]) -> bool:
    """True for the LM head: its output (possibly through one Add) is a graph output (ids in ``outs``)."""
    for out in node.outputs:
        if id(out) in outs:
            return True
        for user, _ in out.uses():
            if user.op_type == "Add" and any(id(o) in outs for o in user.outputs):
                return True
    return False


class FindLinearInputs(InPlacePass):
    """Group linear layers by the activation they read; each group is one rotation site.

    Requires: a model whose main graph has MatMul/Gemm nodes with 2-D constant weights and
    no torq ops (not an export already).
    Ensures: ``ctx.sites`` lists every site with hidden size D a multiple of 32, its
    consumers and their weight initializers (graph order); layers left out (LM head,
    D not a multiple of 32) are listed in ``ctx.skipped`` with the reason. Raises
    TorqError if nothing can be rotated. The graph itself is not modified.
    """

    def __init__(self, ctx: ExportContext, include_lm_head: bool = False) -> None:
        super().__init__()
        self.ctx = ctx
        self.include_lm_head = include_lm_head

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        by_act: dict[str, Site] = {}
        graph_outputs = {id(v) for v in graph.outputs}
        linear = 0
        for node in graph:
            found = _weight_of(node)
            if found is None or node.inputs[0] is None:
                continue
            linear += 1
            w, transposed = found
            d = w.const_value.shape[1 if transposed else 0]
            act = node.inputs[0]
            if not self.include_lm_head and _feeds_graph_output(node, graph_outputs):
                self.ctx.skipped.append({"node": node.name, "reason": "LM head (output layer) kept in float"})
                continue
            if d % 32:
                self.ctx.skipped.append({"node": node.name, "reason": f"hidden size {d} is not a multiple of 32"})
                continue
            site = by_act.setdefault(act.name, Site(activation=act.name, d=d, consumers=[]))
            site.consumers.append(Consumer(node.name, w.name, transposed))
        if linear == 0:
            raise TorqError("no linear layer found: the model has no MatMul/Gemm with a constant 2-D weight initializer")
        if not by_act:
            reasons = sorted({s["reason"] for s in self.ctx.skipped})
            raise TorqError(f"no linear layer can be rotated: {'; '.join(reasons)}")
        self.ctx.sites = list(by_act.values())
        return PassResult(model, modified=False)

    def requires(self, model: ir.Model) -> None:
        torq_ops = sorted({n.op_type for n in model.graph if n.domain == DOMAIN})
        if torq_ops:  # its layers are already transformed and quantized: a second pass would quantize twice
            method = model.metadata_props.get("torq.method")
            raise TorqError(f"the model is already a torq-onnx export ({', '.join(torq_ops)}"
                            f"{f'; method {method}' if method else ''}): export its float source instead")
        names = [n.name for n in model.graph]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise TorqError("graph nodes need unique, non-empty names (run NameNodes first)")

    def ensures(self, model: ir.Model) -> None:
        for site in self.ctx.sites:
            assert site.d % 32 == 0 and site.consumers, site
