"""NaN and +-Inf in each input of the backward, and where torchvision's arithmetic sends them.

deformcp.testing's loop oracle groups its products as torchvision's CPU kernel does
((mask * coordinate weight) * grad for the offset, grad * value for the mask, the corners of
non-zero weight only for x, mask * value for the columns), so on finite positions it says
exactly where NaN and +-Inf land.  Shared by the CPU tests (test_nonfinite.py) and the
kernel-emulation tests.  Offsets are left out: torchvision's CPU kernel converts a
non-finite position to an integer (undefined behaviour, a crash in practice), so deformcp
keeps its own documented rule for them, tested in test_nonfinite.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from deformcp import testing
from problems import Problem, Spec, make_problem

CASES = [pytest.param(name, value, offset_kind, id=f"{name}-{label}-{offset_kind}")
         for name in ("grad_out", "x", "mask", "weight", "bias")
         for label, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf))
         for offset_kind in ("zero", "half", "continuous")]
_CLASS_NAMES = ("finite", "NaN", "+Inf", "-Inf")


def poisoned_problem(spec: Spec, name: str, value: float, offset_kind: str, rng: np.random.Generator) -> Problem:
    """A float64 problem with ``value`` (times a random sign) in two random entries of input ``name``.

    ``offset_kind``: "zero" (integer positions; the first row and column sample the -1 lines),
    "half" (half-integers and integers) or "continuous" (a wide spread: some samples outside).
    """
    problem = make_problem(spec, rng, offset_spread=4.0 if offset_kind == "continuous" else 2.0)
    if offset_kind == "zero":
        problem.offset = np.zeros_like(problem.offset)
    elif offset_kind == "half":
        problem.offset = np.round(problem.offset * 2) / 2
    array = getattr(problem, name)
    # Two entries, so that an Inf can meet an Inf of the same or the other sign.
    for _ in range(2):
        array[tuple(rng.integers(0, n) for n in array.shape)] = value * rng.choice([1, -1])
    return problem


def oracle_outputs(problem: Problem) -> dict:
    """``forward`` and the gradients by input name, from the loop oracle."""
    kwargs = problem.spec.kwargs
    return dict(forward=testing.loop_deform_conv2d(*problem.inputs, **kwargs),
                **testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **kwargs))


def _classes(array) -> np.ndarray:
    """Each entry as 0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    array = np.asarray(array, np.float64)
    return np.select([np.isnan(array), np.isposinf(array), np.isneginf(array)], [1, 2, 3], 0)


def assert_same_patterns(actual: dict, expected: dict, what: str) -> None:
    """Every output of ``expected`` is NaN, +Inf and -Inf exactly where ``actual``'s is.

    Also asserts that the non-finite input reached some output: a case where it reaches
    nothing would prove nothing.
    """
    reached = False
    for output, want in expected.items():
        if want is None:
            assert actual[output] is None, f"{output}: expected no gradient"
            continue
        got, want_classes = _classes(actual[output]), _classes(want)
        wrong = np.argwhere(got != want_classes)
        assert wrong.size == 0, (f"{output} ({what}): {len(wrong)} entries differ; first {tuple(wrong[0])}: "
                                 f"{_CLASS_NAMES[got[tuple(wrong[0])]]}, expected "
                                 f"{_CLASS_NAMES[want_classes[tuple(wrong[0])]]}")
        reached |= bool(want_classes.any())
    assert reached, f"{what}: the non-finite input reaches no output, so the case proves nothing"
