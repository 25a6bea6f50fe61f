"""deformcp itself, on NumPy (CPU) or CuPy (GPU): the reference every other peer is checked against."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from deformcp import deform_conv2d, deform_conv2d_backward

from ..shapes import BenchShape, Inputs
from .machine import blas_libraries, cpu_threads
from .runner import FORWARD, TRAINING, Runner

NAME = "deformcp"
TASKS = (FORWARD, TRAINING)


def _cupy_or_reason():
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy sees no CUDA device"
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return None, f"CuPy sees no CUDA device ({error})"
    return cupy, None


def missing(device: str) -> Optional[str]:
    """Why deformcp cannot run on ``device``, or ``None``."""
    return None if device == "cpu" else _cupy_or_reason()[1]


def prepare(task: str, shape: BenchShape, inputs: Inputs, device: str) -> Runner:
    """deform_conv2d (forward) or deform_conv2d followed by deform_conv2d_backward for all five inputs."""
    if device == "cpu":
        # Load the backend (and SciPy) now, as the other peers load theirs when their model is
        # built, so that the memory measurement of the first call does not count module code.
        import deformcp.backends.numpy_backend  # noqa: F401

        arrays = inputs
        tile_threads = os.environ.get("DEFORMCP_NUM_THREADS") or f"unset (all {cpu_threads()} CPUs)"
        settings = (f"NumPy {np.__version__} on {blas_libraries()} in this process "
                    f"(the backend may hold BLAS lower while its tiles run, see docs/cpu.md); "
                    f"tiles on DEFORMCP_NUM_THREADS={tile_threads}, each tile's sparse products on one")
        fetch = lambda outputs: tuple(np.asarray(a) for a in outputs)  # noqa: E731
        synchronize = None
    else:
        cupy = _cupy_or_reason()[0]
        arrays = Inputs(*(cupy.asarray(getattr(inputs, f)) for f in Inputs.__dataclass_fields__))
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        settings = f"CuPy {cupy.__version__} on {props['name'].decode()}"
        fetch = lambda outputs: tuple(cupy.asnumpy(a) for a in outputs)  # noqa: E731
        synchronize = cupy.cuda.get_current_stream().synchronize
    args, kwargs = arrays.conv_args, shape.kwargs

    if task == FORWARD:
        def call():
            return (deform_conv2d(*args, **kwargs),)
    else:
        def call():
            out = deform_conv2d(*args, **kwargs)
            return (out, *deform_conv2d_backward(arrays.grad_out, *args, **kwargs))

    runner = Runner(call, fetch, settings)
    if synchronize is not None:
        runner.synchronize = synchronize
    return runner
