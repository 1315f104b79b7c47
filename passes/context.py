"""State shared by the export passes: the rotation sites and what each pass learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from torq_onnx.torq import Rotation


@dataclass
class Consumer:
    """One linear layer reading a site's activation: a MatMul (or Gemm) with a constant weight."""

    node_name: str
    weight_name: str
    transposed: bool  # Gemm transB=1: the initializer is W^T [N, D]


@dataclass
class SiteStats:
    """Streaming calibration statistics of one activation: memory independent of sample count."""

    second_moment: np.ndarray  # [B, B] running sum of X X^T over tokens and in-block positions
    tokens: int = 0
    reservoir: np.ndarray | None = None  # [<= capacity, D] uniform sample of token activations
    seen: int = 0
    gram: np.ndarray | None = None  # [D, D] float32 running sum of x x^T (only when a method needs the full moment)

    def hessian(self) -> np.ndarray:
        """``E[x x^T]`` [D, D] per token: GPTQ's Hessian and WUSH's block moments."""
        if self.gram is None:
            raise ValueError("the full second moment was not collected: calibrate with hessian=True")
        return self.gram.astype(np.float64) / max(self.tokens, 1)


@dataclass
class Site:
    """A rotation site: one activation value shared by one or more linear layers."""

    activation: str
    d: int
    consumers: list[Consumer]
    stats: SiteStats | None = None
    rotation: Rotation | None = None
    report: dict = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return self.d // 32

    @property
    def layers(self) -> list[str]:
        """Its linear layers' node names: how report.json and ``--plot-site`` name them."""
        return [c.node_name for c in self.consumers]


@dataclass
class ExportContext:
    """What the pipeline passes hand each other (sites in graph order, skipped layers)."""

    sites: list[Site] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def calibrated_copy(self) -> ExportContext:
        """Same sites and calibration statistics (shared, read-only), no rotations: lets several
        methods be solved from one calibration run."""
        return ExportContext(
            [Site(s.activation, s.d, list(s.consumers), s.stats) for s in self.sites], list(self.skipped)
        )


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new typed, shaped initializer of ``graph`` and return its value."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def node_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {n.name: n for n in graph}


EXTERNAL_MIN_BYTES = 1024  # a working copy keeps initializers of this size or more as external data


def read_weight(value: ir.Value) -> np.ndarray:
    """An initializer's array, without leaving it resident: an external (memory-mapped)
    tensor is copied and unmapped, so reading every weight once never holds them all."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        array = np.array(tensor.numpy())
        tensor.release()
        return array
    return tensor.numpy()


def external_weights_folder(model: ir.Model, min_bytes: int = EXTERNAL_MIN_BYTES) -> Path | None:
    """The one folder all of ``model``'s weights of ``min_bytes`` or more live in as
    external data, or None if some are in memory (or spread over several folders)."""
    folders = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < min_bytes:
            continue
        if not isinstance(tensor, ir.ExternalTensor):
            return None
        folders.add(Path(tensor.base_dir))
    return folders.pop() if len(folders) == 1 else None


def site_weights(graph: ir.Graph, site: Site, nodes: dict[str, ir.Node] | None = None) -> np.ndarray:
    """[D, N_total]: the weights of all the site's consumers side by side, as MatMul reads them."""
    nodes = nodes if nodes is not None else node_by_name(graph)
    mats = []
    for cons in site.consumers:
        w = read_weight(nodes[cons.node_name].inputs[1])
        mats.append(w.T if cons.transposed else w)
    return np.concatenate(mats, axis=1)
