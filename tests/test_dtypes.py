"""float16, bfloat16, float32 and float64: results in the input's dtype, within the per-dtype
tolerance of the float64 reference on the same (rounded) inputs; halves computed in float32
and rounded once."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import deformcp
from problems import (INPUT_NAMES, TOLERANCE, Spec, assert_within_tolerance, make_problem, loop_backward, relative_error,
                      loop_columns, loop_forward, run_backward, run_forward, run_im2col)

DTYPES = [pytest.param(np.dtype(d), id=np.dtype(d).name)
          for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)]
HALVES = [p for p in DTYPES if p.values[0].itemsize == 2]

SPECS = [pytest.param(s, id=n) for n, s in {
    "basic": Spec(),
    "groups": Spec(in_channels=4, out_channels=6, groups=2, offset_groups=2, stride=(2, 1), padding=(0, 1, 2, 1)),
    "no_mask_no_bias": Spec(mask=False, bias=False, kernel=(2, 3), dilation=(2, 1)),
}.items()]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_have_input_dtype_and_match_reference(dtype, spec, rng):
    # make_problem draws in float64 and casts: the reference then reads the rounded inputs,
    # so the comparison measures the computation's error, not the inputs' rounding.
    problem = make_problem(spec, rng, dtype=dtype)
    out = run_forward(problem)
    assert out.dtype == dtype
    assert_within_tolerance(out, loop_forward(problem), dtype.name, "forward")
    cols = run_im2col(problem)
    assert cols.dtype == dtype
    assert_within_tolerance(cols, loop_columns(problem), dtype.name, "im2col")
    grads, expected = run_backward(problem), loop_backward(problem)
    for name in INPUT_NAMES:
        if expected[name] is None:
            assert grads[name] is None
            continue
        assert grads[name].dtype == dtype, f"grad_{name} has dtype {grads[name].dtype}"
        assert_within_tolerance(grads[name], expected[name], dtype.name, f"grad_{name}")


def _ulp(values, dtype):
    """The spacing of ``dtype`` at each value (the smallest normal's spacing below it)."""
    info = ml_dtypes.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(values), float(info.smallest_normal))))
    return 2.0 ** (exponent - info.nmant)


@pytest.mark.parametrize("dtype", HALVES)
def test_halves_are_rounded_once(dtype, rng):
    # Computed in float32 and rounded once, every result lies within one unit in the last
    # place of the exact (float64 reference) value; half arithmetic all the way would be off
    # by several units wherever 36 terms are accumulated.
    problem = make_problem(Spec(in_channels=4, out_channels=3, height=5, width=5), rng, dtype=dtype)
    results = {"forward": (run_forward(problem), loop_forward(problem)),
               "im2col": (run_im2col(problem), loop_columns(problem))}
    grads, expected = run_backward(problem), loop_backward(problem)
    results.update({f"grad_{n}": (grads[n], expected[n]) for n in INPUT_NAMES})
    for what, (actual, exact) in results.items():
        actual = actual.astype(np.float64)
        # float32's own rounding, relative to the largest value, is the only other error.
        slack = 2.0 ** -20 * np.max(np.abs(exact))
        excess = np.abs(actual - exact) - (_ulp(exact, dtype) + slack)
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[worst] <= 0, f"{what}{worst}: {actual[worst]!r} vs exact {exact[worst]!r}"


def test_float16_accumulates_in_float32():
    # 60000 + 60000 - 60000 - 59968 = 32: exact in float32, but the partial sum 120000
    # overflows float16 (max 65504), so float16 accumulation would give inf or NaN.
    x = np.array([60000.0, 60000.0, 60000.0, 59968.0], dtype=np.float16).reshape(1, 1, 1, 4)
    weight = np.array([1.0, 1.0, -1.0, -1.0], dtype=np.float16).reshape(1, 1, 1, 4)
    offset = np.zeros((1, 8, 1, 1), dtype=np.float16)
    out = deformcp.deform_conv2d(x, offset, None, weight)
    assert out.dtype == np.float16
    assert out[0, 0, 0, 0] == 32.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_zero_keeps_dtype(dtype, rng):
    problem = make_problem(Spec(batch=0), rng, dtype=dtype)
    assert run_forward(problem).dtype == dtype
    assert run_im2col(problem).dtype == dtype
    for name, grad in run_backward(problem).items():
        assert grad.dtype == dtype and grad.shape == getattr(problem, name).shape, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_none_and_bias_none_with_each_dtype(dtype, rng):
    # Absent optional inputs must not take part in the dtype agreement.
    problem = make_problem(Spec(mask=False, bias=False), rng, dtype=dtype)
    assert run_forward(problem).dtype == dtype
    assert_within_tolerance(run_forward(problem), loop_forward(problem), dtype.name, "forward")


def test_float32_error_on_a_tall_image_grows_as_documented(rng):
    # docs/semantics.md, section 10: positions near row N are exact to N * 2**-24 pixels, so
    # most results stay within about that relative error and grad_offset, which jumps where a
    # position crosses an integer, within a few sqrt(2 N * 2**-24).
    rows = 4096
    problem = make_problem(Spec(batch=1, in_channels=2, out_channels=2, height=rows, width=8), rng, np.float32)
    wide = problem.astype(np.float64)  # the same (rounded) inputs, computed in float64
    position_error = rows * 2.0**-24
    bounds = {"out": position_error, "x": position_error, "mask": position_error, "weight": position_error,
              "bias": TOLERANCE["float32"], "offset": 3 * np.sqrt(2 * position_error)}
    actual = {"out": run_forward(problem), **run_backward(problem)}
    expected = {"out": run_forward(wide), **run_backward(wide)}
    for name, bound in bounds.items():
        error = relative_error(actual[name], expected[name])
        assert error <= bound, f"{name}: relative error {error:.3g} > {bound:.3g} at H={rows}"
    # ... and the small-image tolerance would not hold here: the bound is a statement about size.
    assert relative_error(actual["offset"], expected["offset"]) > TOLERANCE["float32"]
