"""Calibrate: run the graph in ONNX Runtime and stream per-site activation statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
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

    def _instrumented(self, model: ir.Model) -> bytes:
        proto = ir.serde.serialize_model(model)
        present = {o.name for o in proto.graph.output}
        # each activation is exposed in its layers' weight dtype (a MatMul's operands share
        # one), so float16 graphs stay float16
        weights = model.graph.initializers
        for site in self.ctx.sites:
            if site.activation not in present:
                w = weights.get(site.consumers[0].weight_name)
                elem = int(w.dtype) if w is not None and w.dtype is not None else onnx.TensorProto.FLOAT
                proto.graph.output.append(onnx.helper.make_tensor_value_info(site.activation, elem, None))
        return proto.SerializeToString()

    def call(self, model: ir.Model) -> PassResult:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(self._instrumented(model), opts, providers=self.providers)
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
