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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def site_plots(site: dict, method: str) -> dict[str, bytes]:
    """{"block_variance.png": ..., "codeword_occupancy.png": ...} for one report site."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    layer = site["layers"][0] + (f" (+{len(site['layers']) - 1})" if len(site["layers"]) > 1 else "")
    out: dict[str, bytes] = {}

    before, after = (np.asarray(site["block_variances"][k]) for k in ("before", "after"))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    idx = np.arange(before.size)
    ax.bar(idx - 0.2, before, width=0.4, label=f"before (spread {site['block_variance_spread']['before']:.2f})", color="tab:red")
    ax.bar(idx + 0.2, after, width=0.4, label=f"after {method} (spread {site['block_variance_spread']['after']:.2f})", color="tab:blue")
    ax.axhline(before.mean(), color="k", lw=0.8, ls="--", label="tr(Σ)/B")
    ax.set_yscale("log")
    ax.set_xlabel("block (32 channels each)")
    ax.set_ylabel("mean square")
    ax.set_title(f"Per-block variance, {layer}", fontsize=9)
    ax.legend(fontsize=8)
    out["block_variance.png"] = _png(fig)
    plt.close(fig)

    before, after = (np.asarray(site["codeword_occupancy"][k]) for k in ("before", "after"))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    idx = np.arange(FP4_MAGNITUDES.size)
    ent = site["codebook_entropy_bits"]
    ax.bar(idx - 0.2, before, width=0.4, label=f"before ({ent['before']:.2f} bits)", color="tab:red")
    ax.bar(idx + 0.2, after, width=0.4, label=f"after {method} ({ent['after']:.2f} bits)", color="tab:blue")
    ax.axhline(1 / FP4_MAGNITUDES.size, color="k", lw=0.8, ls="--", label="uniform (3 bits)")
    ax.set_xticks(idx, [f"±{m:g}" for m in FP4_MAGNITUDES])
    ax.set_xlabel("FP4 E2M1 magnitude")
    ax.set_ylabel("fraction of elements")
    ax.set_title(f"FP4 codeword occupancy, {layer}", fontsize=9)
    ax.legend(fontsize=8)
    out["codeword_occupancy.png"] = _png(fig)
    plt.close(fig)
    return out
