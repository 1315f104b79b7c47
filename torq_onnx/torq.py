"""TORQ rotation solvers (pure numpy, deterministic).

Conventions (used everywhere in torq-onnx, including the runtime op and weight folding):
an activation ``x`` of length ``D = 32 * B`` is viewed as ``X`` of shape ``[B, 32]``
(``X[b, k] = x[32 b + k]``, one MX block per row). The deployed transform is

    Z = R_inter @ X @ R_intra        (then MXFP4 on the rows of Z)

i.e. ``z = Q x`` with ``Q = kron(R_inter, R_intra.T)``. ``R_inter`` (B x B) mixes blocks
at each in-block position; ``R_intra`` (32 x 32) mixes positions inside every block.
A following ``MatMul(x, W)`` keeps its function with ``W' = Q W`` (see
:func:`fold_into_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from torq_onnx import mxfp4
from torq_onnx.defaults import METHODS  # noqa: F401  (torq.METHODS: the solver's methods)
from torq_onnx.mxfp4 import BLOCK_SIZE

N_CODES = 8  # FP4 magnitude codewords


# ---------------------------------------------------------------- shared helpers
def check_finite(name: str, a: np.ndarray) -> None:
    """Raise a clear ValueError if ``a`` holds NaN or Inf (calibration data, covariances)."""
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/Inf value(s) out of {a.size}; calibration data must be finite")


def n_blocks(d: int) -> int:
    if d % BLOCK_SIZE or d == 0:
        raise ValueError(f"hidden size {d} is not a positive multiple of the MX block size {BLOCK_SIZE}")
    return d // BLOCK_SIZE


def apply_rotation(x: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray) -> np.ndarray:
    """``z = Q x`` for every row vector of ``x`` ([..., D]), computed blockwise.

    ``r_inter`` is [B, B], or more generally [G, G] for G dividing B: it then mixes the G
    equal groups of the hidden axis (``kron(R_inter, I_{D/G})``), so ``[[1]]`` (G = 1) mixes
    nothing; the op's graphs carry it for an identity ``R_inter``, which spares every
    implementation a [B, B] product per token. ``r_intra`` is one [32, 32] matrix shared by
    all blocks, or [B, 32, 32] (one per block: ``Z[b] = Y[b] @ r_intra[b]``).
    """
    d = x.shape[-1]
    b = n_blocks(d)
    g = r_inter.shape[0] if r_inter.ndim == 2 else 0
    if r_inter.shape != (g, g) or g == 0 or b % g or r_intra.shape not in ((BLOCK_SIZE, BLOCK_SIZE), (b, BLOCK_SIZE, BLOCK_SIZE)):
        raise ValueError(f"rotation shapes {r_inter.shape}, {r_intra.shape} do not fit D={d} (B={b})")
    groups = x.reshape(*x.shape[:-1], g, d // g)
    y = np.matmul(r_inter.astype(np.result_type(x, r_inter)), groups).reshape(*x.shape[:-1], b, BLOCK_SIZE)
    if r_intra.ndim == 3:  # per block: [..., B, 1, 32] @ [B, 32, 32]
        return np.matmul(y[..., None, :], r_intra)[..., 0, :].reshape(x.shape)
    return np.matmul(y, r_intra).reshape(x.shape)


def inverse_transpose(r: np.ndarray) -> np.ndarray:
    """``R^-T`` of a matrix or of each matrix in a stack [..., n, n]."""
    return np.swapaxes(np.linalg.inv(r), -1, -2)


def fold_into_weight(w: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray, orthogonal: bool = True) -> np.ndarray:
    """``W' = Q^-T W`` for a MatMul weight ``W`` [D, N], so that ``(Q x) @ W' == x @ W``.

    For an orthogonal ``Q`` (every rotation) that is ``Q W``; a non-orthogonal transform
    (WUSH) folds its inverse transpose, which has the same two-level structure."""
    if not orthogonal:
        r_inter, r_intra = inverse_transpose(np.asarray(r_inter, np.float64)), inverse_transpose(np.asarray(r_intra, np.float64))
        r_inter, r_intra = r_inter.astype(np.result_type(w, np.float32)), r_intra.astype(np.result_type(w, np.float32))
    return apply_rotation(w.T, r_inter, r_intra).T


def transform_moment(h: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray) -> np.ndarray:
    """``Q H Q^T``: the second moment of ``Q x`` from that of ``x`` (``H`` [D, D], symmetric)."""
    return apply_rotation(apply_rotation(h, r_inter, r_intra).T, r_inter, r_intra)


def full_rotation(r_inter: np.ndarray, r_intra: np.ndarray) -> np.ndarray:
    """Dense ``Q`` (D x D) with ``z = Q x``: ``kron(R_inter, R_intra.T)`` for a shared
    ``R_intra``, ``blockdiag(R_intra[b].T) @ kron(R_inter, I)`` for per-block ones; tests only."""
    if r_intra.ndim == 2:
        return np.kron(r_inter, r_intra.T)
    b = r_inter.shape[0]
    per_block = np.zeros((b * BLOCK_SIZE, b * BLOCK_SIZE))
    for i in range(b):
        per_block[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE, i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = r_intra[i].T
    return per_block @ np.kron(r_inter, np.eye(BLOCK_SIZE))


def orthogonality_error(r: np.ndarray) -> float:
    return float(np.abs(r @ r.T - np.eye(r.shape[0])).max())


def hadamard(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def randomized_hadamard(n: int, rng: np.random.Generator) -> np.ndarray:
    """``H diag(s)`` with random signs when n is a power of two, else a random orthogonal matrix."""
    if n & (n - 1) == 0:
        return hadamard(n) * rng.choice([-1.0, 1.0], size=n)[None, :]
    return random_orthogonal(n, rng)


# ---------------------------------------------------------------- inter-block
@dataclass
class InterBlockResult:
    rotation: np.ndarray  # [B, B], orthogonal
    iterations: int
    max_relative_deviation: float  # max_i |diag_i - tr/B| / (tr/B) after rotation
    converged: bool


def _givens_rows(m: np.ndarray, i: int, j: int, c: float, s: float) -> None:
    ri, rj = m[i].copy(), m[j].copy()
    m[i] = c * ri + s * rj
    m[j] = -s * ri + c * rj


def solve_inter_block(cov: np.ndarray, eps: float = 1e-6, max_iter: int | None = None) -> InterBlockResult:
    """Schur-Horn variance equalization: ``diag(R Σ R^T) -> tr(Σ)/B`` by Givens rotations.

    ``cov`` is the B x B second-moment matrix of the block-position vectors, or a stack
    [K, B, B] of per-position matrices (averaged: one shared R_inter). Each step takes the
    block ``i`` with the largest deviation from the target ``c`` and a block ``j`` deviating
    the other way, and rotates the (i, j) plane by the angle that puts ``σ_ii`` exactly on
    ``c`` (never the Jacobi angle, which diagonalizes and spreads the variances apart).
    The fixed coordinate is never picked again, so at most B - 1 steps are needed.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim == 3:
        cov = cov.mean(axis=0)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square [B, B] (or [K, B, B]), got shape {cov.shape}")
    check_finite("covariance", cov)
    b = cov.shape[0]
    s = (cov + cov.T) / 2
    r = np.eye(b)
    target = float(np.trace(s)) / b
    if target <= 0:
        return InterBlockResult(r, 0, 0.0, True)
    limit = max_iter if max_iter is not None else 4 * b + 16
    it = 0
    dev = np.diag(s) - target
    while it < limit:
        dev = np.diag(s) - target
        i = int(np.argmax(np.abs(dev)))
        if abs(dev[i]) <= eps * target:
            break
        opposite = -np.sign(dev[i]) * dev
        j = int(np.argmax(opposite))
        if opposite[j] <= 0:  # only rounding noise left on the other side
            break
        a, half_diff, d = (s[i, i] + s[j, j]) / 2, (s[i, i] - s[j, j]) / 2, s[i, j]
        rho = math.hypot(half_diff, d)
        phi = math.atan2(d, half_diff)
        delta = math.acos(min(1.0, max(-1.0, (target - a) / rho)))
        # both roots put σ_ii on target; take the smaller rotation
        cands = [math.remainder(phi + delta, 2 * math.pi), math.remainder(phi - delta, 2 * math.pi)]
        theta = min(cands, key=abs) / 2
        c, sn = math.cos(theta), math.sin(theta)
        _givens_rows(s, i, j, c, sn)
        _givens_rows(s.T, i, j, c, sn)  # columns (s.T is a view)
        _givens_rows(r, i, j, c, sn)
        it += 1
    dev = np.diag(s) - target
    worst = float(np.abs(dev).max() / target)
    return InterBlockResult(r, it, worst, worst <= eps)


def block_gram(x: np.ndarray) -> np.ndarray:
    """Σ_rows Σ_k X[b, k] X[b', k]: the unnormalized B x B block second moment, in float64."""
    b = n_blocks(x.shape[-1])
    # [B, rows*32] so this is one BLAS GEMM (an einsum was the calibration hot spot)
    blocks = x.reshape(-1, b, BLOCK_SIZE).transpose(1, 0, 2).reshape(b, -1).astype(np.float64)
    return blocks @ blocks.T


def block_second_moment(x: np.ndarray) -> np.ndarray:
    """Σ[b, b'] = mean over rows and in-block positions of X[b, k] X[b', k] (uncentered)."""
    rows = x.size // x.shape[-1]
    return block_gram(x) / (rows * BLOCK_SIZE)


# ---------------------------------------------------------------- intra-block
def normalize_rows(rows: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor") -> np.ndarray:
    """Divide each 32-wide row by its MX power-of-two scale (the deployed quantizer's rule)."""
    e = mxfp4.shared_exponent(np.abs(rows).max(axis=-1), scale_rule)
    return np.ldexp(rows, -e[:, None])


def code_histograms(normalized: np.ndarray) -> np.ndarray:
    """[32, 8] fraction of each column's elements in each FP4 magnitude bin."""
    codes = mxfp4.magnitude_codes(np.abs(normalized))
    m = normalized.shape[0]
    return np.stack([np.bincount(codes[:, k], minlength=N_CODES) for k in range(codes.shape[1])]) / m


def _entropy_terms(p: np.ndarray) -> np.ndarray:
    """Elementwise -p log2 p, with 0 for p = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    return _entropy_terms(p).sum(axis=-1)


def codeword_occupancy(rows: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor") -> np.ndarray:
    """[8] fraction of all elements quantized to each FP4 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6)."""
    return code_histograms(normalize_rows(np.asarray(rows).reshape(-1, BLOCK_SIZE), scale_rule)).mean(axis=0)


def codebook_entropy(rows: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor") -> float:
    """Mean over the 32 in-block positions of the Shannon entropy (bits, max 3) of FP4 code use."""
    return float(_entropy_bits(code_histograms(normalize_rows(rows, scale_rule))).mean())


@dataclass
class PairAngle:
    theta: float
    gain: float  # entropy (bits, summed over the two columns) gained over theta = 0
    n_critical: int


def pair_entropy(u: np.ndarray, v: np.ndarray) -> float:
    """Entropy (bits) of the two columns' FP4 magnitude-code histograms, summed."""
    m = u.shape[0]
    hu = np.bincount(mxfp4.magnitude_codes(np.abs(u)), minlength=N_CODES) / m
    hv = np.bincount(mxfp4.magnitude_codes(np.abs(v)), minlength=N_CODES) / m
    return float(_entropy_bits(hu) + _entropy_bits(hv))


def rotate_pair(u: np.ndarray, v: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(theta), math.sin(theta)
    return u * c - v * s, u * s + v * c


def solve_pair_angle(u: np.ndarray, v: np.ndarray) -> PairAngle:
    """Exact maximizer over θ of the pair's codebook entropy with the scales held fixed.

    The loss is piecewise constant in θ and π/2-periodic (θ + π/2 swaps |u'| and |v'|).
    It changes only at critical angles where one rotated element crosses a bin edge:
    ``|r cos(φ+θ)| = e`` (θ ≡ -φ ± arccos(e/r) mod π) or ``|r sin(φ+θ)| = e``
    (θ ≡ π/2 - φ ± arccos(e/r)). A sweep over the sorted critical angles in [0, π/2)
    moves one element between adjacent bins per event, so every interval's histogram
    comes from a cumulative sum: O(M log M) for M samples.
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    m = u.shape[0]
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    thetas, cols, frm, to = [], [], [], []
    for edge_idx, edge in enumerate(mxfp4.BIN_EDGES):
        live = r > edge
        if not live.any():
            continue
        alpha = np.arccos(edge / r[live])
        ph = phi[live]
        for col, base in ((0, -ph), (1, math.pi / 2 - ph)):
            for sign in (1.0, -1.0):
                th = np.mod(base + sign * alpha, math.pi)
                keep = th < math.pi / 2
                th = th[keep]
                x = ph[keep] + th
                s2 = np.sin(2 * x)
                up = s2 < 0 if col == 0 else s2 > 0  # magnitude increasing through the edge
                thetas.append(th)
                cols.append(np.full(th.shape, col, dtype=np.int8))
                frm.append(np.where(up, edge_idx, edge_idx + 1))
                to.append(np.where(up, edge_idx + 1, edge_idx))
    base_counts = np.stack(
        [np.bincount(mxfp4.magnitude_codes(np.abs(u)), minlength=N_CODES), np.bincount(mxfp4.magnitude_codes(np.abs(v)), minlength=N_CODES)]
    ).astype(np.int64)
    h0 = float(_entropy_bits(base_counts / m).sum())
    if not thetas:
        return PairAngle(0.0, 0.0, 0)
    theta = np.concatenate(thetas)
    order = np.argsort(theta, kind="stable")
    theta = theta[order]
    n = theta.shape[0]
    col = np.concatenate(cols)[order].astype(np.int64)
    # every event leaves one (column, bin) slot and enters another; a slot's count just after
    # an event is its base count plus the running sum of that slot's own moves. Moves are
    # laid out in time order (leave, enter, leave, ...), so a stable sort by slot keeps time
    # order within each slot and per-slot cumulative sums give the counts.
    slot = np.stack([col * N_CODES + np.concatenate(frm)[order], col * N_CODES + np.concatenate(to)[order]], axis=1).reshape(-1)
    step = np.tile(np.array([-1, 1], np.int64), n)
    event = np.repeat(np.arange(n), 2)
    by_slot = np.argsort(slot.astype(np.int16), kind="stable")
    slot, step, event = slot[by_slot], step[by_slot], event[by_slot]
    running = np.cumsum(step)
    first = np.flatnonzero(np.diff(slot, prepend=-1))  # index where each slot's run starts
    run_start = np.repeat(first, np.diff(np.append(first, slot.size)))
    after = base_counts.reshape(-1)[slot] + running - np.where(run_start > 0, running[run_start - 1], 0)
    # entropy contribution of a bin holding c of m elements, tabulated for c = 0..m
    term = _entropy_terms(np.arange(m + 1) / m)
    gain = np.bincount(event, weights=term[after] - term[after - step], minlength=n)
    ent = h0 + np.cumsum(gain)  # entropy after event i
    # interval i (after event i) spans [theta[i], theta[i+1]); the last wraps to π/2
    upper = np.append(theta[1:], math.pi / 2)
    width = upper - theta
    ent = np.where(width > 1e-12, ent, -np.inf)
    best = int(np.argmax(ent))
    if ent[best] <= h0 + 1e-12:
        return PairAngle(0.0, 0.0, n)
    return PairAngle(float((theta[best] + upper[best]) / 2), float(ent[best] - h0), n)


def _pair_scores(hist: np.ndarray) -> np.ndarray:
    """H_{k,l} = h_k + h_l + c_{k,l}: imbalance of each column pair (higher = rotate first)."""
    dev = hist - 1.0 / N_CODES
    h = (dev**2).sum(axis=1)
    return h[:, None] + h[None, :] - dev @ dev.T


def _select_pairs(hist: np.ndarray, n_pairs: int) -> list[tuple[int, int]]:
    dev = hist - 1.0 / N_CODES
    h = (dev**2).sum(axis=1)
    cand = np.argsort(-h, kind="stable")[: hist.shape[0] // 2]
    scores = _pair_scores(hist)
    pairs = sorted(((scores[k, l], int(k), int(l)) for a, k in enumerate(cand) for l in cand[a + 1 :]), key=lambda t: -t[0])
    used: set[int] = set()
    chosen = []
    for _, k, l in pairs:
        if k in used or l in used:
            continue
        chosen.append((min(k, l), max(k, l)))
        used.update((k, l))
        if len(chosen) == n_pairs:
            break
    return chosen


@dataclass
class IntraBlockResult:
    rotation: np.ndarray  # [32, 32], orthogonal
    rounds: int
    accepted_rotations: int
    entropy_history: list[float] = field(default_factory=list)  # after each accepted round
    error_history: list[float] = field(default_factory=list)  # MXFP4 relative error, same rounds


def solve_intra_block(
    rows: np.ndarray,
    scale_rule: mxfp4.ScaleRule = "floor",
    max_rounds: int = 10,
    pairs_per_round: int = 8,
    tol: float = 1e-5,
    init: np.ndarray | None = None,
    max_rows: int = 8192,
    seed: int = 0,
    error_guard: bool = True,
) -> IntraBlockResult:
    """Greedy max-entropy Givens rotations shared by all blocks (R_intra, 32 x 32).

    ``rows``: [M, 32] block rows after the inter-block rotation (any scale). Each round
    alternates an S step (re-derive every row's power-of-two scale) and an R step (pick
    the most imbalanced non-overlapping column pairs, solve each angle exactly with
    :func:`solve_pair_angle`, apply). A round is kept only if the codebook entropy with
    fresh scales does not decrease, so ``entropy_history`` is non-decreasing.

    ``error_guard`` (not in the paper; :func:`solve_rotation` leaves it off for
    ``torq``): a pair rotation is also rejected if it
    raises the MXFP4 quantization error of the calibration rows (fresh scales). Measured on synthetic
    activations with massive outlier channels, pure entropy maximization started from
    a Hadamard raised the error; the guard keeps only rotations that help both.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != BLOCK_SIZE:
        raise ValueError(f"intra-block solver needs rows of {BLOCK_SIZE} values, got shape {rows.shape}")
    check_finite("calibration activations", rows)
    keep = np.abs(rows).max(axis=1) > 0  # zero blocks carry no information
    rows = rows[keep]
    if rows.shape[0] > max_rows:
        rows = rows[np.sort(np.random.default_rng(seed).choice(rows.shape[0], max_rows, replace=False))]
    rot = np.eye(BLOCK_SIZE) if init is None else np.array(init, dtype=np.float64)
    if rows.shape[0] == 0:
        return IntraBlockResult(rot, 0, 0, [])
    cur = rows @ rot
    history = [codebook_entropy(cur, scale_rule)]
    errors = [mxfp4.relative_error(cur, scale_rule=scale_rule)]
    accepted = 0
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        normalized = normalize_rows(cur, scale_rule)  # S step
        pairs = _select_pairs(code_histograms(normalized), pairs_per_round)
        new_cur, new_rot, n_applied = cur.copy(), rot.copy(), 0
        err = errors[-1]
        for k, l in pairs:  # R step (disjoint pairs: independent)
            sol = solve_pair_angle(normalized[:, k], normalized[:, l])
            if sol.theta == 0.0:
                continue
            cand = new_cur.copy()
            cand[:, k], cand[:, l] = rotate_pair(cur[:, k], cur[:, l], sol.theta)
            if error_guard:
                cand_err = mxfp4.relative_error(cand, scale_rule=scale_rule)
                if cand_err > err:
                    continue
                err = cand_err
            new_cur = cand
            new_rot[:, k], new_rot[:, l] = rotate_pair(rot[:, k], rot[:, l], sol.theta)
            n_applied += 1
        if n_applied == 0:
            break
        ent = codebook_entropy(new_cur, scale_rule)
        err = mxfp4.relative_error(new_cur, scale_rule=scale_rule)
        if ent < history[-1]:
            break  # the fresh scales undid the entropy gain: stop without this round
        cur, rot = new_cur, new_rot
        accepted += n_applied
        history.append(ent)
        errors.append(err)
        if ent - history[-2] < tol:
            break
    return IntraBlockResult(rot, rounds, accepted, history, errors)


# ---------------------------------------------------------------- methods
SOLVER_OPTIONS = ("intra_init", "inter_block", "intra_refine", "inter_min_spread", "intra_error_guard")  # solve_rotation's tunables
NEEDS_HESSIAN = ("wush", "torq-wush")  # methods that read the full D x D input moment and the weights
FITS_ON_SAMPLES = ("torq",)  # methods whose solver fits token activations (the others only report on them)


@dataclass
class Rotation:
    """The two factors of one rotation site, plus solver diagnostics for report.json."""

    r_inter: np.ndarray  # [B, B]
    r_intra: np.ndarray  # [32, 32] shared, or [B, 32, 32] per block
    info: dict = field(default_factory=dict)
    orthogonal: bool = True  # False for data-aware non-orthogonal transforms (WUSH): weights fold Q^-T

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``Q x`` for the rows of ``x`` [..., D] (what the online op computes)."""
        return apply_rotation(x, self.r_inter.astype(np.result_type(x, np.float32)), self.r_intra.astype(np.result_type(x, np.float32)))

    def fold(self, w: np.ndarray) -> np.ndarray:
        """``Q^-T W`` for a MatMul weight [D, N]: ``(Q x) @ fold(W) == x @ W``."""
        return fold_into_weight(w, self.r_inter, self.r_intra, self.orthogonal)

    def moment(self, h: np.ndarray) -> np.ndarray:
        """Second moment of ``Q x`` from that of ``x`` [D, D]: GPTQ's Hessian in the new basis."""
        return transform_moment(h, self.r_inter, self.r_intra)

    def is_identity(self) -> bool:
        """Whether ``Q = I`` exactly (rtn): nothing to fold and, at a float-activation site, nothing to run."""
        return all(np.array_equal(r, np.broadcast_to(np.eye(r.shape[-1]), r.shape)) for r in (self.r_inter, self.r_intra))


def identity_rotation(d: int) -> Rotation:
    return Rotation(np.eye(n_blocks(d)), np.eye(BLOCK_SIZE))


def solve_rotation(
    method: str,
    d: int,
    cov: np.ndarray | None = None,
    sample_rows: np.ndarray | None = None,
    scale_rule: mxfp4.ScaleRule = "floor",
    seed: int = 0,
    intra_init: str = "hadamard",
    inter_block: bool = True,
    intra_refine: bool = True,
    inter_min_spread: float = 0.0,
    intra_error_guard: bool = False,
    hessian: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> Rotation:
    """Rotation for one site by ``method``.

    rtn: identity. brq: block-diagonal 32 x 32 Hadamard. quarot: Kronecker-factored
    randomized Hadamard (a global D x D Walsh-Hadamard with structured random signs
    when B is a power of two; a random orthogonal R_inter otherwise). torq: Schur-Horn
    inter-block equalization from ``cov`` then max-entropy intra-block Givens on
    ``sample_rows`` (token activations [T, D]) rotated by R_inter, starting from
    ``intra_init`` ("hadamard" or "identity"). ``inter_block=False`` / ``intra_refine=False``
    switch off one level (ablations: R_inter = I, or R_intra = its init).
    ``intra_error_guard``: also reject entropy rotations that raise the calibration MXFP4
    error (not in the paper; off for the paper's algorithm).
    ``inter_min_spread``: equalize blocks only where their variance spread (max/mean of
    diag(cov)) is at least this; measured on SmolLM2, R_inter lowers the layer error only
    at massive-outlier sites (spread > 20) and raises it at most others.

    wush: the data-aware per-block transform of :mod:`torq_onnx.wush` (non-orthogonal),
    from the input moment ``hessian`` [D, D] and the site's weights ``weights`` [D, N].
    torq-wush: TORQ's inter-block level (as for torq), then WUSH per block in the
    inter-rotated basis instead of the max-entropy R_intra.
    """
    b = n_blocks(d)
    if method == "rtn":
        return identity_rotation(d)
    if method == "brq":
        return Rotation(np.eye(b), hadamard(BLOCK_SIZE))
    if method == "quarot":
        rng = np.random.default_rng(seed)
        return Rotation(randomized_hadamard(b, rng), randomized_hadamard(BLOCK_SIZE, rng).T)
    if method == "wush":
        return _wush_rotation(np.eye(b), hessian, weights, {})
    if method not in ("torq", "torq-wush"):
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if cov is None or (sample_rows is None and method == "torq"):
        raise ValueError(f"{method} needs calibration statistics (covariance and sample activations)")
    v = np.diag(cov)
    if inter_block and variance_spread(v) >= inter_min_spread:
        inter = solve_inter_block(cov)
    else:  # keep the blocks as they are
        inter = InterBlockResult(np.eye(b), 0, float(np.abs(v / v.mean() - 1).max()) if v.mean() > 0 else 0.0, False)
    if method == "torq-wush":
        return _wush_rotation(inter.rotation, hessian, weights, {"inter_iterations": inter.iterations,
                                                                 "inter_max_relative_deviation": inter.max_relative_deviation})
    samples = np.asarray(sample_rows, dtype=np.float64).reshape(-1, d)
    y = apply_rotation(samples, inter.rotation, np.eye(BLOCK_SIZE)).reshape(-1, BLOCK_SIZE)
    init = {"hadamard": hadamard(BLOCK_SIZE), "identity": None}[intra_init]
    intra = solve_intra_block(y, scale_rule=scale_rule, init=init, seed=seed, max_rounds=10 if intra_refine else 0,
                              error_guard=intra_error_guard)
    info = {
        "inter_iterations": inter.iterations,
        "inter_max_relative_deviation": inter.max_relative_deviation,
        "intra_rounds": intra.rounds,
        "intra_accepted_rotations": intra.accepted_rotations,
        "intra_entropy_history": intra.entropy_history,
        "intra_error_history": intra.error_history,
    }
    return Rotation(inter.rotation, intra.rotation, info)


def _wush_rotation(r_inter: np.ndarray, hessian: np.ndarray | None, weights: np.ndarray | None, info: dict) -> Rotation:
    """WUSH per block after the block mixing ``r_inter`` (identity for plain wush)."""
    from torq_onnx.wush import wush_block_transforms

    if hessian is None or weights is None:
        raise ValueError("wush needs the input's full second moment and the site's weights (calibrate with hessian=True)")
    eye = np.eye(BLOCK_SIZE)
    t = wush_block_transforms(transform_moment(hessian, r_inter, eye), fold_into_weight(weights, r_inter, eye), hadamard(BLOCK_SIZE))
    return Rotation(r_inter, np.swapaxes(t, -1, -2), info, orthogonal=False)


def quantization_error(
    x: np.ndarray, r_inter: np.ndarray, r_intra: np.ndarray, scale_rule: mxfp4.ScaleRule = "floor"
) -> float:
    """Relative error ``||MXFP4(Qx) - Qx|| / ||x||`` of the rotated activations (Q orthogonal)."""
    x = np.asarray(x, dtype=np.float64)
    return mxfp4.relative_error(apply_rotation(x, r_inter, r_intra), scale_rule=scale_rule)


def block_variances(x: np.ndarray) -> np.ndarray:
    """[B] mean square of each 32-wide block over all rows (the diagonal of Σ)."""
    return np.diag(block_second_moment(x))


def variance_spread(v: np.ndarray) -> float:
    """max / mean of per-block second moments ``v``: 1.0 means perfectly equalized blocks."""
    return float(v.max() / v.mean()) if v.mean() > 0 else 1.0


def block_variance_spread(x: np.ndarray) -> float:
    """:func:`variance_spread` of the blocks of ``x`` ([..., D])."""
    return variance_spread(block_variances(x))
