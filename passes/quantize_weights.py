"""QuantizeWeights: MXFP4 weights along the reduction axis, by round-to-nearest or GPTQ."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import mxfp4, weights
from torq_onnx.defaults import WEIGHT_MODES
from torq_onnx.errors import TorqError
from torq_onnx.passes.context import ExportContext, Site, add_initializer, node_by_name, read_weight, site_weights
from torq_onnx.runtime_ops import DEQUANTIZE_WEIGHT, DOMAIN


class QuantizeWeights(InPlacePass):
    """Quantize every consumer weight of every site to MXFP4 (blocks of 32 along D).

    ``rounding`` "rtn": round-to-nearest; "gptq": GPTQ with the site's calibrated input
    second moment carried into the transformed basis (``Q H Q^T``), all consumers of a
    site quantized together (they share H). ``scale_search``: per block and column, keep
    the best of the exponents e-1, e, e+1 (both roundings). ``act_order``: GPTQ sweeps MX
    blocks by input energy (blocks stay contiguous).

    mode "mxfp4": store packed uint8 codes [D/2, N] + E8M0 scales [D/32, N] and insert a
    ``TorqDequantizeMXFP4`` node (ORT constant-folds it at load: 4.25 bits/weight on disk).
    mode "fake": store the quantize-dequantized float weight. mode "float": no-op.
    float16 weights are packed too (a Cast follows the float32 dequantization); Gemm
    weights stored transposed, and other dtypes, are written as "fake".
    Requires: sites (after FoldRotations, so the folded weight is what gets quantized);
    for GPTQ, calibration with the full second moment. Ensures: each consumer computes with
    exactly the dequantized MXFP4 data the quantizer chose (RTN without search:
    ``mxfp4.fake_quantize(W', axis=0)``); ``site.report["weight_error"]`` holds the
    Hessian-weighted error of the chosen rounding (and of plain RTN, for comparison) when
    the moment is known.
    """

    def __init__(self, ctx: ExportContext, mode: str = "mxfp4", scale_rule: mxfp4.ScaleRule = "floor",
                 rounding: str = "rtn", scale_search: bool = False, act_order: bool = False, damp: float = 0.01) -> None:
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight mode {mode!r}; choose one of {WEIGHT_MODES}")
        if rounding not in weights.ROUNDINGS:
            raise ValueError(f"unknown weight rounding {rounding!r}; choose one of {weights.ROUNDINGS}")
        self.ctx, self.mode, self.scale_rule = ctx, mode, scale_rule
        self.rounding, self.scale_search, self.act_order, self.damp = rounding, scale_search, act_order, damp

    def requires(self, model: ir.Model) -> None:
        if self.mode != "float" and self.rounding == "gptq" and any(s.stats is None or s.stats.gram is None for s in self.ctx.sites):
            raise TorqError("GPTQ weights need the full input second moment: calibrate with hessian=True")

    def _quantize_site(self, site: Site, w: np.ndarray) -> mxfp4.MXFP4Tensor:
        h = None
        if site.stats is not None and site.stats.gram is not None:
            h = site.stats.hessian()
            if site.rotation is not None:
                h = site.rotation.moment(h)
        q = weights.quantize_weight(w, self.rounding, h, self.scale_rule, self.scale_search, self.damp, self.act_order)
        if h is not None:
            errors = {self._label(): weights.hessian_weighted_error(w, mxfp4.dequantize(q, np.float64), h)}
            if "rtn" not in errors:  # plain RTN beside the chosen rounding, for comparison
                errors["rtn"] = weights.hessian_weighted_error(w, mxfp4.fake_quantize(w, axis=0, scale_rule=self.scale_rule), h)
            site.report["weight_error"] = errors
        return q

    def _label(self) -> str:
        return self.rounding + ("+search" if self.scale_search else "") + ("+act-order" if self.rounding == "gptq" and self.act_order else "")

    def call(self, model: ir.Model) -> PassResult:
        if self.mode == "float":
            return PassResult(model, modified=False)
        graph = model.graph
        nodes = node_by_name(graph)
        for site in self.ctx.sites:
            q = self._quantize_site(site, site_weights(graph, site, nodes).astype(np.float64))
            col = 0
            for cons in site.consumers:
                node = nodes[cons.node_name]
                w_val = node.inputs[1]
                w = read_weight(w_val)
                n = w.shape[0] if cons.transposed else w.shape[1]
                part = mxfp4.MXFP4Tensor(q.codes[:, col : col + n], q.scale_codes[:, col : col + n], axis=0)
                col += n
                if self.mode == "fake" or cons.transposed or w.dtype not in (np.float32, np.float16):
                    deq = mxfp4.dequantize(part, w.dtype)
                    w_val.const_value = ir.tensor(deq.T.copy() if cons.transposed else deq, name=w_val.name)
                    continue
                p_val = add_initializer(graph, f"{w_val.name}__mxfp4_codes", mxfp4.pack(part.codes, axis=0))
                s_val = add_initializer(graph, f"{w_val.name}__mxfp4_scales", np.ascontiguousarray(part.scale_codes))
                deq = ir.node(DEQUANTIZE_WEIGHT, [p_val, s_val], domain=DOMAIN, name=f"{node.name}__dequant_w")
                deq.outputs[0].name = f"{w_val.name}__dequantized"
                deq.outputs[0].type, deq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), w_val.shape
                graph.insert_before(node, deq)
                weight = deq.outputs[0]
                if w.dtype != np.float32:  # float16 graph: the Cast rounds (and saturates to inf)
                    # exactly as a float16 dequantization would
                    cast = ir.node("Cast", [weight], attributes={"to": int(w_val.dtype)}, name=f"{node.name}__dequant_w_cast")
                    cast.outputs[0].name = f"{w_val.name}__dequantized_{w.dtype}"
                    cast.outputs[0].type, cast.outputs[0].shape = w_val.type, w_val.shape
                    graph.insert_before(node, cast)
                    weight = cast.outputs[0]
                node.replace_input_with(1, weight)
                if not w_val.uses():
                    graph.initializers.pop(w_val.name)
        return PassResult(model, modified=True)
