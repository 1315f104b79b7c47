"""QuantizeWeights: MXFP4 (round-to-nearest) weights along the reduction axis."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import mxfp4
from torq_onnx.passes.context import ExportContext, add_initializer, node_by_name
from torq_onnx.runtime_ops import DEQUANTIZE_WEIGHT, DOMAIN
from torq_onnx.runtime_ops.reference import quantize_weight

WEIGHT_MODES = ("mxfp4", "fake", "float")


class QuantizeWeights(InPlacePass):
    """Quantize every consumer weight of every site to MXFP4 (RTN, blocks of 32 along D).

    mode "mxfp4": store packed uint8 codes [D/2, N] + E8M0 scales [D/32, N] and insert a
    ``TorqDequantizeMXFP4`` node (ORT constant-folds it at load: 4.25 bits/weight on disk).
    mode "fake": store the quantize-dequantized float weight. mode "float": no-op.
    Gemm weights stored transposed are always written as "fake".
    Requires: sites (after FoldRotations, so the folded weight is what gets quantized).
    Ensures: each consumer computes with exactly ``mxfp4.fake_quantize(W', axis=0)``.
    """

    def __init__(self, ctx: ExportContext, mode: str = "mxfp4", scale_rule: mxfp4.ScaleRule = "floor") -> None:
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {mode!r}; choose one of {WEIGHT_MODES}")
        self.ctx, self.mode, self.scale_rule = ctx, mode, scale_rule

    def call(self, model: ir.Model) -> PassResult:
        if self.mode == "float":
            return PassResult(model, modified=False)
        graph = model.graph
        nodes = node_by_name(graph)
        for site in self.ctx.sites:
            for cons in site.consumers:
                node = nodes[cons.node_name]
                w_val = node.inputs[1]
                w = w_val.const_value.numpy()
                if self.mode == "fake" or cons.transposed or w.dtype != np.float32:
                    axis = 1 if cons.transposed else 0
                    w_val.const_value = ir.tensor(mxfp4.fake_quantize(w, axis=axis, scale_rule=self.scale_rule).astype(w.dtype), name=w_val.name)
                    continue
                packed, scales = quantize_weight(w, self.scale_rule)
                p_val = add_initializer(graph, f"{w_val.name}__mxfp4_codes", packed)
                s_val = add_initializer(graph, f"{w_val.name}__mxfp4_scales", scales)
                deq = ir.node(DEQUANTIZE_WEIGHT, [p_val, s_val], domain=DOMAIN, name=f"{node.name}__dequant_w")
                deq.outputs[0].name = f"{w_val.name}__dequantized"
                deq.outputs[0].type, deq.outputs[0].shape = w_val.type, w_val.shape
                graph.insert_before(node, deq)
                node.replace_input_with(1, deq.outputs[0])
                if not w_val.uses():
                    graph.initializers.pop(w_val.name)
        return PassResult(model, modified=True)
