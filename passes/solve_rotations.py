"""SolveRotations: one (R_inter, R_intra) pair per site by the chosen method, with diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import mxfp4, output_error, torq
from torq_onnx.errors import TorqError
from torq_onnx.passes.calibrate import site_covariance
from torq_onnx.passes.context import ExportContext, Site, node_by_name, site_weights


def site_report(site: Site, scale_rule: mxfp4.ScaleRule, output_errors: dict[str, float]) -> dict:
    """Before/after statistics on the site's calibration reservoir (goes to report.json)."""
    x = site.stats.reservoir.astype(np.float64)
    rot = site.rotation
    z = torq.apply_rotation(x, rot.r_inter, rot.r_intra)
    rows = lambda a: a.reshape(-1, 32)  # noqa: E731
    return {
        "activation": site.activation,
        "hidden_size": site.d,
        "layers": site.layers,
        "calibration_tokens": site.stats.tokens,
        "block_variance_spread": {"before": torq.block_variance_spread(x), "after": torq.block_variance_spread(z)},
        "codebook_entropy_bits": {"before": torq.codebook_entropy(rows(x), scale_rule), "after": torq.codebook_entropy(rows(z), scale_rule)},
        "activation_quant_error": {"before": mxfp4.relative_error(x, scale_rule=scale_rule), "after": mxfp4.relative_error(z, scale_rule=scale_rule)},
        # error of the layer output x W as deployed (weight-aware), on a random subset of the
        # reservoir (with the output guard: rows torq was not fitted to); before = no rotation
        "layer_output_error": output_errors,
        # per-block variances and FP4 magnitude occupancy: what the plots show
        "block_variances": {"before": torq.block_variances(x).tolist(), "after": torq.block_variances(z).tolist()},
        "codeword_occupancy": {"before": torq.codeword_occupancy(x, scale_rule).tolist(), "after": torq.codeword_occupancy(z, scale_rule).tolist()},
        "solver": rot.info,
    }


class SolveRotations(InPlacePass):
    """Solve each site's transform (rtn | brq | quarot | torq | wush | torq-wush).

    With ``output_guard`` (torq only), each site keeps whichever of the four combinations
    R_inter in {Schur-Horn, I} x R_intra in {refined, 32x32 Hadamard} (torq, torq-no-inter,
    torq-no-intra, brq) gives the lowest weight-aware layer output error on the calibration
    tokens (:mod:`torq_onnx.output_error`), with the deployed weight/activation quantization.
    The guard judges on a random half of the calibration reservoir that torq did not fit.

    Requires: sites with calibration stats (Calibrate; wush and torq-wush need its full
    second moment) and the consumers' original (unfolded) weights in the graph. Ensures:
    every site has a ``rotation``, orthogonal (checked to 1e-8) for every method but the
    WUSH ones, whose per-block transforms are checked finite and invertible, and a
    ``report`` entry. The graph is not modified.
    """

    REPORT_TOKENS = 512  # layer-output error in the report: a random subset keeps it cheap
    GUARD_TOKENS = 1024  # the guard's held-out judging set
    REPORT_COLUMNS = 512  # output columns the layer error is measured on (weights are quantized per column)

    def __init__(self, ctx: ExportContext, method: str, scale_rule: mxfp4.ScaleRule = "floor", seed: int = 0,
                 progress: Callable[[Iterable], Iterable] | None = None, solver_options: dict | None = None,
                 quantize_weights: bool = True, quantize_activations: bool = True, output_guard: bool = False) -> None:
        super().__init__()
        if method not in torq.METHODS:
            raise TorqError(f"unknown method {method!r}; choose one of {', '.join(torq.METHODS)}")
        self.ctx, self.method, self.scale_rule, self.seed = ctx, method, scale_rule, seed
        self.progress = progress or (lambda it: it)
        self.solver_options = solver_options or {}  # extra torq.solve_rotation keywords (ablations)
        self.quant = {"quantize_weights": quantize_weights, "quantize_activations": quantize_activations, "scale_rule": scale_rule}
        self.output_guard = output_guard and method == "torq"

    def requires(self, model: ir.Model) -> None:
        if any(s.stats is None for s in self.ctx.sites):
            raise TorqError("SolveRotations needs calibration statistics: run Calibrate first")
        if self.method in torq.NEEDS_HESSIAN and any(s.stats.gram is None for s in self.ctx.sites):
            raise TorqError(f"--method {self.method} needs the full input second moment: run Calibrate with hessian=True")

    def call(self, model: ir.Model) -> PassResult:
        nodes = node_by_name(model.graph)
        for i, site in enumerate(self.progress(self.ctx.sites)):
            fit, check = self._split(site.stats.reservoir, self.seed + i)
            w_all = site_weights(model.graph, site, nodes)
            data = {"hessian": site.stats.hessian(), "weights": w_all} if self.method in torq.NEEDS_HESSIAN else {}
            rot = torq.solve_rotation(
                self.method, site.d, cov=site_covariance(site), sample_rows=fit,
                scale_rule=self.scale_rule, seed=self.seed + i, **self.solver_options, **data,
            )
            w = self._columns(w_all, self.seed + i)
            before = output_error.layer_output_error(check, w, torq.identity_rotation(site.d), **self.quant)
            if self.output_guard:
                h32, eye = torq.hadamard(torq.BLOCK_SIZE), np.eye(site.blocks)
                candidates = {"torq": rot, "torq-no-inter": torq.Rotation(eye, rot.r_intra),
                              "torq-no-intra": torq.Rotation(rot.r_inter, h32), "brq": torq.Rotation(eye, h32)}
                chosen, errors = output_error.guarded_choice(candidates, check, w, **self.quant)
                site.rotation = torq.Rotation(candidates[chosen].r_inter, candidates[chosen].r_intra,
                                              {**rot.info, "output_guard": {"chosen": chosen, "errors": errors}})
                after = errors[chosen]
            else:
                site.rotation = rot
                after = output_error.layer_output_error(check, w, rot, **self.quant)
            site.report = site_report(site, self.scale_rule, {"before": before, "after": after})
        return PassResult(model, modified=False)

    def _columns(self, w: np.ndarray, seed: int) -> np.ndarray:
        """A random subset of the layer's output columns: each column's error is exact, and
        quantizing all of a wide gate/up weight for every candidate was the metric's main cost."""
        if w.shape[1] <= self.REPORT_COLUMNS:
            return w
        return w[:, np.sort(np.random.default_rng(seed).choice(w.shape[1], self.REPORT_COLUMNS, replace=False))]

    def _split(self, reservoir: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows to solve on, rows to judge the layer-output error on). With the guard the two
        are disjoint halves of the reservoir: judged on the rows it was fitted to, torq would
        look better than the data-independent brq only because it fitted them (selection bias)."""
        order = np.random.default_rng(seed).permutation(reservoir.shape[0])
        if not self.output_guard:
            return reservoir, reservoir[np.sort(order[: self.REPORT_TOKENS])]
        half = reservoir.shape[0] // 2
        return reservoir[np.sort(order[half:])], reservoir[np.sort(order[: min(half, self.GUARD_TOKENS)])]

    def ensures(self, model: ir.Model) -> None:
        for site in self.ctx.sites:
            rot = site.rotation
            if rot.orthogonal:
                assert torq.orthogonality_error(rot.r_inter) < 1e-8 and torq.orthogonality_error(rot.r_intra) < 1e-8, site.activation
            else:  # data-aware transforms must at least be finite and invertible
                assert np.isfinite(rot.r_intra).all() and np.all(np.linalg.cond(rot.r_intra) < 1e12), site.activation
