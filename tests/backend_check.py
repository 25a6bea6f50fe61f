"""Running one backend module directly on a problem, and comparing it with the NumPy twin.

Shared by the emulated-kernel tests (the CuPy backend on the CPU emulation) and the GPU
tests (the CuPy backend on a device): both call a backend's ``im2col``, ``forward`` and
``backward`` on a :class:`~problems.Problem` and compare every output with
``deformcp.backends.numpy_backend`` in float64 on the exactly widened inputs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from deformcp.api import INPUT_NAMES
from deformcp.backends import numpy_backend
from deformcp.dtypes import compute_dtype
from deformcp.testing import assert_within_tolerance
from problems import Problem

ALL = frozenset(INPUT_NAMES)


def backend_outputs(backend, problem: Problem, to_device: Callable, to_host: Callable, wrt=ALL,
                    **backward_options) -> dict:
    """``im2col``, ``forward`` and ``grad_<name>`` for each gradient in ``wrt``, as NumPy arrays.

    As :func:`deformcp.deform_conv2d_backward` does, no gradient is asked for an absent mask or bias.
    ``backward_options`` (``deterministic``, ``allow_tf32``) go to the backend's ``backward``.
    """
    geom = problem.spec.geometry
    cdt = compute_dtype(problem.x.dtype)
    wrt = frozenset(wrt) - {name for name in ("mask", "bias") if getattr(problem, name) is None}
    x, offset, mask, weight, bias = (None if a is None else to_device(a) for a in problem.inputs)
    results = {
        "im2col": backend.im2col(geom, cdt, x, offset, mask),
        "forward": backend.forward(geom, cdt, x, offset, mask, weight, bias),
    }
    grads = backend.backward(geom, cdt, to_device(problem.grad_out), x, offset, mask, weight, wrt, **backward_options)
    results.update({f"grad_{name}": value for name, value in grads.items()})
    return {name: to_host(value) for name, value in results.items()}


def numpy_twin_outputs(problem: Problem, wrt=ALL) -> dict:
    """The same outputs from the NumPy backend in float64, on the inputs widened exactly."""
    wide = problem.astype(np.float64)
    return backend_outputs(numpy_backend, wide, lambda a: a, np.asarray, wrt)


def expected_keys(problem: Problem) -> set:
    """The outputs :func:`backend_outputs` returns for all gradients (none for an absent mask or bias)."""
    keys = {"im2col", "forward", "grad_x", "grad_offset", "grad_weight"}
    keys.update(f"grad_{name}" for name in ("mask", "bias") if getattr(problem, name) is not None)
    return keys


def assert_outputs_close(actual: dict, expected: dict, dtype) -> None:
    """Same outputs, each of ``dtype``, each within the dtype's relative-error tolerance."""
    assert set(actual) == set(expected)
    dtype = np.dtype(dtype)
    for name in expected:
        assert actual[name].dtype == dtype, f"{name}: dtype {actual[name].dtype}, expected {dtype}"
        assert_within_tolerance(actual[name], expected[name], dtype, name)
