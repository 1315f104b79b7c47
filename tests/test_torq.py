"""TORQ solvers: inter-block equalization, exact intra-block angles, methods, folding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from torq_onnx import mxfp4, torq


def random_cov(b: int, rng: np.random.Generator, cond: float = 1e3, rank: int | None = None) -> np.ndarray:
    u = torq.random_orthogonal(b, rng)
    eig = np.geomspace(1.0, cond, b)
    if rank is not None:
        eig[: b - rank] = 0.0
    return (u * eig) @ u.T


@pytest.mark.parametrize("b", [4, 16, 24, 96])
@pytest.mark.parametrize("kind", ["well", "ill", "rank-deficient"])
def test_inter_block_equalizes_diagonal(b, kind):
    rng = np.random.default_rng(b)
    cov = {"well": lambda: random_cov(b, rng, 10.0), "ill": lambda: random_cov(b, rng, 1e12), "rank-deficient": lambda: random_cov(b, rng, 1e3, rank=3)}[kind]()
    res = torq.solve_inter_block(cov, eps=1e-9)
    r = res.rotation
    assert torq.orthogonality_error(r) < 1e-10
    target = np.trace(cov) / b
    np.testing.assert_allclose(np.diag(r @ cov @ r.T), target, rtol=1e-8)
    assert res.converged and res.max_relative_deviation <= 1e-9
    assert res.iterations <= b - 1  # each Givens step fixes one block for good


def test_inter_block_on_diagonal_spread_and_stack():
    cov = np.diag([100.0, 1.0, 1.0, 1.0, 0.0, 0.0, 5.0, 2.0])
    stack = np.stack([cov, cov * 3])
    res = torq.solve_inter_block(stack)
    np.testing.assert_allclose(np.diag(res.rotation @ (2 * cov) @ res.rotation.T), 2 * np.trace(cov) / 8, rtol=1e-6)


def test_hadamard_oracle_gives_the_same_target():
    # Oracle from the notes: R = H U^T equalizes diag exactly when B is a power of two.
    rng = np.random.default_rng(0)
    cov = random_cov(16, rng, 1e4)
    _, u = np.linalg.eigh(cov)
    oracle = torq.hadamard(16) @ u.T
    target = np.trace(cov) / 16
    np.testing.assert_allclose(np.diag(oracle @ cov @ oracle.T), target, rtol=1e-10)
    ours = torq.solve_inter_block(cov).rotation
    np.testing.assert_allclose(np.diag(ours @ cov @ ours.T), np.diag(oracle @ cov @ oracle.T), rtol=1e-6)


def test_jacobi_trap_is_not_used():
    # A 2x2 case the Jacobi angle would diagonalize (spreading variances); ours equalizes.
    cov = np.array([[3.0, 1.0], [1.0, 1.0]])
    r = torq.solve_inter_block(cov).rotation
    np.testing.assert_allclose(np.diag(r @ cov @ r.T), [2.0, 2.0], rtol=1e-12)


def test_nan_covariance_and_calibration_raise():
    with pytest.raises(ValueError, match="NaN"):
        torq.solve_inter_block(np.full((4, 4), np.nan))
    rows = np.ones((10, 32))
    rows[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        torq.solve_intra_block(rows)


def grid_best_entropy(u: np.ndarray, v: np.ndarray, n: int = 10_000) -> float:
    best = -math.inf
    for th in np.linspace(0, math.pi / 2, n, endpoint=False):
        best = max(best, torq.pair_entropy(*torq.rotate_pair(u, v, th)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_angle_solver_beats_dense_grid(seed):
    rng = np.random.default_rng(seed)
    rows = torq.normalize_rows(rng.standard_normal((400, 32)) * np.exp(rng.normal(0, 1, 32)))
    u, v = rows[:, 3], rows[:, 17]
    sol = torq.solve_pair_angle(u, v)
    h0 = torq.pair_entropy(u, v)
    at_sol = torq.pair_entropy(*torq.rotate_pair(u, v, sol.theta))
    assert at_sol == pytest.approx(h0 + sol.gain, abs=1e-12)  # the sweep predicts the true loss
    assert at_sol >= grid_best_entropy(u, v) - 1e-12
    assert sol.n_critical > 0


def test_pair_solver_returns_zero_when_nothing_helps():
    u = np.zeros(50)
    v = np.zeros(50)
    assert torq.solve_pair_angle(u, v).theta == 0.0


@pytest.mark.parametrize("init", [None, "hadamard"])
def test_intra_block_entropy_monotone_and_orthogonal(init):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4000, 32)) * np.exp(rng.normal(0, 1.0, 32))
    rows[:, 5] += 20.0  # a nearly constant outlier position
    res = torq.solve_intra_block(rows, init=torq.hadamard(32) if init else None, error_guard=False)
    assert torq.orthogonality_error(res.rotation) < 1e-10
    assert res.accepted_rotations > 0
    assert all(b >= a for a, b in zip(res.entropy_history, res.entropy_history[1:]))
    assert res.entropy_history[-1] > res.entropy_history[0]
    assert res.entropy_history[-1] == pytest.approx(torq.codebook_entropy(rows @ res.rotation))


def test_intra_block_error_guard_never_raises_error():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((4000, 32)) @ torq.hadamard(32)
    res = torq.solve_intra_block(rows, init=torq.hadamard(32))
    assert all(b <= a + 1e-15 for a, b in zip(res.error_history, res.error_history[1:]))


def outlier_activations(seed: int, t: int = 4096, d: int = 512) -> np.ndarray:
    """LLM-like activations: per-channel scales, high-variance blocks, massive near-constant channels."""
    rng = np.random.default_rng(seed)
    b = d // 32
    x = rng.standard_normal((t, d)) * np.exp(rng.normal(0, 0.5, d))
    for blk in rng.choice(b, 2, replace=False):
        x[:, blk * 32 : (blk + 1) * 32] *= 6
    ch = rng.choice(d, 2, replace=False)
    x[:, ch] = rng.normal(1, 0.02, (t, 2)) * np.array([60.0, -45.0])
    return x


def test_torq_with_error_guard_beats_block_hadamard_beats_rtn_on_outlier_blocks():
    """The paper's pure max-entropy R_intra raises the MXFP4 error here (entropy is not
    error); with the error guard (reject rotations that raise it) torq beats brq."""
    x = outlier_activations(0)
    calib, held_out = x[:2048], x[2048:]
    d = x.shape[1]
    errs = {}
    for name, method, guard in (("rtn", "rtn", False), ("brq", "brq", False), ("torq", "torq", False), ("torq+guard", "torq", True)):
        rot = torq.solve_rotation(method, d, cov=torq.block_second_moment(calib), sample_rows=calib[:1024], intra_error_guard=guard)
        errs[name] = torq.quantization_error(held_out, rot.r_inter, rot.r_intra)
    print(errs)
    assert errs["torq+guard"] < errs["brq"] < errs["rtn"]
    assert errs["torq+guard"] < errs["torq"]


def test_torq_equalizes_block_variance():
    x = outlier_activations(1)
    rot = torq.solve_rotation("torq", 512, cov=torq.block_second_moment(x), sample_rows=x[:512])
    before = torq.block_variance_spread(x)
    after = torq.block_variance_spread(torq.apply_rotation(x, rot.r_inter, np.eye(32)))
    assert before > 5 and after == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("method", torq.METHODS)
def test_folding_preserves_the_matmul(method):
    rng = np.random.default_rng(5)
    d, n = 96, 40
    x = rng.standard_normal((7, d))
    w = rng.standard_normal((d, n))
    rot = torq.solve_rotation(method, d, cov=torq.block_second_moment(x), sample_rows=x, hessian=x.T @ x / 7, weights=w)
    q = torq.full_rotation(rot.r_inter, rot.r_intra)
    assert rot.orthogonal == (method not in torq.NEEDS_HESSIAN)
    if rot.orthogonal:
        assert torq.orthogonality_error(q) < 1e-10
    np.testing.assert_allclose(torq.apply_rotation(x, rot.r_inter, rot.r_intra), x @ q.T, atol=1e-12)
    w_folded = rot.fold(w)
    np.testing.assert_allclose(w_folded, np.linalg.inv(q).T @ w, atol=1e-9)
    np.testing.assert_allclose(rot.apply(x) @ w_folded, x @ w, atol=1e-9)
    np.testing.assert_allclose(rot.moment(x.T @ x), q @ x.T @ x @ q.T, atol=1e-9)


def test_bad_hidden_size_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden size 100"):
        torq.solve_rotation("brq", 100)
    with pytest.raises(ValueError, match="unknown method"):
        torq.solve_rotation("gptq", 64)
    with pytest.raises(ValueError, match="second moment"):
        torq.solve_rotation("wush", 64)


def test_codebook_entropy_bounds():
    rng = np.random.default_rng(6)
    h = torq.codebook_entropy(rng.standard_normal((1000, 32)))
    assert 0 < h <= 3.0
    assert mxfp4.BLOCK_SIZE == 32


def test_ablation_switches_turn_off_exactly_one_level():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 128)) * np.exp(rng.normal(0, 1.5, 128))
    cov = torq.block_second_moment(x)
    no_inter = torq.solve_rotation("torq", 128, cov=cov, sample_rows=x, inter_block=False)
    no_intra = torq.solve_rotation("torq", 128, cov=cov, sample_rows=x, intra_refine=False)
    full = torq.solve_rotation("torq", 128, cov=cov, sample_rows=x)
    np.testing.assert_array_equal(no_inter.r_inter, np.eye(4))
    np.testing.assert_array_equal(no_intra.r_intra, torq.hadamard(32))
    np.testing.assert_allclose(no_intra.r_inter, full.r_inter)  # the other level is untouched
    assert not np.allclose(full.r_inter, np.eye(4)) and not np.allclose(full.r_intra, torq.hadamard(32))


def test_inter_block_only_where_the_spread_reaches_the_threshold():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, 128)) * np.exp(rng.normal(0, 1.5, 128))
    cov = torq.block_second_moment(x)
    spread = torq.block_variance_spread(x)
    above = torq.solve_rotation("torq", 128, cov=cov, sample_rows=x, intra_refine=False, inter_min_spread=spread * 0.99)
    below = torq.solve_rotation("torq", 128, cov=cov, sample_rows=x, intra_refine=False, inter_min_spread=spread * 1.01)
    np.testing.assert_allclose(above.r_inter, torq.solve_inter_block(cov).rotation)
    np.testing.assert_array_equal(below.r_inter, np.eye(4))
