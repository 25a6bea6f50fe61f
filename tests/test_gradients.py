"""The five gradients: against the float64 loop reference, by finite differences, and by hand
on the integer-coordinate and -1-line rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import deformcp
from problems import (EXAMPLE_SPECS, INPUT_NAMES, Spec, assert_within_tolerance, assert_gradients_match, make_problem,
                      nudge_offsets, loop_backward, run_backward, run_forward)

SPEC_PARAMS = [pytest.param(spec, id=name) for name, spec in EXAMPLE_SPECS.items()]


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_gradients_match_reference(spec, rng):
    problem = make_problem(spec, rng)
    grads = run_backward(problem)
    for name in INPUT_NAMES:
        value = getattr(problem, name)
        if value is None:
            assert grads[name] is None, f"grad_{name} must be None when {name} is None"
        else:
            assert grads[name].shape == value.shape and grads[name].dtype == np.float64
    assert_gradients_match(grads, loop_backward(problem))


@pytest.mark.parametrize("offset_step", [1.0, 0.5])
@pytest.mark.parametrize("spec", [pytest.param(EXAMPLE_SPECS[n], id=n)
                                  for n in ("basic", "groups2_offset_groups2", "asymmetric_padding", "width1")])
def test_gradients_on_lattice_offsets(spec, offset_step, rng):
    # Integer coordinates, the -1 lines and the H, W lines hit exactly: the coordinate
    # gradient there is torchvision's one-sided (cell [n, n+1]) derivative.
    problem = make_problem(spec, rng)
    problem.offset = np.round(problem.offset / offset_step) * offset_step
    assert_gradients_match(run_backward(problem), loop_backward(problem))


# --- finite differences ------------------------------------------------------

FD_SPECS = ("basic", "groups2_offset_groups2", "groups4_offset_groups2", "stride2", "asymmetric_padding",
            "dilation", "kernel_3x2", "no_mask_no_bias", "height1")
FD_CASES = [pytest.param(EXAMPLE_SPECS[s], name, id=f"{s}-{name}")
            for s in FD_SPECS for name in INPUT_NAMES
            if not (name == "mask" and not EXAMPLE_SPECS[s].mask) and not (name == "bias" and not EXAMPLE_SPECS[s].bias)]


def _loss(problem, name, value) -> float:
    """L = <grad_out, y> with input ``name`` replaced by ``value``; its gradient is the backward pass."""
    return float(np.sum(problem.grad_out * run_forward(dataclasses.replace(problem, **{name: value}))))


@pytest.mark.parametrize("spec, name", FD_CASES)
def test_directional_derivative_matches_central_difference(spec, name, rng):
    problem = make_problem(spec, rng)
    # Away from integer coordinates the output is bilinear in each sample's (py, px) and
    # linear in x, mask, weight and bias, so along a direction the loss is at most quadratic
    # in the step: the central difference is exact up to rounding, for any step that keeps
    # every coordinate in its cell (fractions in [0.1, 0.9], steps below 0.01).
    problem.offset = nudge_offsets(problem.offset)
    value = getattr(problem, name)
    direction = rng.standard_normal(value.shape)
    h = 1e-3
    central = (_loss(problem, name, value + h * direction) - _loss(problem, name, value - h * direction)) / (2 * h)
    grad = run_backward(problem, wrt=(name,))[name]
    analytic = float(np.sum(grad * direction))
    scale = np.linalg.norm(grad) * np.linalg.norm(direction)  # the Cauchy-Schwarz bound on both sides
    assert scale > 0, f"grad_{name} is identically zero; the check would be vacuous"
    assert abs(analytic - central) <= 1e-9 * scale, f"grad_{name}: <grad, v> = {analytic!r}, central difference {central!r}"


# --- the integer-coordinate and -1-line rule, by hand ----------------------------


def _single_sample_gradient(x, py, px, mask=0.75, weight=1.5, grad=-2.0):
    """grad_offset (dy, dx) and grad_mask of a 1x1 kernel sampling ``x`` (one channel) at (py, px).

    Output pixel (0, 0) has base position (0, 0); the other output pixels get a zero
    grad_out, so only this sample contributes.
    """
    h, w = x.shape
    offset = np.zeros((1, 2, h, w))
    offset[0, :, 0, 0] = (py, px)
    m = np.ones((1, 1, h, w))
    m[0, 0, 0, 0] = mask
    grad_out = np.zeros((1, 1, h, w))
    grad_out[0, 0, 0, 0] = grad
    g = deformcp.deform_conv2d_backward(grad_out, x[None, None], offset, m, np.full((1, 1, 1, 1), weight))
    return g.grad_offset[0, :, 0, 0], g.grad_mask[0, 0, 0, 0]


_X = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])  # 2x3, every difference distinct
_C = 0.75 * 1.5 * -2.0  # mask * weight * grad_out: the chain-rule factor of the coordinate gradient


@pytest.mark.parametrize("py, px, d_py, d_px, value", [
    # Integer interior point: derivatives over the cell [0, 1] x [1, 2] (right derivatives).
    (0.0, 1.0, 16.0 - 2.0, 4.0 - 2.0, 2.0),
    # Last row and column: the +1 corners are outside (zero), so the right derivative is -v.
    (1.0, 2.0, -32.0, -32.0, 32.0),
    # On the -1 line: the sample is 0 (early exit) but its right derivative is not:
    # d/dpy = (1 - lx) * (x[0, 1] - 0). torchvision's rule; mmcv and the original DCNv2 give 0.
    (-1.0, 1.0, 2.0, 0.0, 0.0),
    # On the -1 column line likewise.
    (1.0, -1.0, 0.0, 8.0, 0.0),
    # On both -1 lines: only corner (0, 0) is inside, and it enters d/dpy and d/dpx only
    # through lx * (v4 - v2) and ly * (v4 - v3), with lx = ly = 0: both derivatives vanish.
    (-1.0, -1.0, 0.0, 0.0, 0.0),
    # Fractional point: the bilinear derivatives.
    (0.25, 0.5, 0.5 * (8.0 - 1.0) + 0.5 * (16.0 - 2.0), 0.75 * (2.0 - 1.0) + 0.25 * (16.0 - 8.0),
     0.75 * 0.5 * 1.0 + 0.75 * 0.5 * 2.0 + 0.25 * 0.5 * 8.0 + 0.25 * 0.5 * 16.0),
    # On the H line (py == 2): outside, all corners outside, everything zero.
    (2.0, 1.0, 0.0, 0.0, 0.0),
    # Between -2 and -1: outside and no corner inside.
    (-1.5, 1.0, 0.0, 0.0, 0.0),
])
def test_coordinate_gradient_rule_by_hand(py, px, d_py, d_px, value):
    grad_offset, grad_mask = _single_sample_gradient(_X, py, px)
    np.testing.assert_allclose(grad_offset, [_C * d_py, _C * d_px], rtol=1e-14, atol=1e-14)
    # grad_mask = grad_column * value, and the value takes the early exit.
    np.testing.assert_allclose(grad_mask, 1.5 * -2.0 * value, rtol=1e-14, atol=1e-14)


def test_zero_offsets_with_padding_sample_on_the_minus_one_line(rng):
    # Zero offsets with padding 1: the first output row's top kernel row samples at py = -1
    # exactly. Its grad_offset is the non-zero right derivative.
    x = rng.standard_normal((1, 1, 3, 3))
    offset = np.zeros((1, 18, 3, 3))
    grad_out = np.zeros((1, 1, 3, 3))
    grad_out[0, 0, 0, 1] = 1.0                         # output (0, 1): kernel point (0, 1) samples (-1, 1)
    weight = np.zeros((1, 1, 3, 3))
    weight[0, 0, 0, 1] = 1.0
    g = deformcp.deform_conv2d_backward(grad_out, x, offset, None, weight, padding=1)
    k = 0 * 3 + 1
    assert g.grad_offset[0, 2 * k, 0, 1] == pytest.approx(x[0, 0, 0, 1], rel=1e-14)  # d/dpy = v3 - v1 = x[0, 1]
    assert g.grad_offset[0, 2 * k + 1, 0, 1] == 0.0                                   # d/dpx on a zero row


# --- which gradients are computed --------------------------------------------


@pytest.mark.parametrize("wrt", [("x",), ("offset",), ("mask",), ("weight",), ("bias",), "offset",
                                 ("x", "weight"), ("offset", "mask"), ()])
def test_wrt_selects_gradients(wrt, rng):
    problem = make_problem(Spec(in_channels=4, out_channels=2, groups=2, offset_groups=2), rng)
    full = run_backward(problem)
    part = run_backward(problem, wrt=wrt)
    wanted = (wrt,) if isinstance(wrt, str) else wrt
    for name in INPUT_NAMES:
        if name in wanted:
            # The same computation as the full call, so the results agree to rounding.
            assert_within_tolerance(part[name], full[name], what=f"grad_{name}")
        else:
            assert part[name] is None, f"grad_{name} was not asked for"


@pytest.mark.parametrize("mask, bias", [(False, False), (False, True), (True, False)])
def test_absent_mask_or_bias_gives_none(mask, bias, rng):
    problem = make_problem(Spec(mask=mask, bias=bias), rng)
    grads = run_backward(problem)
    assert (grads["mask"] is None) == (not mask)
    assert (grads["bias"] is None) == (not bias)
    assert all(grads[n] is not None for n in ("x", "offset", "weight"))


def test_batch_zero_gradients(rng):
    problem = make_problem(Spec(batch=0, in_channels=4, out_channels=6, groups=2, offset_groups=2), rng)
    grads = run_backward(problem)
    for name in INPUT_NAMES:
        assert grads[name].shape == getattr(problem, name).shape, name
        assert grads[name].dtype == np.float64
    # An empty batch contributes nothing: the weight and bias gradients are exact zeros.
    np.testing.assert_array_equal(grads["weight"], 0.0)
    np.testing.assert_array_equal(grads["bias"], 0.0)
