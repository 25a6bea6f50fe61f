"""Identities deformable convolution must satisfy, each checked against an independent computation:
ordinary convolution (torch, float64), torch's unfold, the adjoint identity behind grad_x,
linearity in the mask, batch independence, memory-layout independence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deformcp
from problems import INPUT_NAMES, Spec, assert_within_tolerance, make_problem, run_backward, run_forward, run_im2col

# Larger than the loop-reference tests: the comparisons here are against torch or identities.
CONV_SPECS = {
    "basic": Spec(batch=2, in_channels=3, out_channels=5, height=9, width=8),
    "groups": Spec(batch=2, in_channels=6, out_channels=4, groups=2, offset_groups=3, height=7, width=9),
    "depthwise": Spec(batch=1, in_channels=4, out_channels=8, groups=4, offset_groups=2, height=8, width=8),
    "stride_dilation": Spec(batch=2, in_channels=2, out_channels=3, height=11, width=10, stride=(2, 3),
                            dilation=(2, 1), padding=(2, 1, 2, 1)),
    "asymmetric_padding": Spec(batch=2, in_channels=2, out_channels=3, height=8, width=7, padding=(0, 2, 3, 1)),
    "non_square_kernel": Spec(batch=1, in_channels=4, out_channels=2, kernel=(2, 4), height=6, width=9,
                              padding=(1, 0, 0, 2), stride=(1, 2)),
    "no_padding_no_bias": Spec(batch=3, in_channels=2, out_channels=2, height=6, width=6, padding=(0, 0, 0, 0),
                               bias=False),
    "height1": Spec(batch=2, in_channels=2, out_channels=2, height=1, width=7, kernel=(1, 3), padding=(0, 1, 0, 1)),
}
CONV_PARAMS = [pytest.param(s, id=n) for n, s in CONV_SPECS.items()]


def _pad4(spec):
    return spec.padding if len(spec.padding) == 4 else (*spec.padding, *spec.padding)


def _torch_conv(x_padded, weight, bias, spec):
    """float64 torch convolution of an explicitly padded input (torch has no asymmetric padding)."""
    return F.conv2d(torch.from_numpy(x_padded), torch.from_numpy(weight),
                    None if bias is None else torch.from_numpy(bias),
                    stride=spec.stride, dilation=spec.dilation, groups=spec.groups).numpy()


def _padded(x, spec, margin=0):
    top, left, bottom, right = _pad4(spec)
    return np.pad(x, ((0, 0), (0, 0), (top + margin, bottom + margin), (left + margin, right + margin)))


@pytest.mark.parametrize("unit_mask", [True, False], ids=["mask_of_ones", "mask_none"])
@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_zero_offsets_equal_convolution(spec, unit_mask, rng):
    problem = make_problem(dataclasses.replace(spec, mask=unit_mask), rng)
    problem.offset = np.zeros_like(problem.offset)
    if unit_mask:
        problem.mask = np.ones_like(problem.mask)
    expected = _torch_conv(_padded(problem.x, spec), problem.weight, problem.bias, spec)
    assert_within_tolerance(run_forward(problem), expected, what="forward")


@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_integer_offsets_equal_convolution_of_shifted_input(spec, rng):
    # Every sample of offset group g moves by the same integer (sy, sx); at integer
    # coordinates bilinear sampling reads exactly one pixel, so this is a convolution
    # of the input shifted by (sy, sx) with zero fill. The shift is applied to the
    # padded input with a margin, so samples that leave the padding for the image read
    # image pixels, as the deformable convolution does.
    problem = make_problem(spec, rng)
    kh, kw = spec.kernel
    groups, k = spec.offset_groups, kh * kw
    shifts = rng.integers(-3, 4, size=(groups, 2))
    offset = np.empty_like(problem.offset).reshape(spec.batch, groups, k, 2, *spec.out_size)
    offset[...] = shifts[None, :, None, :, None, None]
    problem.offset = offset.reshape(problem.offset.shape)
    problem.mask = None
    margin = 3
    big = _padded(problem.x, spec, margin)
    ph, pw = big.shape[2] - 2 * margin, big.shape[3] - 2 * margin
    per_group = spec.in_channels // groups
    shifted = np.concatenate([big[:, g * per_group:(g + 1) * per_group,
                                  margin + sy:margin + sy + ph, margin + sx:margin + sx + pw]
                              for g, (sy, sx) in enumerate(shifts)], axis=1)
    expected = _torch_conv(shifted, problem.weight, problem.bias, spec)
    assert_within_tolerance(run_forward(problem), expected, what="forward")


def _identity_weight(channels, kh, kw):
    """Weight with ``y[b, c*K + k] = columns[b, c, k]``: groups=1, C_out = C*K, one 1 per output channel.

    With it the convolution *is* the im2col (in unfold's layout), so backward with
    grad_out = c computes grad_columns = c, and its grad_x is im2col's transpose applied to c.
    """
    k = kh * kw
    weight = np.zeros((channels * k, channels, kh, kw))
    for c in range(channels):
        for point in range(k):
            weight[c * k + point, c, point // kw, point % kw] = 1.0
    return weight


def _lattice_mix(offset, rng):
    """Offsets where about a third are rounded to integers (zeros with padding 1 give the -1 line)."""
    chosen = rng.random(offset.shape) < 0.33
    return np.where(chosen, np.round(offset), offset)


@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_adjoint_identity_behind_grad_x(spec, rng):
    # <im2col(x), c> == <x, im2col^T(c)>, with im2col^T(c) obtained as grad_x (see _identity_weight).
    problem = make_problem(spec, rng)
    problem.offset = _lattice_mix(problem.offset, rng)
    kh, kw = spec.kernel
    weight = _identity_weight(spec.in_channels, kh, kw)
    cols = run_im2col(problem)                                        # (B, C, K, Ho, Wo)
    flat = cols.reshape(spec.batch, -1, *spec.out_size)
    identity_problem = dataclasses.replace(problem, weight=weight, bias=None, grad_out=rng.standard_normal(flat.shape))
    # The construction itself: the convolution with this weight reproduces the columns.
    assert_within_tolerance(run_forward(identity_problem), flat, what="forward with the identity weight")
    c = identity_problem.grad_out
    grads = run_backward(identity_problem, wrt=("x", "mask"))
    lhs, rhs = np.sum(flat * c), np.sum(problem.x * grads["x"])
    assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(flat * c)), (lhs, rhs)
    # And grad_mask = sum over the group's channels of grad_columns * unmasked sample.
    unmasked = run_im2col(dataclasses.replace(problem, mask=None))
    g, k = spec.offset_groups, kh * kw
    expected = (c.reshape(cols.shape) * unmasked).reshape(spec.batch, g, -1, k, *spec.out_size).sum(axis=2)
    assert_within_tolerance(grads["mask"], expected.reshape(grads["mask"].shape), what="grad_mask")


@pytest.mark.parametrize("spec", [CONV_SPECS["basic"], CONV_SPECS["stride_dilation"], CONV_SPECS["non_square_kernel"]])
def test_groups1_convolution_is_weight_times_columns(spec, rng):
    # deform_im2col's documented use: weight.reshape(C_out, -1) @ columns (+ bias) is the
    # convolution, and grad_weight is grad_out @ columns^T.
    problem = make_problem(spec, rng)
    cols = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, spec.kernel, **spec.kwargs)
    wmat = problem.weight.reshape(spec.out_channels, -1)
    expected = np.einsum("ok,bkp->bop", wmat, cols) + problem.bias[:, None]
    assert_within_tolerance(run_forward(problem), expected.reshape(spec.batch, spec.out_channels, *spec.out_size))
    go = problem.grad_out.reshape(spec.batch, spec.out_channels, -1)
    grad_weight = np.einsum("bop,bkp->ok", go, cols).reshape(problem.weight.shape)
    assert_within_tolerance(run_backward(problem, wrt="weight")["weight"], grad_weight, what="grad_weight")


@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_linear_in_mask(spec, rng):
    problem = make_problem(dataclasses.replace(spec, bias=False), rng)
    m1, m2 = problem.mask, rng.uniform(-1.0, 1.0, problem.mask.shape)
    a, b = 0.7, -1.9
    at = lambda mask: dataclasses.replace(problem, mask=mask)  # noqa: E731
    combined = a * run_forward(at(m1)) + b * run_forward(at(m2))
    assert_within_tolerance(run_forward(at(a * m1 + b * m2)), combined, what="forward")
    combined_cols = a * run_im2col(at(m1)) + b * run_im2col(at(m2))
    assert_within_tolerance(run_im2col(at(a * m1 + b * m2)), combined_cols, what="im2col")


@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_im2col_with_zero_offsets_is_unfold(spec, rng):
    problem = make_problem(dataclasses.replace(spec, mask=False), rng)
    cols = deformcp.deform_im2col(problem.x, np.zeros_like(problem.offset), None, spec.kernel, **spec.kwargs)
    expected = F.unfold(torch.from_numpy(_padded(problem.x, spec)), spec.kernel, dilation=spec.dilation,
                        stride=spec.stride).numpy()
    # At integer coordinates the sample is 1 * pixel + 0 * neighbours: exact.
    np.testing.assert_array_equal(cols, expected)


@pytest.mark.parametrize("spec", CONV_PARAMS)
def test_mask_none_equals_mask_of_ones(spec, rng):
    problem = make_problem(spec, rng)
    ones = dataclasses.replace(problem, mask=np.ones_like(problem.mask))
    none = dataclasses.replace(problem, mask=None)
    assert_within_tolerance(run_forward(none), run_forward(ones), what="forward")
    assert_within_tolerance(run_im2col(none), run_im2col(ones), what="im2col")
    g_none, g_ones = run_backward(none), run_backward(ones)
    assert g_none["mask"] is None and g_ones["mask"] is not None
    for name in ("x", "offset", "weight") + (("bias",) if spec.bias else ()):
        assert_within_tolerance(g_none[name], g_ones[name], what=f"grad_{name}")


@pytest.mark.parametrize("spec", [CONV_SPECS["basic"], CONV_SPECS["groups"]])
def test_images_are_independent(spec, rng):
    # Each image of the batch is convolved on its own; the weight and bias gradients sum over images.
    problem = make_problem(spec, rng)
    out, grads = run_forward(problem), run_backward(problem)
    per_image = []
    for b in range(spec.batch):
        one = dataclasses.replace(problem, x=problem.x[b:b + 1], offset=problem.offset[b:b + 1],
                                  mask=problem.mask[b:b + 1], grad_out=problem.grad_out[b:b + 1])
        assert_within_tolerance(run_forward(one), out[b:b + 1], what=f"forward of image {b}")
        g = run_backward(one)
        for name in ("x", "offset", "mask"):
            assert_within_tolerance(g[name], grads[name][b:b + 1], what=f"grad_{name} of image {b}")
        per_image.append(g)
    for name in ("weight", "bias"):
        assert_within_tolerance(sum(g[name] for g in per_image), grads[name], what=f"grad_{name}")


def _strided_copy(a, rng):
    """The same values in a non-contiguous, reversed-stride view."""
    big = np.empty(tuple(2 * n for n in a.shape), dtype=a.dtype)
    big[...] = rng.standard_normal(big.shape)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view = view[..., ::-1]
    view[...] = a[..., ::-1]
    return view[..., ::-1]


@pytest.mark.parametrize("name", [*INPUT_NAMES, "grad_out"])
def test_memory_layout_does_not_matter(name, rng):
    # One input at a time as a non-contiguous, reversed-stride view: the results are identical.
    problem = make_problem(CONV_SPECS["groups"], rng)
    strided = dataclasses.replace(problem, **{name: _strided_copy(getattr(problem, name), rng)})
    assert not getattr(strided, name).flags.c_contiguous
    np.testing.assert_array_equal(run_forward(strided), run_forward(problem))
    np.testing.assert_array_equal(run_im2col(strided), run_im2col(problem))
    g_strided, g = run_backward(strided), run_backward(problem)
    for grad in INPUT_NAMES:
        np.testing.assert_array_equal(g_strided[grad], g[grad], err_msg=f"grad_{grad}")


def test_inputs_are_not_modified(rng):
    problem = make_problem(CONV_SPECS["groups"], rng)
    names = (*INPUT_NAMES, "grad_out")
    before = {n: getattr(problem, n).copy() for n in names}
    run_forward(problem)
    run_im2col(problem)
    run_backward(problem)
    for n in names:
        np.testing.assert_array_equal(getattr(problem, n), before[n], err_msg=n)
