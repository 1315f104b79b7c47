"""Calibrate: run the graph in ONNX Runtime and stream per-site activation statistics."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes import common as common_passes

from torq_onnx import heap, torq
from torq_onnx.errors import TorqError
from torq_onnx.passes.context import ExportContext, Site, SiteStats, external_weights_folder


def update_stats(stats: SiteStats, acts: np.ndarray, rng: np.random.Generator, capacity: int) -> None:
    """Add a batch of token activations [T, D] to running stats (exact second moment + reservoir)."""
    stats.second_moment += torq.block_gram(acts)
    if stats.gram is not None:
        stats.gram += acts.T @ acts  # float32: a D x D moment per site is the calibration's largest memory
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
    TorqError on NaN/Inf activations, naming the site. The model is not modified (what runs
    is a clone whose only outputs are the activations).
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
        bf16 = [v.name for v in model.graph.initializers.values() if v.dtype == ir.DataType.BFLOAT16]
        if bf16 and self.providers == ["CPUExecutionProvider"]:
            raise TorqError(f"the model has bfloat16 weights ({bf16[0]}, ...), which ONNX Runtime's CPU provider cannot run for "
                            "calibration: export the source as float32 (exact for bfloat16 weights; torq-onnx export does this for "
                            "HF and GGUF models) or float16 (--dtype fp16)")

    def _session(self, model: ir.Model, opts):
        """An ORT session of ``model``'s dead-code-free clone whose outputs are the sites'
        activations and nothing else: the LM head, the logits and the KV-cache outputs are
        then neither computed nor held (about 0.2 GB and 5% of the time on SmolLM2-135M).

        The clone shares ``model``'s tensors, and no in-memory proto copy of the weights is
        made: when they are already external tensors in one folder (a working copy,
        :func:`torq_onnx.pipeline.load_working_copy`) ORT gets the graph as bytes and
        memory-maps that folder's data; otherwise the model goes through a temporary file
        with external data."""
        import onnxruntime as ort

        probe = model.clone()
        values = {v.name: v for node in probe.graph for v in node.outputs}
        values.update({v.name: v for v in probe.graph.inputs})
        probe.graph.outputs.clear()
        probe.graph.outputs.extend({s.activation: values[s.activation] for s in self.ctx.sites}.values())
        common_passes.RemoveUnusedNodesPass()(probe)
        folder = external_weights_folder(probe)
        if folder is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            return ort.InferenceSession(ir.serde.serialize_model(probe).SerializeToString(), opts, providers=self.providers)
        with tempfile.TemporaryDirectory(prefix="torq-calib-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(probe, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), opts, providers=self.providers)

    def call(self, model: ir.Model) -> PassResult:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = self._session(model, opts)
        names = [s.activation for s in self.ctx.sites]
        for site in self.ctx.sites:
            site.stats = SiteStats(second_moment=np.zeros((site.blocks, site.blocks)),
                                   gram=np.zeros((site.d, site.d), np.float32) if self.hessian else None)
        rng = np.random.default_rng(self.seed)
        for feeds in self.progress(self.batches):
            outs = sess.run(names, feeds)
            for i, site in enumerate(self.ctx.sites):
                flat = np.asarray(outs[i], dtype=np.float32).reshape(-1, site.d)
                outs[i] = None  # each activation is freed once counted: one window's worth is never held twice
                if not np.isfinite(flat).all():
                    raise TorqError(f"NaN/Inf in calibration activations at '{site.activation}' (input of {site.consumers[0].node_name})")
                update_stats(site.stats, flat, rng, self.capacity)
            del outs
        del sess
        heap.trim()  # the session's weights and arena go back to the OS before the solver's memory is needed
        if any(s.stats.tokens == 0 for s in self.ctx.sites):
            raise TorqError("calibration ran on no data: give at least one calibration sample")
        return PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        for site in self.ctx.sites:
            assert site.stats is not None and site.stats.tokens > 0


def site_covariance(site: Site) -> np.ndarray:
    """Mean second moment Σ[b, b'] (per token and in-block position)."""
    return site.stats.second_moment / (site.stats.tokens * 32)
