"""Calls from several threads at once share the CPU backend's worker pool and its BLAS limit: each
must get exactly the result it gets alone (no state leaks between calls), and the process's BLAS
thread count must be what it was before once they have finished, whatever the interleaving.
The worker count comes from DEFORMCP_NUM_THREADS, which must be a positive integer."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import threadpoolctl

from deformcp.backends import cpu_threads, numpy_tiling
from problems import Spec, make_problem, run_backward, run_forward, run_im2col

SPECS = {
    "bands": Spec(batch=1, in_channels=3, out_channels=4, height=9, width=7),          # one image: row bands
    "images": Spec(batch=5, in_channels=4, out_channels=6, height=6, width=5, groups=2, offset_groups=2),
    "strided": Spec(batch=2, in_channels=2, out_channels=3, height=11, width=8, stride=(2, 1), dilation=(1, 2),
                    padding=(0, 2, 1, 1), kernel=(3, 2), bias=False),
    "one row": Spec(batch=1, in_channels=2, out_channels=2, height=1, width=6, kernel=(1, 3), padding=(0, 1)),
}
OPERATIONS = {
    "forward": lambda p: {"out": run_forward(p)},
    "backward": lambda p: {n: g for n, g in run_backward(p).items() if g is not None},
    "im2col": lambda p: {"columns": run_im2col(p)},
}
TIMEOUT_S = 120


def _blas_state() -> list:
    """What threadpoolctl reports of every BLAS library loaded: its path and thread count."""
    return [(info["filepath"], info["num_threads"]) for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"]


def _from_a_passing_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a thread that then ends: threadpoolctl (from 3.6) lets only the live
    thread that last set OpenBLAS's thread count set it again, and a thread that has ended holds no claim."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)))
    thread.start()
    thread.join(TIMEOUT_S)
    return result[0]


@pytest.fixture
def blas_at_two_threads():
    """BLAS at two threads for the test, whatever the machine's default, so that a limit of one is seen."""
    limiter = _from_a_passing_thread(threadpoolctl.threadpool_limits, limits=2, user_api="blas")
    yield
    _from_a_passing_thread(limiter.restore_original_limits)


def _jobs(rng) -> list:
    return [(operation, make_problem(spec, rng, dtype=dtype))
            for spec in SPECS.values() for operation in OPERATIONS for dtype in (np.float32, np.float64)]


def _assert_identical(result: dict, expected: dict, job: int) -> None:
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        # Same tiles, sums in tile order and BLAS at the same thread count: the same bits.
        assert np.array_equal(result[name], value), f"job {job}: {name} differs from the serial result"


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_concurrent_calls_equal_serial_ones(threads, rng, monkeypatch, blas_at_two_threads):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    jobs = _jobs(rng)
    before = _blas_state()
    alone = [OPERATIONS[operation](problem) for operation, problem in jobs]
    with ThreadPoolExecutor(max_workers=6) as callers:
        together = list(callers.map(lambda job: OPERATIONS[job[0]](job[1]), jobs * 3))
    for i, result in enumerate(together):
        _assert_identical(result, alone[i % len(jobs)], i % len(jobs))
    assert _blas_state() == before


@pytest.mark.parametrize("threads", ["2", "3"])
def test_threads_times_repeats_leave_blas_as_it_was(threads, rng, monkeypatch, blas_at_two_threads):
    # 8 callers x 5 calls each, released together by a barrier, in three rounds: the calls' BLAS
    # limits overlap in many orders, and after each round BLAS is back where it started.
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    jobs = _jobs(rng)
    alone = [OPERATIONS[operation](problem) for operation, problem in jobs]
    before = _blas_state()
    callers, repeats = 8, 5
    for round_ in range(3):
        start = threading.Barrier(callers)

        def caller(index: int) -> list:
            start.wait(TIMEOUT_S)
            picks = [(index * repeats + r + round_) % len(jobs) for r in range(repeats)]
            return [(j, OPERATIONS[jobs[j][0]](jobs[j][1])) for j in picks]

        with ThreadPoolExecutor(max_workers=callers) as pool:
            results = list(itertools.chain.from_iterable(pool.map(caller, range(callers), timeout=TIMEOUT_S)))
        assert len(results) == callers * repeats
        for j, result in results:
            _assert_identical(result, alone[j], j)
        assert _blas_state() == before, f"round {round_}: BLAS thread counts changed"


def _interleavings():
    """Every order of two threads entering and leaving a call, each entering before it leaves."""
    steps = [("enter", 0), ("leave", 0), ("enter", 1), ("leave", 1)]
    for order in itertools.permutations(steps):
        if all(order.index(("enter", t)) < order.index(("leave", t)) for t in (0, 1)):
            yield order


@pytest.mark.parametrize("order", list(_interleavings()), ids=lambda o: "-".join(f"{s}{t}" for s, t in o))
def test_blas_is_one_thread_while_any_call_runs_and_restored_after(order, monkeypatch, blas_at_two_threads):
    # Two calls on two threads, stepped through each order of entering and leaving.  threadpoolctl
    # lets only the thread that last set OpenBLAS's count set it again; the last call to leave
    # is not always the one that set it.
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    outside = _blas_state()
    assert all(count == 2 for _, count in outside)
    held = [(path, 1) for path, _ in outside]
    go = {step: threading.Event() for step in order}
    done = {step: threading.Event() for step in order}

    def call(thread: int) -> None:
        assert go[("enter", thread)].wait(TIMEOUT_S)
        with cpu_threads.tile_workers():
            done[("enter", thread)].set()
            assert go[("leave", thread)].wait(TIMEOUT_S)
        done[("leave", thread)].set()

    threads = [threading.Thread(target=call, args=(t,)) for t in (0, 1)]
    for thread in threads:
        thread.start()
    inside = set()
    try:
        for step in order:
            go[step].set()
            assert done[step].wait(TIMEOUT_S), f"{step} did not happen"
            (inside.add if step[0] == "enter" else inside.discard)(step[1])
            assert _blas_state() == (held if inside else outside), f"after {step}, calls {sorted(inside)} in"
    finally:
        for event in go.values():
            event.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_error_in_a_tile_leaves_blas_and_the_pool_as_they_were(operation, rng, monkeypatch,
                                                                  blas_at_two_threads):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    problem = make_problem(SPECS["images"], rng)
    expected = OPERATIONS[operation](problem)
    before = _blas_state()
    original = numpy_tiling.sampling_plan
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("planted failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(numpy_tiling, "sampling_plan", failing)
    with pytest.raises(RuntimeError, match="planted failure"):
        OPERATIONS[operation](problem)
    assert _blas_state() == before
    monkeypatch.setattr(numpy_tiling, "sampling_plan", original)
    result = OPERATIONS[operation](problem)
    _assert_identical(result, expected, 0)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5", "1e3"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_num_threads_variable_must_be_a_positive_integer(value, operation, rng, monkeypatch):
    problem = make_problem(SPECS["images"], rng)
    before = _blas_state()
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=rf"DEFORMCP_NUM_THREADS must be a positive integer .*got '{value}'"):
        OPERATIONS[operation](problem)
    assert _blas_state() == before


@pytest.mark.parametrize("value, expected", [("1", 1), ("4", 4), (" 3 ", 3)])
def test_num_threads_variable_sets_the_workers(value, expected, monkeypatch):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", value)
    assert cpu_threads.worker_count() == expected
    with cpu_threads.tile_workers() as workers:
        assert workers.count == expected


def test_without_the_variable_one_worker_per_usable_cpu(monkeypatch):
    monkeypatch.delenv("DEFORMCP_NUM_THREADS", raising=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_threads.worker_count() == usable
