"""MXFP4 weight quantizers: RTN with scale search and GPTQ, against the numpy MXFP4 reference."""

from __future__ import annotations

import numpy as np
import pytest

from torq_onnx import mxfp4
from torq_onnx.weights import block_exponents, hessian_weighted_error, quantize_weight


def correlated_inputs(rng: np.random.Generator, d: int):
    """A sampler of token activations with a fixed, strongly correlated, anisotropic covariance."""
    mix = (rng.standard_normal((d, d)) / np.sqrt(d)) * np.exp(rng.normal(0, 1, d))
    return lambda t: rng.standard_normal((t, d)) @ mix


def on_grid(q: mxfp4.MXFP4Tensor) -> bool:
    """The data is valid MXFP4: codes are 4-bit, exponents finite E8M0."""
    return bool((q.codes < 16).all() and (q.scale_codes != mxfp4.E8M0_NAN).all())


def test_rtn_without_search_is_the_reference_quantizer():
    w = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    q = quantize_weight(w, "rtn")
    ref = mxfp4.quantize(w, axis=0)
    np.testing.assert_array_equal(q.codes, ref.codes)
    np.testing.assert_array_equal(q.scale_codes, ref.scale_codes)


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_scale_search_never_raises_a_blocks_error(rule):
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, (128, 64))
    plain = mxfp4.dequantize(quantize_weight(w, "rtn", scale_rule=rule), np.float64)
    searched_q = quantize_weight(w, "rtn", scale_rule=rule, scale_search=True)
    searched = mxfp4.dequantize(searched_q, np.float64)
    block_err = lambda a: ((a - w) ** 2).reshape(4, 32, 64).sum(axis=1)  # noqa: E731
    assert (block_err(searched) <= block_err(plain) + 1e-12).all()
    assert block_err(searched).sum() < block_err(plain).sum()  # and it does change some blocks
    assert on_grid(searched_q)


def test_block_exponents_search_picks_the_lowest_error_exponent():
    blocks = np.array([[6.9] + [1.0] * 31, [7.9] + [0.0] * 31])  # amax just below 8: e = 0 clips 6.9/7.9 to 6
    e_rule = block_exponents(blocks)
    e_best = block_exponents(blocks, search=True)
    np.testing.assert_array_equal(e_rule, [0, 0])
    for blk, e in zip(blocks, e_best):
        errs = {c: ((mxfp4.decode(mxfp4.encode(blk, c), c) - blk) ** 2).sum() for c in (-1, 0, 1)}
        assert errs[int(e)] == min(errs.values())
    assert e_best[1] == 1  # 7.9 fits only with the larger scale


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_hessian_weighted_error(act_order):
    rng = np.random.default_rng(2)
    d, n = 256, 96
    sample = correlated_inputs(rng, d)
    x = sample(4096)
    h = x.T @ x / x.shape[0]
    w = rng.standard_normal((d, n))
    rtn = mxfp4.dequantize(quantize_weight(w, "rtn"), np.float64)
    q = quantize_weight(w, "gptq", h, act_order=act_order)
    gptq = mxfp4.dequantize(q, np.float64)
    assert on_grid(q)
    assert hessian_weighted_error(w, gptq, h) < 0.8 * hessian_weighted_error(w, rtn, h)
    # and it is the output error that drops, on held-out tokens from the same distribution
    x_new = sample(2048)
    out_err = lambda wq: np.linalg.norm(x_new @ (wq - w)) / np.linalg.norm(x_new @ w)  # noqa: E731
    assert out_err(gptq) < out_err(rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_rtn(act_order):
    """Uncorrelated inputs: no error can be compensated, so GPTQ's choice is RTN's exactly."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((128, 50))
    h = np.diag(np.exp(rng.normal(0, 1, 128)))
    q, ref = quantize_weight(w, "gptq", h, act_order=act_order), quantize_weight(w, "rtn")
    np.testing.assert_array_equal(q.codes, ref.codes)
    np.testing.assert_array_equal(q.scale_codes, ref.scale_codes)


def test_gptq_handles_dead_and_rank_deficient_inputs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 64))  # fewer tokens than inputs: singular H
    x[:, 3] = 0.0  # an input never active
    q = quantize_weight(rng.standard_normal((64, 20)), "gptq", x.T @ x / 40)
    assert on_grid(q)


def test_bad_weight_inputs_are_clear_errors():
    w = np.ones((64, 8))
    with pytest.raises(ValueError, match="second moment"):
        quantize_weight(w, "gptq")
    with pytest.raises(ValueError, match="rounding"):
        quantize_weight(w, "banana")
    with pytest.raises(ValueError, match="does not match"):
        quantize_weight(w, "gptq", np.eye(32))
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(bad, "rtn")
