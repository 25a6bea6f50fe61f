"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

from deformcp import workspace

# JAX takes 75% of a GPU's memory when its backend starts, which starves CuPy and PyTorch in
# the same test process; set before any test module imports JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible from run to run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def cuda_emulated():
    """The CuPy backend with CuPy and cuBLAS played by tests/emulation, its kernels run on the CPU.

    Skipped, saying why, without a C++ compiler to build the kernel emulation.
    """
    from emulation import build, fake_cupy

    if build.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): the kernel emulation cannot be built")
    with fake_cupy.installed() as backend:
        yield backend


@pytest.fixture(autouse=True)
def _restore_workspace_limit():
    """A test that changes the workspace limit (or fails half-way) must not change it for the next.

    The setting itself is restored, not its value: where none was set, the GPU's device-sized
    default must apply again (deformcp.workspace.device_workspace_limit).
    """
    saved = workspace._limit
    yield
    workspace._limit = saved


@pytest.fixture(autouse=True)
def _jax_on_the_cpu(request):
    """Tests not marked ``gpu`` compute on the CPU, also where JAX's default backend is a GPU."""
    jax = sys.modules.get("jax")
    if jax is None or request.node.get_closest_marker("gpu") is not None:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield
