"""Weight-aware layer-output error and the per-site output guard."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from torq_onnx import mxfp4, torq
from torq_onnx.output_error import guarded_choice, layer_output_error
from torq_onnx.pipeline import ExportOptions, rewrite

from tiny_models import batches, run, tiny_transformer


def _site_data(seed: int = 0, d: int = 128, n: int = 48):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, d))
    x[:, 5] *= 40.0  # a massive channel, as in real LLM activations
    w = rng.normal(size=(d, n)) / np.sqrt(d)
    rot = torq.Rotation(torq.random_orthogonal(d // 32, rng), torq.random_orthogonal(32, rng))
    return x, w, rot


@pytest.mark.parametrize("qa,qw", [(True, True), (True, False), (False, True)])
def test_layer_output_error_matches_dense_formula(qa, qw):
    x, w, rot = _site_data()
    f = torq.full_rotation(rot.r_inter, rot.r_intra)  # z = x F^T, W' = F W
    z, w_rot = x @ f.T, f @ w
    z = mxfp4.fake_quantize(z, axis=-1) if qa else z
    w_rot = mxfp4.fake_quantize(w_rot, axis=0) if qw else w_rot
    expected = np.linalg.norm(z @ w_rot - x @ w) / np.linalg.norm(x @ w)
    got = layer_output_error(x, w, rot, quantize_activations=qa, quantize_weights=qw)
    # float32 inside: the rounded operands may land in other FP4 bins in a few places
    assert got == pytest.approx(expected, rel=2e-2)
    assert got > 1e-3


def test_rotation_without_quantization_is_exact():
    x, w, rot = _site_data(1)
    assert layer_output_error(x, w, rot, quantize_activations=False, quantize_weights=False) < 1e-5


def test_guard_picks_the_lowest_error_and_prefers_the_first_on_ties():
    x, w, rot = _site_data(2)
    ident = torq.identity_rotation(x.shape[1])
    chosen, errors = guarded_choice({"random": rot, "rtn": ident, "brq": torq.solve_rotation("brq", x.shape[1])}, x, w)
    assert errors[chosen] == min(errors.values())
    assert errors["rtn"] > errors["brq"]  # the massive channel ruins its block without a rotation
    tie, _ = guarded_choice({"a": ident, "b": ident}, x, w)
    assert tie == "a"


def test_output_guard_in_the_pipeline():
    base = tiny_transformer()
    model = ir.serde.deserialize_model(base)
    ctx = rewrite(model, batches(), ExportOptions(progress=False, method="torq", weights="mxfp4", output_guard=True))
    for site in ctx.sites:
        guard = site.rotation.info["output_guard"]
        assert guard["chosen"] in ("torq", "torq-no-inter", "torq-no-intra", "brq")
        assert site.report["layer_output_error"]["after"] == min(guard["errors"].values())
        assert site.report["layer_output_error"]["after"] < site.report["layer_output_error"]["before"]
    # the guarded rotations still fold exactly when nothing is quantized
    model = ir.serde.deserialize_model(base)
    rewrite(model, batches(), ExportOptions(progress=False, method="torq", weights="float", quantize_activations=False, output_guard=True))
    feeds = batches(1, 24, seed=9)[0]
    ref = run(base, feeds)
    np.testing.assert_allclose(run(model, feeds), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_wide_layers_are_measured_on_a_column_subset():
    from torq_onnx.passes import ExportContext, SolveRotations

    solver = SolveRotations(ExportContext(), "torq")
    w = np.arange(32 * 1000, dtype=np.float32).reshape(32, 1000)
    sub = solver._columns(w, seed=0)
    assert sub.shape == (32, solver.REPORT_COLUMNS)
    cols = sub[0].astype(int)  # row 0 holds the column indices
    assert np.all(np.diff(cols) > 0) and np.array_equal(sub, w[:, cols])
    assert np.array_equal(solver._columns(w, seed=0), sub)  # deterministic
    narrow = w[:, :100]
    assert solver._columns(narrow, seed=0) is narrow
