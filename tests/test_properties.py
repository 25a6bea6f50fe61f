"""Property-based tests: random geometries (groups, offset groups, stride, symmetric and
asymmetric padding, dilation, non-square kernels, mask or not, bias or not, batch 0 and 33,
H or W of 1), the forward pass, deform_im2col and all five gradients against the loop reference."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from problems import (assert_within_tolerance, assert_gradients_match, make_problem, loop_backward, loop_columns,
                      loop_forward, run_backward, run_forward, run_im2col, specs)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# "continuous": offsets ~ N(0, 2), the generic case.  "lattice": offsets rounded to
# multiples of 1/2, so samples land exactly on integers, half-integers, the image
# border and the -1 / H lines, where the early exit and the one-sided coordinate
# derivative decide the result.
OFFSET_KINDS = st.sampled_from(["continuous", "lattice"])


def _problem(spec, seed, offset_kind):
    problem = make_problem(spec, np.random.default_rng(seed))
    if offset_kind == "lattice":
        problem.offset = np.round(problem.offset * 2) / 2
    note(f"{spec} seed={seed} offsets={offset_kind}")
    return problem


def _check_against_reference(problem):
    spec = problem.spec
    out = run_forward(problem)
    assert out.shape == (spec.batch, spec.out_channels, *spec.out_size)
    assert_within_tolerance(out, loop_forward(problem), what="forward")
    assert_within_tolerance(run_im2col(problem), loop_columns(problem), what="im2col")
    assert_gradients_match(run_backward(problem), loop_backward(problem))


@SETTINGS
@given(spec=specs(), seed=st.integers(0, 2**32 - 1), offset_kind=OFFSET_KINDS)
def test_random_geometry_matches_reference(spec, seed, offset_kind):
    _check_against_reference(_problem(spec, seed, offset_kind))


@settings(SETTINGS, max_examples=20)
@given(spec=specs(max_batch=1, max_size=2, allow_empty_batch=False), seed=st.integers(0, 2**32 - 1),
       offset_kind=OFFSET_KINDS)
def test_batch_33_matches_reference(spec, seed, offset_kind):
    # A batch larger than any tile heuristic's round numbers, on a tiny image so the
    # loop reference stays fast.
    _check_against_reference(_problem(dataclasses.replace(spec, batch=33), seed, offset_kind))


@SETTINGS
@given(spec=specs(max_size=5), seed=st.integers(0, 2**32 - 1), axis=st.sampled_from(["height", "width"]))
def test_one_pixel_high_or_wide_matches_reference(spec, seed, axis):
    # H or W of 1 needs padding (or a kernel of 1) along that axis; give it enough.
    kh, kw = spec.kernel
    (dh, dw), pad = spec.dilation, list(spec.padding)
    if axis == "height":
        need = dh * (kh - 1) - pad[0] - pad[2]
        pad[2] += max(0, need)
    else:
        need = dw * (kw - 1) - pad[1] - pad[3]
        pad[3] += max(0, need)
    spec = dataclasses.replace(spec, padding=tuple(pad), **{axis: 1})
    _check_against_reference(_problem(spec, seed, "continuous"))
