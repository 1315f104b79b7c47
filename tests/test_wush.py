"""WUSH per-block transforms: the closed form's defining property, and what it buys."""

from __future__ import annotations

import numpy as np

from torq_onnx import output_error, torq, wush


def anisotropic(rng: np.random.Generator, t: int, d: int) -> np.ndarray:
    x = (rng.standard_normal((t, d)) @ rng.standard_normal((d, d))) * np.exp(rng.normal(0, 1.2, d))
    x[:, 7] += 25.0  # a massive channel
    return x


def test_block_moments_are_the_diagonal_blocks():
    h = np.arange(96 * 96, dtype=float).reshape(96, 96)
    blocks = wush.block_moments(h)
    assert blocks.shape == (3, 32, 32)
    np.testing.assert_array_equal(blocks[1], h[32:64, 32:64])


def test_wush_balances_activation_and_weight_spectra(monkeypatch):
    """Undamped, WUSH gives the transformed activation moment T H T^T and the transformed
    weight Gram W' W'^T / N the same matrix, H32 diag(s) H32^T, in every block."""
    monkeypatch.setattr(wush, "CHOLESKY_DAMP", 0.0)
    monkeypatch.setattr(wush, "SPECTRUM_DAMP", 0.0)
    rng = np.random.default_rng(0)
    d, n = 64, 80
    x = anisotropic(rng, 4096, d)
    h, w = x.T @ x / x.shape[0], rng.standard_normal((d, n))
    t = wush.wush_block_transforms(h, w, torq.hadamard(32))
    hb = wush.block_moments(h)
    for b in range(2):
        act = t[b] @ hb[b] @ t[b].T
        wt = np.linalg.inv(t[b]).T @ w[32 * b : 32 * (b + 1)]
        np.testing.assert_allclose(act, wt @ wt.T / n, rtol=1e-6, atol=1e-8 * np.abs(act).max())


def test_wush_lowers_the_layer_output_error_below_block_hadamard():
    rng = np.random.default_rng(1)
    d, n = 128, 96
    x = anisotropic(rng, 6000, d)
    fit, held_out = x[:4000], x[4000:]
    w = rng.standard_normal((d, n)) * np.exp(rng.normal(0, 0.5, (d, 1)))
    rot = {m: torq.solve_rotation(m, d, cov=torq.block_second_moment(fit), sample_rows=fit, hessian=fit.T @ fit / 4000, weights=w)
           for m in ("rtn", "brq", "wush", "torq-wush")}
    err = {m: output_error.layer_output_error(held_out, w, r) for m, r in rot.items()}
    assert err["wush"] < err["brq"] < err["rtn"], err
    assert err["torq-wush"] < err["brq"], err
