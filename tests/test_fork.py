"""Child processes: a child made with fork after deformcp has run (the CPU backend's worker pool
then exists in the parent, with no threads in the child), one forked while another thread is in
a call (holding BLAS at one thread), a PyTorch DataLoader whose workers call deformcp, and spawn.

Every wait has a timeout, so that a child that hangs fails the test instead of hanging the run.
"""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import threadpoolctl

import deformcp
from problems import Spec, assert_within_tolerance, loop_backward, loop_forward, make_problem, run_backward, \
    run_forward

# Two images on two workers: two tiles, so the parent's calls start the pool.
SPEC = Spec(batch=2, in_channels=4, out_channels=6, height=9, width=7, groups=2, offset_groups=2)
TIMEOUT_S = 120


def _blas_threads() -> list:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def _results(problem) -> dict:
    """Forward and every gradient of ``problem``."""
    return {"out": run_forward(problem), **{f"grad_{n}": g for n, g in run_backward(problem).items() if g is not None}}


def _child(conn, problem) -> None:
    """In the child: deformcp's results, and BLAS's thread counts before and after the calls."""
    before = _blas_threads()
    results = _results(problem)
    conn.send((results, before, _blas_threads()))
    conn.close()


def _in_child(method: str, problem) -> tuple:
    """Run :func:`_child` in a child process started with ``method``; fail, never hang, if it does not finish."""
    context = multiprocessing.get_context(method)
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, problem))
    child.start()
    send.close()
    try:
        assert receive.poll(TIMEOUT_S), f"the {method} child sent nothing in {TIMEOUT_S} s (hung?)"
        message = receive.recv()
        child.join(TIMEOUT_S)
        assert not child.is_alive(), f"the {method} child did not exit in {TIMEOUT_S} s"
        assert child.exitcode == 0, f"the {method} child exited with {child.exitcode}"
        return message
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def _assert_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert np.array_equal(actual[name], value), f"{name} differs from the parent's"


def _assert_right(results: dict, problem) -> None:
    """The results against the float64 loop oracle."""
    assert_within_tolerance(results["out"], loop_forward(problem), "float64", "out")
    for name, value in loop_backward(problem).items():
        if value is not None:
            assert_within_tolerance(results[f"grad_{name}"], value, "float64", f"grad_{name}")


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_after_use(method, rng, monkeypatch):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    problem = make_problem(SPEC, rng)
    parent = _results(problem)  # the pool and the BLAS limit have been used before the child starts
    _assert_right(parent, problem)
    results, before, after = _in_child(method, problem)
    _assert_identical(results, parent)
    assert after == before, "the child's calls changed its BLAS thread count"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_fork_while_another_thread_is_in_a_call(rng, monkeypatch):
    # The child inherits BLAS held at one thread by a call that does not run there: it must start
    # with the parent's own count, and its calls must neither hang nor leave BLAS changed.
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    problem = make_problem(SPEC, rng)
    parent = _results(problem)
    outside = _blas_threads()
    busy = make_problem(Spec(batch=4, in_channels=16, out_channels=16, height=40, width=40), rng, np.float32)
    stop, calls = threading.Event(), []

    def keep_busy():
        while not stop.is_set():
            calls.append(run_backward(busy))

    caller = threading.Thread(target=keep_busy)
    caller.start()
    try:
        for _ in range(4):
            results, before, after = _in_child("fork", problem)
            _assert_identical(results, parent)
            assert before == outside, "the child inherited BLAS as a call in the parent held it"
            assert after == outside
    finally:
        stop.set()
        caller.join(TIMEOUT_S)
    assert not caller.is_alive()
    assert calls, "the parent's calls did not run"
    assert _blas_threads() == outside


class _ConvolvedImages:
    """A dataset whose items are deformable convolutions of fixed random inputs."""

    def __init__(self, problem, items: int):
        self.problem, self.items = problem, items

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> np.ndarray:
        p = self.problem
        return deformcp.deform_conv2d(p.x * (i + 1), p.offset, p.mask, p.weight, p.bias, **p.spec.kwargs)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_call_deformcp(method, rng, monkeypatch):
    torch = pytest.importorskip("torch")
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "2")
    dataset = _ConvolvedImages(make_problem(SPEC, rng), items=6)
    expected = [dataset[i] for i in range(len(dataset))]  # the parent uses the pool before forking
    # timeout: a worker that hangs raises instead of blocking the test.
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, timeout=TIMEOUT_S,
                                         multiprocessing_context=method)
    batches = [batch.numpy() for batch in loader]
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(expected))
