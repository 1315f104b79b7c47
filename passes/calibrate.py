"""Calibrate: run the graph in ONNX Runtime and stream per-site activation statistics."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from torq_onnx import torq
from torq_onnx.errors import TorqError
from torq_onnx.passes.context import ExportContext, Site, SiteStats


def update_stats(stats: SiteStats, acts: np.ndarray, rng: np.random.Generator, capacity: int) -> None:
    """Add a batch of token activations [T, D] to running stats (exact second moment + reservoir)."""
    stats.second_moment += torq.block_gram(acts)
    if stats.gram is not None:
        stats.gram += acts.T @ acts  # float32 GEMM per batch, float64 running sum
    stats.tokens += acts.shape[0]
    # reservoir sampling (Algorithm R), vectorized over the batch
    if stats.reservoir is None:
        stats.reservoir = np.empty((0, acts.shape[1]), dtype=np.float32)
    take = min(capacity - stats.reservoir.shape[0], acts.shape[0])
    if take > 0:
        stats.reservoir = np.concatenate([stats.reservoir, acts[:take].astype(np.float32)])
    rest = np.arange(max(take, 0), acts.shape[0])
    if rest.size:
        slots = rng.integers(0, stats.seen + rest + 1)  # token i replaces a slot w.p. capacity/(i+1)
        hit = slots < capacity
        stats.reservoir[slots[hit]] = acts[rest[hit]]
    stats.seen += acts.shape[0]


class Calibrate(InPlacePass):
    """Collect activation statistics for every site by running the model in ORT.

    Requires: ``ctx.sites`` (FindLinearInputs) and an iterable of feed dicts matching the
    model's inputs. Ensures: every site has ``stats`` with ``tokens > 0``, a B x B second
    moment (summed over tokens and in-block positions) and a bounded reservoir of token
    activations; with ``hessian`` also the full D x D second moment (GPTQ, WUSH); memory
    does not grow with the number of calibration samples. Raises
    TorqError on NaN/Inf activations, naming the site. The model is not modified (a
    serialized copy with the activations as extra outputs is what runs).
    """

    def __init__(
        self,
        ctx: ExportContext,
        batches: Iterable[dict[str, np.ndarray]],
        reservoir_tokens: int = 2048,
        seed: int = 0,
        progress: Callable[[Iterable], Iterable] | None = None,
        providers: list[str] | None = None,
        hessian: bool = False,
    ) -> None:
        super().__init__()
        self.ctx, self.batches, self.hessian = ctx, batches, hessian
        self.capacity, self.seed = reservoir_tokens, seed
        self.progress = progress or (lambda it: it)
        self.providers = providers or ["CPUExecutionProvider"]

    def requires(self, model: ir.Model) -> None:
        if not self.ctx.sites:
            raise TorqError("Calibrate needs rotation sites: run FindLinearInputs first")

    def _session(self, model: ir.Model, opts):
        """An ORT session of ``model`` with every site's activation as an extra output.

        The model goes to ORT through a temporary file with external data rather than as
        serialized bytes, so no full in-memory proto copy of the weights is ever made (the
        graph outputs are added for the save and removed again)."""
        import onnxruntime as ort

        values = {v.name: v for node in model.graph for v in node.outputs}
        values.update({v.name: v for v in model.graph.inputs})
        present = {o.name for o in model.graph.outputs}
        added = []
        for site in self.ctx.sites:
            if site.activation not in present and site.activation in values:
                added.append(values[site.activation])
                present.add(site.activation)
        model.graph.outputs.extend(added)
        try:
            with tempfile.TemporaryDirectory(prefix="torq-calib-") as tmp:
                path = Path(tmp) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data")
                return ort.InferenceSession(str(path), opts, providers=self.providers)
        finally:
            for _ in added:
                model.graph.outputs.pop()

    def call(self, model: ir.Model) -> PassResult:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = self._session(model, opts)
        names = [s.activation for s in self.ctx.sites]
        for site in self.ctx.sites:
            site.stats = SiteStats(second_moment=np.zeros((site.blocks, site.blocks)),
                                   gram=np.zeros((site.d, site.d)) if self.hessian else None)
        rng = np.random.default_rng(self.seed)
        for feeds in self.progress(self.batches):
            outs = sess.run(names, feeds)
            for site, act in zip(self.ctx.sites, outs):
                flat = np.asarray(act, dtype=np.float32).reshape(-1, site.d)
                if not np.isfinite(flat).all():
                    raise TorqError(f"NaN/Inf in calibration activations at '{site.activation}' (input of {site.consumers[0].node_name})")
                update_stats(site.stats, flat, rng, self.capacity)
        if any(s.stats.tokens == 0 for s in self.ctx.sites):
            raise TorqError("calibration ran on no data: give at least one calibration sample")
        return PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        for site in self.ctx.sites:
            assert site.stats is not None and site.stats.tokens > 0


def site_covariance(site: Site) -> np.ndarray:
    """Mean second moment Σ[b, b'] (per token and in-block position)."""
    return site.stats.second_moment / (site.stats.tokens * 32)
