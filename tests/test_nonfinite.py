"""NaN and Inf: which outputs they reach, derived independently from the sampling positions.

The rules (torchvision's arithmetic): a non-finite pixel poisons every sample that has it
among its in-image corners, even with bilinear weight 0, but not a sample that takes the
early exit; a NaN position poisons its sample; an infinite position is outside; a NaN
mask poisons its sample even outside the image (mask * 0 is NaN).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import deformcp
import nonfinite_cases
from problems import Spec, make_problem, run_backward, run_forward, run_im2col

SPEC = Spec(batch=2, in_channels=4, out_channels=4, height=5, width=6, groups=2, offset_groups=2)
# One channel per convolution group (the CPU backend's einsum products; two output channels per
# input channel, so both of their branches run) and four offset groups sharing one sampling plan.
DEPTHWISE_SPEC = Spec(batch=2, in_channels=8, out_channels=16, height=5, width=6, groups=8, offset_groups=4)
K = 9


def _positions(spec, offset):
    """Sampling positions ``(py, px)``, each of shape (B, G, K, H_out, W_out), computed directly."""
    kh, kw = spec.kernel
    oh, ow = spec.out_size
    (sh, sw), (dh, dw), (top, left) = spec.stride, spec.dilation, spec.padding[:2]
    off = offset.reshape(spec.batch, spec.offset_groups, kh * kw, 2, oh, ow)
    i, j = np.divmod(np.arange(kh * kw), kw)
    base_y = np.arange(oh)[None, :, None] * sh - top + i[:, None, None] * dh
    base_x = np.arange(ow)[None, None, :] * sw - left + j[:, None, None] * dw
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def _reads(spec, offset, row, col):
    """Which samples have pixel (row, col) among their corners: (with the early exit, without it)."""
    py, px = _positions(spec, offset)
    y0, x0 = np.floor(py), np.floor(px)
    corner = ((y0 == row) | (y0 + 1 == row)) & ((x0 == col) | (x0 + 1 == col))
    outside = (py <= -1) | (py >= spec.height) | (px <= -1) | (px >= spec.width)
    return corner & ~outside, corner


def _conv_groups_of_offset_group(spec, g):
    """Output channels whose convolution group shares input channels with offset group ``g``."""
    cg, cpg = spec.in_channels // spec.offset_groups, spec.in_channels // spec.groups
    opg = spec.out_channels // spec.groups
    first, last = (g * cg) // cpg, ((g + 1) * cg - 1) // cpg
    return np.arange(first * opg, (last + 1) * opg)


def _problem(rng, offset_kind):
    problem = make_problem(SPEC, rng)
    if offset_kind == "zero":        # integer positions; the first row and column sample the -1 lines
        problem.offset = np.zeros_like(problem.offset)
    elif offset_kind == "half":      # half-integers and integers
        problem.offset = np.round(problem.offset * 2) / 2
    return problem


def _assert_nonfinite_exactly_at(actual, expected_bad, value, what):
    """``actual`` is non-finite exactly where ``expected_bad``; NaN itself where the poison is NaN."""
    bad = ~np.isfinite(actual)
    wrong = np.argwhere(bad != expected_bad)
    assert wrong.size == 0, (f"{what}: {len(wrong)} entries wrong, first {tuple(wrong[0])}: "
                             f"value {actual[tuple(wrong[0])]!r}, expected {'non-finite' if expected_bad[tuple(wrong[0])] else 'finite'}")
    if np.isnan(value):
        assert np.isnan(actual[bad]).all(), f"{what}: a NaN input gave Inf"


PIXEL_CASES = [pytest.param(v, o, p, id=f"{n}-{o}-{p}")
               for n, v in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf))
               for o in ("zero", "half", "continuous")
               for p in ((0, 0), (2, 3), (4, 5), (0, 4))]


def _poisoned_pixel(rng, value, offset_kind, pixel):
    problem = _problem(rng, offset_kind)
    b0, c0 = 1, 2
    problem.x[b0, c0][pixel] = value
    g0 = c0 // (SPEC.in_channels // SPEC.offset_groups)
    reads_value, reads_coord = (r[b0, g0] for r in _reads(SPEC, problem.offset, *pixel))  # (K, Ho, Wo)
    return problem, b0, c0, g0, reads_value, reads_coord


@pytest.mark.parametrize("value, offset_kind, pixel", PIXEL_CASES)
def test_nonfinite_pixel_forward_and_im2col(value, offset_kind, pixel, rng):
    problem, b0, c0, g0, reads_value, _ = _poisoned_pixel(rng, value, offset_kind, pixel)
    oh, ow = SPEC.out_size
    expected = np.zeros((SPEC.batch, SPEC.out_channels, oh, ow), bool)
    # The convolution group of channel c0 sees the poisoned column (weight * NaN is NaN even for weight 0).
    conv_group = c0 // (SPEC.in_channels // SPEC.groups)
    opg = SPEC.out_channels // SPEC.groups
    expected[b0, conv_group * opg:(conv_group + 1) * opg] = reads_value.any(axis=0)
    _assert_nonfinite_exactly_at(run_forward(problem), expected, value, "forward")
    cols_expected = np.zeros((SPEC.batch, SPEC.in_channels, K, oh, ow), bool)
    cols_expected[b0, c0] = reads_value
    _assert_nonfinite_exactly_at(run_im2col(problem), cols_expected, value, "im2col")


@pytest.mark.parametrize("value, offset_kind, pixel", PIXEL_CASES)
def test_nonfinite_pixel_grad_offset_weight_x_bias(value, offset_kind, pixel, rng):
    problem, b0, c0, g0, reads_value, reads_coord = _poisoned_pixel(rng, value, offset_kind, pixel)
    grads = run_backward(problem)
    oh, ow = SPEC.out_size
    # grad_offset: every in-image corner enters d/dpy and d/dpx (no early exit).
    expected = np.zeros((SPEC.batch, SPEC.offset_groups, K, 2, oh, ow), bool)
    expected[b0, g0] = reads_coord[:, None]
    _assert_nonfinite_exactly_at(grads["offset"], expected.reshape(grads["offset"].shape), value, "grad_offset")
    # grad_weight[o, c0 local, k]: the sum over pixels of grad_out * column (c0, k).
    expected = np.zeros(problem.weight.shape, bool)
    cpg = SPEC.in_channels // SPEC.groups
    conv_group = c0 // cpg
    opg = SPEC.out_channels // SPEC.groups
    expected[conv_group * opg:(conv_group + 1) * opg, c0 % cpg] = reads_value.any(axis=(1, 2)).reshape(SPEC.kernel)
    _assert_nonfinite_exactly_at(grads["weight"], expected, value, "grad_weight")
    # grad_x is the transposed sampling applied to grad_columns and never reads x; grad_bias neither.
    assert np.isfinite(grads["x"]).all() and np.isfinite(grads["bias"]).all()


@pytest.mark.parametrize("value, offset_kind, pixel", PIXEL_CASES)
def test_nonfinite_pixel_grad_mask(value, offset_kind, pixel, rng):
    # grad_mask = sum_c grad_column * sample, and the sample takes the early exit: a sample
    # exactly on a -1 line (zero offsets with padding 1) has an in-image corner but reads nothing.
    problem, b0, c0, g0, reads_value, _ = _poisoned_pixel(rng, value, offset_kind, pixel)
    grad_mask = run_backward(problem, wrt="mask")["mask"]
    expected = np.zeros((SPEC.batch, SPEC.offset_groups, K, *SPEC.out_size), bool)
    expected[b0, g0] = reads_value
    _assert_nonfinite_exactly_at(grad_mask, expected.reshape(grad_mask.shape), value, "grad_mask")


# --- non-finite positions and masks ---------------------------------------------

SAMPLE = (1, 1, 4, 2, 3)  # (b, offset group, kernel point, oy, ox)


def _sample_channels(kind):
    """Offset channels of SAMPLE's dy and dx, and its mask channel."""
    b, g, k, oy, ox = SAMPLE
    return {"dy": [g * 2 * K + 2 * k], "dx": [g * 2 * K + 2 * k + 1],
            "both": [g * 2 * K + 2 * k, g * 2 * K + 2 * k + 1]}[kind]


def _expected_sample_outputs():
    """Forward and im2col entries that SAMPLE feeds."""
    b, g, k, oy, ox = SAMPLE
    oh, ow = SPEC.out_size
    forward = np.zeros((SPEC.batch, SPEC.out_channels, oh, ow), bool)
    forward[b, _conv_groups_of_offset_group(SPEC, g), oy, ox] = True
    cols = np.zeros((SPEC.batch, SPEC.in_channels, K, oh, ow), bool)
    cg = SPEC.in_channels // SPEC.offset_groups
    cols[b, g * cg:(g + 1) * cg, k, oy, ox] = True
    return forward, cols


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("kind", ["dy", "dx", "both"])
def test_nan_offset_poisons_exactly_its_sample(kind, mask, rng):
    problem = make_problem(dataclasses.replace(SPEC, mask=mask), rng)
    b, *_, oy, ox = SAMPLE
    # Keep the sample's finite coordinate inside the image (see the next test for why).
    problem.offset[b, _sample_channels("both"), oy, ox] = (0.3, -0.2)
    baseline_out, baseline_cols = run_forward(problem), run_im2col(problem)
    problem.offset[b, _sample_channels(kind), oy, ox] = np.nan
    forward, cols = _expected_sample_outputs()
    out, columns = run_forward(problem), run_im2col(problem)
    _assert_nonfinite_exactly_at(out, forward, np.nan, "forward")
    _assert_nonfinite_exactly_at(columns, cols, np.nan, "im2col")
    # Everything else is untouched.
    np.testing.assert_allclose(out[~forward], baseline_out[~forward], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(columns[~cols], baseline_cols.reshape(cols.shape)[~cols])


@pytest.mark.parametrize("nan_channel, outside", [("dy", 4.0), ("dy", -5.0), ("dx", 3.0), ("dx", -5.0)])
def test_nan_coordinate_with_the_other_outside_takes_the_early_exit(nan_channel, outside, rng):
    # The early exit tests each coordinate (py <= -1, py >= H, px <= -1, px >= W, as torchvision
    # does); a NaN fails every comparison, so when the other coordinate is outside the sample
    # is 0, not NaN.
    problem = make_problem(SPEC, rng)
    b, *_, oy, ox = SAMPLE
    other = "dx" if nan_channel == "dy" else "dy"
    far = dataclasses.replace(problem, offset=problem.offset.copy())
    for target in (problem, far):
        target.offset[b, _sample_channels(other), oy, ox] = outside
    problem.offset[b, _sample_channels(nan_channel), oy, ox] = np.nan
    np.testing.assert_array_equal(run_forward(problem), run_forward(far))
    np.testing.assert_array_equal(run_im2col(problem), run_im2col(far))


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("channel, value", [("dy", np.inf), ("dy", -np.inf), ("dx", np.inf), ("dx", -np.inf)])
def test_infinite_offset_is_outside(channel, value, mask, rng):
    # An infinite position is outside the image: the same as a finite position far outside.
    problem = make_problem(dataclasses.replace(SPEC, mask=mask), rng)
    b, *_, oy, ox = SAMPLE
    c = _sample_channels(channel)
    far = dataclasses.replace(problem, offset=problem.offset.copy())
    far.offset[b, c, oy, ox] = np.sign(value) * 1e6
    problem.offset[b, c, oy, ox] = value
    np.testing.assert_allclose(run_forward(problem), run_forward(far), rtol=1e-13, atol=1e-13)
    cols = run_im2col(problem)
    np.testing.assert_array_equal(cols, run_im2col(far))
    _, expected_cols = _expected_sample_outputs()
    assert (cols.reshape(expected_cols.shape)[expected_cols] == 0).all(), "the sample must read 0"
    grads, grads_far = run_backward(problem), run_backward(far)
    for name in ("x", "mask", "weight", "bias"):
        if grads_far[name] is not None:
            np.testing.assert_allclose(grads[name], grads_far[name], rtol=1e-13, atol=1e-13, err_msg=f"grad_{name}")
    # The coordinate gradient of the infinite sample itself is not specified; every other entry is.
    keep = np.ones(problem.offset.shape, bool)
    keep[b, _sample_channels("both"), oy, ox] = False
    np.testing.assert_allclose(grads["offset"][keep], grads_far["offset"][keep], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("position", ["inside", "outside", "infinite"])
def test_nan_mask_poisons_its_sample(position, rng):
    # Even an outside sample, which reads 0, is NaN: mask * 0 is NaN.
    problem = make_problem(SPEC, rng)
    b, g, k, oy, ox = SAMPLE
    dy_channel = _sample_channels("dy")
    problem.offset[b, _sample_channels("both"), oy, ox] = (0.3, -0.2)
    if position == "outside":
        problem.offset[b, dy_channel, oy, ox] = 50.0
    elif position == "infinite":
        problem.offset[b, dy_channel, oy, ox] = -np.inf
    problem.mask[b, g * K + k, oy, ox] = np.nan
    forward, cols = _expected_sample_outputs()
    _assert_nonfinite_exactly_at(run_forward(problem), forward, np.nan, "forward")
    _assert_nonfinite_exactly_at(run_im2col(problem), cols, np.nan, "im2col")


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_nan_weight_or_bias_poisons_its_output_channel(name, rng):
    problem = make_problem(SPEC, rng, offset_spread=8.0)   # most samples outside: columns of zeros
    if name == "weight":
        problem.weight[3, 1, 0, 2] = np.nan                # 0 * NaN is NaN: every pixel of channel 3
    else:
        problem.bias[3] = np.nan
    expected = np.zeros((SPEC.batch, SPEC.out_channels, *SPEC.out_size), bool)
    expected[:, 3] = True
    _assert_nonfinite_exactly_at(run_forward(problem), expected, np.nan, "forward")


def test_grad_mask_on_the_minus_one_line_ignores_a_nan_corner():
    # The smallest case of the rule above: zero offsets with padding 1 put kernel point (0, 0)
    # of output (0, 0) exactly at (-1, -1). The sample takes the early exit (value 0), so
    # grad_mask there is grad_column * 0 = 0, although pixel (0, 0) is one of its corners.
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    x[0, 0, 0, 0] = np.nan
    mask = np.full((1, 9, 3, 3), 0.5)
    grads = deformcp.deform_conv2d_backward(np.ones((1, 1, 3, 3)), x, np.zeros((1, 18, 3, 3)), mask,
                                            np.ones((1, 1, 3, 3)), padding=1, wrt="mask")
    assert grads.grad_mask[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("threads", ["1", "2"])
def test_non_finite_values_do_not_warn(threads, rng, monkeypatch):
    # Defined behaviour, not a numerical accident: NumPy's "invalid value" and "overflow"
    # warnings would fire every training step of a model that has NaNs, on any thread,
    # and the caller's own error state (here: raise on everything) must not change that.
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    problem = make_problem(SPEC, rng)
    problem.x[0, 0, 2, 3] = np.inf
    problem.x[1, 1, 1, 1] = -np.inf
    problem.offset[0, 0, 1, 1] = np.nan
    problem.offset[1, 3, 2, 2] = np.inf
    problem.mask[0, 2, 0, 0] = np.nan
    problem.weight[0, 0, 0, 0] = 1e308
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_forward(problem)
        grads = run_backward(problem)
        columns = run_im2col(problem)
    grad_bias = grads.pop("bias")  # the sum of grad_out, which is finite
    assert np.isfinite(grad_bias).all()
    for name, value in {"out": out, "columns": columns, **grads}.items():
        assert not np.isfinite(value).all(), f"{name}: the non-finite inputs reach it"
        assert np.isfinite(value).any(), f"{name}: but not everywhere"


# --- every input of the backward, against torchvision's arithmetic ------------------------

@pytest.mark.parametrize("spec", [pytest.param(SPEC, id="groups2"), pytest.param(DEPTHWISE_SPEC, id="depthwise")])
@pytest.mark.parametrize("name, value, offset_kind", nonfinite_cases.CASES)
def test_nonfinite_input_reaches_what_torchvision_reaches(name, value, offset_kind, spec, rng):
    problem = nonfinite_cases.poisoned_problem(spec, name, value, offset_kind, rng)
    actual = dict(forward=run_forward(problem), **run_backward(problem))
    nonfinite_cases.assert_same_patterns(actual, nonfinite_cases.oracle_outputs(problem), f"{name}={value}")
