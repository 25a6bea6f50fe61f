"""deformcp.jax and deformcp.flax with the batch split over two devices.

Each check of ``tests/jax_two_devices.py`` runs in a process of its own, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (XLA makes its host devices when
JAX starts, so the flag cannot be set in this process) and on JAX's CPU platform. A
check that hangs (the failure this guards against: a callback waiting on another
device while that device waits in an all-reduce) fails at the timeout instead of
stopping the suite.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

import jax_two_devices

HELPER = pathlib.Path(jax_two_devices.__file__)
CHECKS = sorted(name[len("check_"):] for name in vars(jax_two_devices) if name.startswith("check_"))
# A check takes seconds; the limit is for a hang, with room for a loaded machine.
TIMEOUT_S = 300


def _needs(check: str):
    if "flax" in check and importlib.util.find_spec("flax") is None:
        return [pytest.mark.skip(reason="flax is not installed (pip install 'deformcp[flax]')")]
    return []


@pytest.mark.parametrize("check", [pytest.param(c, id=c, marks=_needs(c)) for c in CHECKS])
def test_on_two_devices(check, rng):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip())
    seed = str(int(rng.integers(2**31)))
    try:
        done = subprocess.run([sys.executable, str(HELPER), check, seed], env=env, cwd=HELPER.parent,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{check} did not finish in {TIMEOUT_S} s (a hang); its output:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"{check} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-6000:]}"
    assert f"{check}: passed" in done.stdout
