"""Layer-level comparison of activation transforms on a real model's calibration data.

Calibrates SmolLM2-135M once (or MODEL), then for every rotation site measures the
weight-aware layer-output error ``||Q(xT) Q(T^-1 W) - xW|| / ||xW||`` (A4: float weights;
W4A4: RTN weights) of brq, wush and TORQ-family compositions with WUSH, on held-out rows of
the site's calibration reservoir and a random subset of output columns. Prints the mean per
variant. Cheap (minutes), so transforms can be screened before a full perplexity run.

Run: python tools/layer_variants.py [MODEL] [--calib-samples 16] [--refine-every 4]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from torq_onnx import calibration as calib
from torq_onnx import models, output_error, pipeline, torq
from torq_onnx.passes import NameNodes
from torq_onnx.passes.calibrate import site_covariance
from torq_onnx.passes.context import node_by_name, site_weights


def klt(cov: np.ndarray) -> np.ndarray:
    """R_inter whose rows are the eigenvectors of the block moment (decorrelates blocks)."""
    _, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return vecs.T[::-1]


def refined_wush(site: dict, rows: np.ndarray, seed: int) -> torq.Rotation:
    """WUSH with its 32 x 32 Hadamard factor refined by TORQ's max-entropy Givens rotations."""
    base = torq.solve_rotation("wush", site["d"], hessian=site["h"], weights=site["w"])
    h32 = torq.hadamard(32)
    y = torq.apply_rotation(rows.astype(np.float64), base.r_inter, base.r_intra @ h32)  # before the Hadamard
    intra = torq.solve_intra_block(y.reshape(-1, 32), init=h32, seed=seed)
    return torq.Rotation(base.r_inter, base.r_intra @ h32 @ intra.rotation, orthogonal=False)


VARIANTS = {
    "brq": lambda s: torq.solve_rotation("brq", s["d"]),
    "wush": lambda s: torq.solve_rotation("wush", s["d"], hessian=s["h"], weights=s["w"]),
    "torq-wush": lambda s: torq.solve_rotation("torq-wush", s["d"], cov=s["cov"], hessian=s["h"], weights=s["w"]),
    "torq-wush-spread>=20": lambda s: torq.solve_rotation("torq-wush", s["d"], cov=s["cov"], hessian=s["h"], weights=s["w"], inter_min_spread=20),
    "klt-wush": lambda s: torq._wush_rotation(klt(s["cov"]), s["h"], s["w"], {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=models.DEFAULT_MODEL)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--refine-every", type=int, default=4, help="also try the refined WUSH on every N-th site (slow); 0 = never")
    args = ap.parse_args()
    src = models.resolve(args.model)
    try:
        tokenizer = models.load_tokenizer(src.tokenizer_dir)
        opts = pipeline.ExportOptions(calib_samples=args.calib_samples, progress=False, collect_hessian=True, reservoir_tokens=2048)
        model = pipeline.load_ir(src.onnx_path)
        ids = calib.tokenize(tokenizer, pipeline.calibration_text(None))
        ctx = pipeline.calibrate(model, pipeline.calibration_windows(model, ids, opts), opts)
        NameNodes()(model)
        nodes = node_by_name(model.graph)
        errors: dict[tuple[str, str], list[float]] = defaultdict(list)  # (mode, variant), all sites
        paired: dict[tuple[str, str], list[float]] = defaultdict(list)  # wush vs wush+refine, refined sites only
        for i, s in enumerate(ctx.sites):
            site = {"d": s.d, "cov": site_covariance(s), "h": s.stats.hessian(), "w": site_weights(model.graph, s, nodes)}
            order = np.random.default_rng(i).permutation(s.stats.reservoir.shape[0])
            fit, held_out = s.stats.reservoir[order[768:]], s.stats.reservoir[order[:768]]
            w = site["w"][:, np.random.default_rng(i).choice(site["w"].shape[1], min(512, site["w"].shape[1]), replace=False)]
            rots = {name: make(site) for name, make in VARIANTS.items()}
            refine = args.refine_every > 0 and i % args.refine_every == 0
            if refine:
                rots["wush+refine"] = refined_wush(site, fit, i)
            for name, rot in rots.items():
                for mode in ("a4", "w4a4"):
                    err = output_error.layer_output_error(held_out, w, rot, quantize_weights=mode == "w4a4")
                    if name != "wush+refine":
                        errors[mode, name].append(err)
                    if refine and name in ("wush", "wush+refine"):
                        paired[mode, name].append(err)
        for mode in ("a4", "w4a4"):
            print(f"{mode}, all {len(ctx.sites)} sites: " + "  ".join(f"{n} {np.mean(v):.4f}" for (m, n), v in errors.items() if m == mode))
            if paired:
                print(f"{mode}, every {args.refine_every}th site: " + "  ".join(f"{n} {np.mean(v):.4f}" for (m, n), v in paired.items() if m == mode))
    finally:
        src.cleanup()


if __name__ == "__main__":
    main()
