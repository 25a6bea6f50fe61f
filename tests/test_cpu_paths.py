"""The CPU backend's alternative paths give what its general ones give.

Which path runs depends on the geometry (one channel per group takes numpy_products'
einsum products; 128 or more channels per offset group take a dot product per row for
the coordinate gradients; NumPy before 2.0 has no ``vecdot``; an image is copied into
NCHW a few rows at a time).  Each test forces both
paths on one problem, in float64, and compares them; the general paths are the ones the
oracle tests cover on every geometry.
"""

from __future__ import annotations

import numpy as np
import pytest

from deformcp.backends import numpy_backend, numpy_grid, numpy_products, numpy_sampling
from problems import Spec, make_problem, relative_error, run_backward, run_forward

DEPTHWISE = {
    "multiplier1": Spec(batch=2, in_channels=6, out_channels=6, height=7, width=5, groups=6, offset_groups=3),
    "multiplier3": Spec(batch=1, in_channels=4, out_channels=12, height=5, width=6, groups=4, mask=False),
}


def _all_outputs(problem) -> dict:
    return {"out": run_forward(problem), **{n: g for n, g in run_backward(problem).items() if g is not None}}


def _assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        err = relative_error(actual[name], value)
        assert err <= 1e-13, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("spec", [pytest.param(s, id=n) for n, s in DEPTHWISE.items()])
def test_depthwise_products_equal_one_product_per_group(spec, rng, monkeypatch):
    problem = make_problem(spec, rng)
    einsum = _all_outputs(problem)
    monkeypatch.setattr(numpy_products, "_depthwise", lambda geom: False)
    _assert_close(einsum, _all_outputs(problem))


@pytest.mark.parametrize("vecdot", [True, False], ids=["vecdot", "matmul"])
def test_dot_per_row_corner_sums_equal_einsum(vecdot, rng, monkeypatch):
    problem = make_problem(Spec(batch=2, in_channels=6, out_channels=4, height=6, width=7, offset_groups=2), rng)
    expected = run_backward(problem)
    monkeypatch.setattr(numpy_backend, "_LONG_ROWS", 1)
    if not vecdot and hasattr(np, "vecdot"):
        monkeypatch.delattr(np, "vecdot")
    actual = run_backward(problem)
    _assert_close({n: g for n, g in actual.items() if g is not None},
                  {n: g for n, g in expected.items() if g is not None})


def test_grad_x_copied_into_nchw_by_rows_equals_one_block(rng, monkeypatch):
    problem = make_problem(Spec(batch=3, in_channels=4, out_channels=2, height=7, width=5, offset_groups=2), rng)
    expected = run_backward(problem, wrt="x")["x"]
    monkeypatch.setattr(numpy_grid, "_NCHW_BLOCK_BYTES", 1)  # one row at a time
    np.testing.assert_array_equal(run_backward(problem, wrt="x")["x"], expected)


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 3.5], True),
    (["big", "big", -1.0], True),        # the sum overflows: every value is tested
    ([1.0, np.nan, 2.0], False),
    ([1.0, np.inf, 2.0], False),
    ([np.inf, -np.inf, 0.0], False),     # the sum is NaN
    ([-np.inf], False),
])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite(values, finite, dtype):
    big = np.finfo(dtype).max * 0.75
    array = np.array([big if v == "big" else v for v in values], dtype=dtype).reshape(-1, 1)
    assert numpy_sampling.all_finite(array) is finite
