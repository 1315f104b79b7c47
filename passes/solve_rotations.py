"""SolveRotations: one (R_inter, R_intra) pair per site by the chosen method, with diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import mxfp4, torq
from torq_onnx.errors import TorqError
from torq_onnx.passes.calibrate import site_covariance
from torq_onnx.passes.context import ExportContext, Site


def site_report(site: Site, scale_rule: mxfp4.ScaleRule) -> dict:
    """Before/after statistics on the site's calibration reservoir (goes to report.json)."""
    x = site.stats.reservoir.astype(np.float64)
    rot = site.rotation
    z = torq.apply_rotation(x, rot.r_inter, rot.r_intra)
    rows = lambda a: a.reshape(-1, 32)  # noqa: E731
    return {
        "activation": site.activation,
        "hidden_size": site.d,
        "layers": [c.node_name for c in site.consumers],
        "calibration_tokens": site.stats.tokens,
        "block_variance_spread": {"before": torq.block_variance_spread(x), "after": torq.block_variance_spread(z)},
        "codebook_entropy_bits": {"before": torq.codebook_entropy(rows(x), scale_rule), "after": torq.codebook_entropy(rows(z), scale_rule)},
        "activation_quant_error": {"before": mxfp4.relative_error(x, scale_rule=scale_rule), "after": mxfp4.relative_error(z, scale_rule=scale_rule)},
        # per-block variances and FP4 magnitude occupancy: what the plots show
        "block_variances": {"before": torq.block_variances(x).tolist(), "after": torq.block_variances(z).tolist()},
        "codeword_occupancy": {"before": torq.codeword_occupancy(x, scale_rule).tolist(), "after": torq.codeword_occupancy(z, scale_rule).tolist()},
        "solver": rot.info,
    }


class SolveRotations(InPlacePass):
    """Solve each site's rotation (rtn | brq | quarot | torq).

    Requires: sites with calibration stats (Calibrate; rtn/brq/quarot only need sites).
    Ensures: every site has an orthogonal ``rotation`` (checked to 1e-8) and a ``report``
    entry. The graph is not modified.
    """

    def __init__(self, ctx: ExportContext, method: str, scale_rule: mxfp4.ScaleRule = "floor", seed: int = 0,
                 progress: Callable[[Iterable], Iterable] | None = None, solver_options: dict | None = None) -> None:
        super().__init__()
        if method not in torq.METHODS:
            raise TorqError(f"unknown method {method!r}; choose one of {', '.join(torq.METHODS)}")
        self.ctx, self.method, self.scale_rule, self.seed = ctx, method, scale_rule, seed
        self.progress = progress or (lambda it: it)
        self.solver_options = solver_options or {}  # extra torq.solve_rotation keywords (ablations)

    def requires(self, model: ir.Model) -> None:
        if any(s.stats is None for s in self.ctx.sites):
            raise TorqError("SolveRotations needs calibration statistics: run Calibrate first")

    def call(self, model: ir.Model) -> PassResult:
        for i, site in enumerate(self.progress(self.ctx.sites)):
            site.rotation = torq.solve_rotation(
                self.method, site.d, cov=site_covariance(site), sample_rows=site.stats.reservoir,
                scale_rule=self.scale_rule, seed=self.seed + i, **self.solver_options,
            )
            site.report = site_report(site, self.scale_rule)
        return PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        for site in self.ctx.sites:
            rot = site.rotation
            assert torq.orthogonality_error(rot.r_inter) < 1e-8 and torq.orthogonality_error(rot.r_intra) < 1e-8, site.activation
