"""FoldRotations: absorb each site's inverse rotation into its consumers' weights (W' = Q W)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx.errors import TorqError
from torq_onnx.passes.context import ExportContext, add_initializer, node_by_name, read_weight


class FoldRotations(InPlacePass):
    """Replace each consumer's weight W by Q W (Q^-T W for a non-orthogonal transform;
    float64 product, cast back to W's dtype).

    Requires: sites with rotations (SolveRotations). Ensures: ``MatMul(Q x, W') ==
    MatMul(x, W)`` up to float rounding, for every consumer; a weight initializer shared
    by several consumers is copied first so that each gets its own fold; the weights of a
    site whose rotation is the identity stay as they are (and stay shared). Activations are
    not yet rotated: InsertRotateQuantize must follow, or the model is wrong.
    """

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__()
        self.ctx = ctx

    def requires(self, model: ir.Model) -> None:
        if any(s.rotation is None for s in self.ctx.sites):
            raise TorqError("FoldRotations needs solved rotations: run SolveRotations first")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        nodes = node_by_name(graph)
        for site in self.ctx.sites:
            rot = site.rotation
            if rot.is_identity():
                continue
            for cons in site.consumers:
                node = nodes[cons.node_name]
                w_val = node.inputs[1]
                w = read_weight(w_val)
                w64 = w.astype(np.float64).T if cons.transposed else w.astype(np.float64)
                folded = rot.fold(w64)
                folded = (folded.T if cons.transposed else folded).astype(w.dtype)
                if len(w_val.uses()) == 1:
                    w_val.const_value = ir.tensor(folded, name=w_val.name)
                    continue
                new_val = add_initializer(graph, f"{w_val.name}__torq_{cons.node_name}", folded)
                node.replace_input_with(1, new_val)
                cons.weight_name = new_val.name
        return PassResult(model, modified=True)
