"""Fixtures shared by the test suite."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import deformcp


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible from run to run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _restore_workspace_limit():
    """A test that changes the workspace limit (or fails half-way) must not change it for the next."""
    limit = deformcp.get_workspace_limit()
    yield
    deformcp.set_workspace_limit(limit)
