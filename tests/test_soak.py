"""A soak test: thousands of mixed calls from several threads while the workspace limit changes.

What a long training run or a server does to the library: many shapes, both passes, several
callers at once, and a limit that moves under them.  Every result must stay right (against a
float64 computation of the same inputs, made once per problem) and the process's resident
memory must stay flat once the first calls have warmed its allocators and caches.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import deformcp
from deformcp.testing import TOLERANCE, relative_error
from problems import Spec, make_problem, run_backward, run_forward

SPECS = (
    Spec(batch=2, in_channels=4, out_channels=6, height=9, width=7, groups=2, offset_groups=2),
    Spec(batch=1, in_channels=3, out_channels=4, height=12, width=10, mask=False),
    Spec(batch=3, in_channels=2, out_channels=2, height=6, width=5, stride=(2, 1), dilation=(1, 2),
         padding=(0, 2, 1, 1), kernel=(3, 2), bias=False),
    Spec(batch=4, in_channels=8, out_channels=8, height=8, width=8, groups=8, offset_groups=4),
)
LIMITS = (16 << 10, 256 << 10, 4 << 20, 256 << 20)
CALLERS = 4
CALLS_PER_CALLER = 500


def _resident_bytes() -> int:
    """The process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _jobs(rng) -> list:
    """(problem, expected outputs in float64) for each spec, in float32 and float64."""
    jobs = []
    for spec in SPECS:
        for dtype in (np.float32, np.float64):
            problem = make_problem(spec, rng, dtype)
            wide = problem.astype(np.float64)
            expected = {"out": run_forward(wide), **{k: v for k, v in run_backward(wide).items() if v is not None}}
            jobs.append((problem, expected))
    return jobs


def _check(problem, expected: dict, backward: bool) -> None:
    if backward:
        result = {k: v for k, v in run_backward(problem).items() if v is not None}
    else:
        result = {"out": run_forward(problem)}
    tolerance = 10 * TOLERANCE[problem.x.dtype.name]
    for name, value in result.items():
        error = relative_error(value, expected[name])
        assert error <= tolerance, f"{name}: relative error {error:.3g} on {problem.spec}"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc: Linux only")
def test_soak_mixed_calls_from_threads_with_a_changing_limit(rng):
    jobs = _jobs(rng)
    picks = rng.integers(0, 2 * len(jobs), size=(CALLERS, CALLS_PER_CALLER))
    errors: list = []
    done = threading.Event()

    def caller(row: np.ndarray) -> None:
        try:
            for pick in row:
                problem, expected = jobs[pick % len(jobs)]
                _check(problem, expected, backward=bool(pick >= len(jobs)))
        except BaseException as error:  # reported below, with the thread's traceback
            errors.append(error)

    def mover() -> None:
        i = 0
        while not done.is_set():
            deformcp.set_workspace_limit(LIMITS[i % len(LIMITS)])
            i += 1
            time.sleep(0.002)

    # Warm-up: every job once, so that allocators, pools and caches reach their steady size.
    for problem, expected in jobs:
        _check(problem, expected, backward=False)
        _check(problem, expected, backward=True)
    before = _resident_bytes()
    threads = [threading.Thread(target=caller, args=(row,)) for row in picks]
    moving = threading.Thread(target=mover)
    moving.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    done.set()
    moving.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    if errors:
        raise errors[0]
    growth = _resident_bytes() - before
    # Flat: 2-3 MiB of growth was measured here (allocator arenas of the new threads); leaking
    # one output of the largest problem per call (16 KiB) would be 32 MiB.
    assert growth < 12 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB over {CALLERS * CALLS_PER_CALLER} calls"
