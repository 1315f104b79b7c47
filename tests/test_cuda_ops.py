"""CUDA path vs the numpy reference (runs only with a GPU: pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from torq_onnx import mxfp4, torq
from torq_onnx.runtime_ops import cuda
from torq_onnx.runtime_ops import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU with cupy")]


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_quantize_kernel_bit_exact(rule):
    import cupy as cp

    rng = np.random.default_rng(0)
    z = (rng.standard_normal((4096, 256)) * 2.0 ** rng.integers(-140, 120, (4096, 1))).astype(np.float32)
    z[0] = 0
    z[1, :32] = np.float32(2.0**-149)
    z[2, :32] = np.tile([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], 4)
    z[3, :32] = 3.0e38
    z[4, 3] = np.nan
    z[5, 9] = -np.inf
    got = cuda.fake_quant_rows(cp.asarray(z), rule).get()
    want = ref.quantize_rotated(z, np.float32, rule)
    assert ((got == want) | (np.isnan(got) & np.isnan(want))).all()


def test_rotate_quantize_matches_reference_quantizer_on_its_rotation():
    import cupy as cp

    d = 1024
    rot = torq.solve_rotation("quarot", d, seed=0)
    x = cp.asarray(np.random.default_rng(1).standard_normal((512, d)).astype(np.float32))
    z = cuda.rotate(x, rot.r_inter, rot.r_intra).get()
    y = cuda.rotate_quantize(x, rot.r_inter, rot.r_intra).get()
    np.testing.assert_array_equal(y, ref.quantize_rotated(z, np.float32))
