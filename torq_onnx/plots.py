"""PNG plots of one rotation site from report.json: block variances (paper Fig. 2) and FP4
codeword occupancy (Fig. 3), before and after the rotation."""

from __future__ import annotations

import io

import numpy as np

from torq_onnx.errors import TorqError
from torq_onnx.mxfp4 import FP4_MAGNITUDES


def choose_site(report: dict, site: str | int | None = None) -> dict:
    """The site to plot: by index or activation name; by default the one whose block
    variances were most uneven before rotation (where the method has the most to do)."""
    sites = report["sites"]
    if not sites:
        raise TorqError("the report has no rotation sites to plot")
    if site is None:
        return max(sites, key=lambda s: s["block_variance_spread"]["before"])
    if isinstance(site, int) or str(site).isdigit():
        k = int(site)
        if not 0 <= k < len(sites):
            raise TorqError(f"site index {k} out of range (0..{len(sites) - 1})")
        return sites[k]
    for s in sites:
        if s["activation"] == site or site in s["layers"]:
            return s
    raise TorqError(f"no rotation site named {site!r} (give an activation name, a layer name or an index)")


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Label the axes, render the figure to PNG bytes and free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _before_after(plt, values: dict, labels: tuple[str, str], reference: tuple[float, str], size: tuple[float, float]):
    """A figure with paired before/after bars and a dashed reference line."""
    before, after = (np.asarray(values[k]) for k in ("before", "after"))
    fig, ax = plt.subplots(figsize=size)
    idx = np.arange(before.size)
    ax.bar(idx - 0.2, before, width=0.4, label=labels[0], color="tab:red")
    ax.bar(idx + 0.2, after, width=0.4, label=labels[1], color="tab:blue")
    ax.axhline(reference[0], color="k", lw=0.8, ls="--", label=reference[1])
    return fig, ax


def site_plots(site: dict, method: str) -> dict[str, bytes]:
    """{"block_variance.png": ..., "codeword_occupancy.png": ...} for one report site."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    layer = site["layers"][0] + (f" (+{len(site['layers']) - 1})" if len(site["layers"]) > 1 else "")
    out: dict[str, bytes] = {}

    spread = site["block_variance_spread"]
    fig, ax = _before_after(
        plt, site["block_variances"],
        (f"before (spread {spread['before']:.2f})", f"after {method} (spread {spread['after']:.2f})"),
        (float(np.mean(site["block_variances"]["before"])), "tr(Σ)/B"), (8, 3.6),
    )
    ax.set_yscale("log")
    out["block_variance.png"] = _finish(plt, fig, ax, "block (32 channels each)", "mean square", f"Per-block variance, {layer}")

    ent = site["codebook_entropy_bits"]
    fig, ax = _before_after(
        plt, site["codeword_occupancy"],
        (f"before ({ent['before']:.2f} bits)", f"after {method} ({ent['after']:.2f} bits)"),
        (1 / FP4_MAGNITUDES.size, "uniform (3 bits)"), (6, 3.6),
    )
    ax.set_xticks(np.arange(FP4_MAGNITUDES.size), [f"±{m:g}" for m in FP4_MAGNITUDES])
    out["codeword_occupancy.png"] = _finish(plt, fig, ax, "FP4 E2M1 magnitude", "fraction of elements", f"FP4 codeword occupancy, {layer}")
    return out
