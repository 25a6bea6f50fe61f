"""Running a GPU-style backend on a random problem and comparing it with the NumPy oracle.

Shared by the emulated-kernel tests (CPU) and the GPU tests: both run the CuPy backend
(on the emulation or on a device) and compare every output with
``deformcp.backends.numpy_backend`` in float64 on the exactly widened inputs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from deformcp.backends import numpy_backend
from deformcp.geometry import ConvGeometry, conv_geometry
from problems import TOLERANCE, Problem, relative_error

GRADIENTS = ("x", "offset", "mask", "weight", "bias")
ALL = frozenset(GRADIENTS)


def geometry(problem: Problem) -> ConvGeometry:
    """The validated geometry of a problem."""
    shape = lambda a: None if a is None else a.shape  # noqa: E731
    return conv_geometry(problem.x.shape, problem.offset.shape, shape(problem.mask), problem.weight.shape,
                         shape(problem.bias), **problem.spec.kwargs)


def outputs(backend, problem: Problem, to_device: Callable, to_host: Callable, wrt=ALL) -> dict:
    """``im2col``, ``forward`` and ``grad_<name>`` for each gradient in ``wrt``, as NumPy arrays.

    As :func:`deformcp.deform_conv2d_backward` does, no gradient is asked for an absent mask or bias.
    """
    geom = geometry(problem)
    wrt = frozenset(wrt) - {name for name in ("mask", "bias") if getattr(problem, name) is None}
    x, offset, mask, weight, bias = (None if a is None else to_device(a) for a in problem.inputs)
    results = {
        "im2col": backend.im2col(geom, x, offset, mask),
        "forward": backend.forward(geom, x, offset, mask, weight, bias),
    }
    grads = backend.backward(geom, to_device(problem.grad_out), x, offset, mask, weight, wrt)
    results.update({f"grad_{name}": value for name, value in grads.items()})
    return {name: to_host(value) for name, value in results.items()}


def reference(problem: Problem, wrt=ALL) -> dict:
    """The same outputs from the NumPy backend in float64, on the inputs widened exactly."""
    wide = problem.astype(np.float64)
    return outputs(numpy_backend, wide, lambda a: a, np.asarray, wrt)


def expected_keys(problem: Problem) -> set:
    """The outputs :func:`outputs` returns for all gradients (none for an absent mask or bias)."""
    keys = {"im2col", "forward", "grad_x", "grad_offset", "grad_weight"}
    keys.update(f"grad_{name}" for name in ("mask", "bias") if getattr(problem, name) is not None)
    return keys


def assert_close(actual: dict, expected: dict, dtype) -> None:
    """Same outputs, each of ``dtype``, each within the dtype's relative-error tolerance."""
    assert set(actual) == set(expected)
    dtype = np.dtype(dtype)
    tolerance = TOLERANCE[dtype.name]
    for name in expected:
        assert actual[name].dtype == dtype, f"{name}: dtype {actual[name].dtype}, expected {dtype}"
        error = relative_error(actual[name], expected[name])
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:g} ({dtype.name})"
