"""InsertRotateQuantize: put the online rotation (+ MXFP4 activation quantizer) before each site."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import mxfp4
from torq_onnx.passes.context import ExportContext, Site, add_initializer, node_by_name
from torq_onnx.runtime_ops import DOMAIN, ROTATE_QUANTIZE
from torq_onnx.runtime_ops.functions import ROTATE, bump_threshold, op_r_inter


class InsertRotateQuantize(InPlacePass):
    """Insert ``ai.torq::TorqRotateQuantize(x, R_inter, R_intra)`` between each site's
    activation and its consumers (``TorqRotate`` when ``quantize_activations`` is False).

    Requires: FoldRotations has run with the same rotations. Ensures: every consumer of
    every site reads the rotated (and quantized) activation; the rotation factors are
    float32 initializers named after the site; the model's function is unchanged when
    activations are not quantized. A site with float activations and the identity
    rotation (rtn) gets no node: its consumers keep reading the source activation, so a
    float export runs the source graph's own nodes.
    """

    def __init__(self, ctx: ExportContext, quantize_activations: bool = True, scale_rule: mxfp4.ScaleRule = "floor") -> None:
        super().__init__()
        self.ctx, self.quantize, self.scale_rule = ctx, quantize_activations, scale_rule

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        nodes = node_by_name(graph)
        position = {node: k for k, node in enumerate(graph)}  # graph.index is O(N) per call
        modified = False
        for i, site in enumerate(self.ctx.sites):
            if not self._needs_node(site):
                continue
            consumers = [nodes[c.node_name] for c in site.consumers]
            x = consumers[0].inputs[0]
            inits = [
                add_initializer(graph, f"torq_site{i}_{tag}", mat.astype(np.float32))
                for tag, mat in (("r_inter", op_r_inter(site.rotation.r_inter)), ("r_intra", site.rotation.r_intra))
            ]
            if self.quantize:
                node = ir.node(ROTATE_QUANTIZE, [x, *inits], {"bump_threshold": bump_threshold(self.scale_rule)}, domain=DOMAIN, name=f"torq_site{i}")
            else:
                node = ir.node(ROTATE, [x, *inits], domain=DOMAIN, name=f"torq_site{i}")
            node.outputs[0].name = f"torq_site{i}_out"
            node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
            graph.insert_before(min(consumers, key=position.__getitem__), node)  # earliest consumer: topological order holds
            for c in consumers:
                c.replace_input_with(0, node.outputs[0])
            modified = True
        return PassResult(model, modified=modified)

    def _needs_node(self, site: Site) -> bool:
        return self.quantize or not site.rotation.is_identity()

    def ensures(self, model: ir.Model) -> None:
        nodes = node_by_name(model.graph)
        for site in self.ctx.sites:
            for c in site.consumers:
                producer = nodes[c.node_name].inputs[0].producer()
                online = producer is not None and producer.domain == DOMAIN
                assert online == self._needs_node(site), c.node_name
