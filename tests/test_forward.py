"""The forward pass and deform_im2col against the float64 loop reference and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

import deformcp
from problems import (EXAMPLE_SPECS, Spec, assert_within_tolerance, make_problem, loop_columns, loop_forward,
                      run_forward, run_im2col)

SPEC_PARAMS = [pytest.param(spec, id=name) for name, spec in EXAMPLE_SPECS.items()]


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_forward_matches_reference(spec, rng):
    problem = make_problem(spec, rng)
    out = run_forward(problem)
    assert out.shape == (spec.batch, spec.out_channels, *spec.out_size)
    assert out.dtype == np.float64
    assert_within_tolerance(out, loop_forward(problem), what="forward")


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_im2col_matches_reference(spec, rng):
    problem = make_problem(spec, rng)
    cols = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, spec.kernel, **spec.kwargs)
    kh, kw = spec.kernel
    oh, ow = spec.out_size
    # torch unfold's layout: [b, c*K + k, oy*W_out + ox]
    assert cols.shape == (spec.batch, spec.in_channels * kh * kw, oh * ow)
    assert cols.dtype == np.float64
    assert_within_tolerance(cols.reshape(spec.batch, spec.in_channels, kh * kw, oh, ow), loop_columns(problem),
                 what="im2col")


@pytest.mark.parametrize("offset_spread", [0.0, 0.5, 8.0], ids=["zero", "small", "mostly_outside"])
def test_forward_offset_spreads(offset_spread, rng):
    # Zero offsets put samples exactly on integers and on the -1 line (padding 1);
    # a large spread sends most samples outside, exercising the early exit.
    problem = make_problem(Spec(batch=1, in_channels=3, out_channels=2, height=5, width=4), rng,
                           offset_spread=offset_spread)
    assert_within_tolerance(run_forward(problem), loop_forward(problem), what="forward")
    assert_within_tolerance(run_im2col(problem), loop_columns(problem), what="im2col")


@pytest.mark.parametrize("offset_step", [1.0, 0.5, 0.25])
def test_forward_on_lattice_offsets(offset_step, rng):
    # Offsets on a lattice hit integer and half-integer coordinates, the image border
    # and the -1 / H lines exactly, where an off-by-one in the corner logic would show.
    problem = make_problem(Spec(batch=2, in_channels=2, out_channels=3, height=4, width=5), rng)
    problem.offset = np.round(problem.offset / offset_step) * offset_step
    assert_within_tolerance(run_forward(problem), loop_forward(problem), what="forward")
    assert_within_tolerance(run_im2col(problem), loop_columns(problem), what="im2col")


# Sampling a 2x3 image whose values are the affine function f(y, x) = 1 + 2y + x:
# bilinear interpolation reproduces an affine function exactly inside the image,
# so the expected values below are computed by hand, not by any implementation.
_AFFINE = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])


@pytest.mark.parametrize("py, px, expected", [
    (0.5, 0.25, 1 + 2 * 0.5 + 0.25),      # interior: the affine value
    (1.0, 2.0, 5.0),                      # exactly on the last pixel
    (0.0, 0.0, 1.0),                      # exactly on the first pixel
    (0.5, 2.5, 0.5 * 0.5 * (3 + 5)),      # right corners outside: (1-lx) * (1-ly, ly) . (3, 5)
    (-0.5, 1.0, 0.5 * 2.0),               # top corners outside: ly * f(0, 1)
    (1.25, 0.0, 0.75 * 3.0),              # bottom corners outside
    (-1.0, 1.0, 0.0),                     # on the -1 line: the early exit, though (0, 1) is a corner
    (1.0, -1.0, 0.0),                     # on the -1 column line
    (2.0, 1.0, 0.0),                      # py == H
    (0.5, 3.0, 0.0),                      # px == W
    (-0.999, 0.0, 0.001 * 1.0),           # just inside the -1 line
    (-3.5, 7.25, 0.0),                    # far outside
])
def test_hand_computed_samples(py, px, expected):
    # A 1x1 kernel with no padding samples at (oy + dy, ox + dx); output pixel (0, 0)
    # has base position (0, 0), so its sample is at (py, px).
    x = _AFFINE[None, None]
    offset = np.broadcast_to(np.array([py, px]).reshape(1, 2, 1, 1), (1, 2, 2, 3)).copy()
    weight = np.ones((1, 1, 1, 1))
    out = deformcp.deform_conv2d(x, offset, None, weight)
    np.testing.assert_allclose(out[0, 0, 0, 0], expected, rtol=1e-14, atol=1e-15)
    cols = deformcp.deform_im2col(x, offset, None, 1)
    np.testing.assert_allclose(cols[0, 0, 0], expected, rtol=1e-14, atol=1e-15)


def test_hand_computed_convolution():
    # Two kernel points, one offset each, a mask and a bias: every term written out.
    x = _AFFINE[None, None]                                   # 1x1x2x3
    weight = np.array([[[[2.0, -1.0]]]])                      # 1x1x1x2 kernel
    offset = np.zeros((1, 4, 2, 2))
    offset[0, :, 0, 0] = [0.5, 0.25, -0.5, 0.0]               # point 0 at (0.5, 0.25); point 1 at (-0.5, 1)
    mask = np.ones((1, 2, 2, 2))
    mask[0, :, 0, 0] = [0.5, 3.0]
    bias = np.array([0.25])
    out = deformcp.deform_conv2d(x, offset, mask, weight, bias)
    expected = 2.0 * 0.5 * (1 + 2 * 0.5 + 0.25) + (-1.0) * 3.0 * (0.5 * 2.0) + 0.25
    np.testing.assert_allclose(out[0, 0, 0, 0], expected, rtol=1e-14)
    # Output (1, 1) with zero offsets is the plain convolution 2 * f(1, 1) - f(1, 2).
    np.testing.assert_allclose(out[0, 0, 1, 1], 2.0 * 4.0 - 5.0 + 0.25, rtol=1e-14)


@pytest.mark.parametrize("short, full", [
    (1, (1, 1, 1, 1)),
    ((2, 1), (2, 1, 2, 1)),
    ([2, 1], (2, 1, 2, 1)),
    ([0, 1, 2, 1], (0, 1, 2, 1)),
    (np.int64(1), (1, 1, 1, 1)),
])
def test_padding_forms_agree(short, full, rng):
    # int -> all four sides; (h, w) -> (h, w, h, w); 4 values are (top, left, bottom, right).
    problem = make_problem(Spec(padding=full), rng)
    assert_within_tolerance(run_forward(problem, padding=short), run_forward(problem), what="forward")
    assert_within_tolerance(run_im2col(problem, padding=short), run_im2col(problem), what="im2col")


def test_asymmetric_padding_order_is_top_left_bottom_right(rng):
    # (top, left, bottom, right) = (0, 2, 1, 0): the first output row starts at
    # y = 0 and the first column at x = -2; output size 6 + 1 - 2 = 5 by 5 + 2 - 2 = 5.
    problem = make_problem(Spec(height=6, width=5, padding=(0, 2, 1, 0)), rng)
    out = run_forward(problem)
    assert out.shape[2:] == (5, 5)
    swapped = make_problem(Spec(height=6, width=5, padding=(2, 0, 0, 1)), rng)
    assert run_forward(swapped).shape[2:] == (6, 4)
    assert_within_tolerance(out, loop_forward(problem), what="forward")


@pytest.mark.parametrize("name, short, full", [
    ("stride", 2, (2, 2)),
    ("dilation", 2, (2, 2)),
    ("stride", [2, 1], (2, 1)),
])
def test_int_and_pair_arguments_agree(name, short, full, rng):
    problem = make_problem(Spec(height=7, width=7, padding=(2, 2, 2, 2), **{name: full}), rng)
    assert_within_tolerance(run_forward(problem, **{name: short}), run_forward(problem), what="forward")


def test_im2col_kernel_size_int_equals_pair(rng):
    problem = make_problem(Spec(kernel=(2, 2)), rng)
    a = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, 2, **problem.spec.kwargs)
    b = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, (2, 2), **problem.spec.kwargs)
    np.testing.assert_array_equal(a, b)


def test_batch_zero_gives_empty_outputs(rng):
    problem = make_problem(Spec(batch=0, in_channels=4, out_channels=6, groups=2), rng)
    out = run_forward(problem)
    assert out.shape == (0, 6, *problem.spec.out_size) and out.dtype == np.float64
    cols = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, (3, 3), **problem.spec.kwargs)
    assert cols.shape == (0, 4 * 9, np.prod(problem.spec.out_size))


@pytest.mark.parametrize("height, width", [(1, 1), (1, 6), (6, 1)])
def test_single_row_or_column(height, width, rng):
    # A 3x3 kernel over a one-pixel-high image: most samples fall outside.
    problem = make_problem(Spec(height=height, width=width, padding=(1, 1, 1, 1)), rng, offset_spread=0.7)
    out = run_forward(problem)
    assert out.shape[2:] == (height, width)
    assert_within_tolerance(out, loop_forward(problem), what="forward")
