"""The threads the CPU backend computes on: its tile workers, BLAS's, and their NumPy error state.

One call of the CPU backend runs its tiles on a shared pool of worker threads
(:func:`tile_workers`), as many as ``DEFORMCP_NUM_THREADS`` says, else one per CPU
this process may use.  SciPy's sparse kernels, BLAS and NumPy's large element-wise
loops release the GIL, so the tiles run in parallel.

**BLAS held to one thread.** Each tile's matrix products call BLAS, whose own pool
on top of the tile threads would oversubscribe the cores (``benchmarks/NOTES.md``).
While any call runs tiles on several workers, BLAS is held to one thread; the limit
is shared by all the calls in flight and counted, so the first call sets it and the
last one to finish restores what the process had before, whatever the interleaving.
BLAS's thread count can change a product's last bits (OpenBLAS takes another path
for small products on one thread), so every call with several workers computes with
BLAS at one thread, even a call with a single tile: a call gives the same bits
alone or beside others.  With one worker a call runs on the calling thread and BLAS
keeps its threads.

**Fork.** A child made with ``fork`` inherits the pool object but none of its
threads, and inherits any limit that calls in flight in the parent held.  The child
starts with no pool (the next call makes one) and with BLAS's thread count restored
to what it was outside deformcp's calls (``os.register_at_fork``).

**Error state.** Non-finite inputs are defined behaviour (docs/semantics.md), not
numerical accidents: NaN and infinity propagate as torchvision's do, silently,
whatever error state the caller has set.  NumPy's error state belongs to each
thread, so the backend's entry points and every task on a worker run under
:func:`quiet`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Deque, Iterator, Optional, Sequence, TypeVar

import numpy as np
import threadpoolctl

__all__ = ["NUM_THREADS_VARIABLE", "TileWorkers", "quiet", "tile_workers", "worker_count"]

NUM_THREADS_VARIABLE = "DEFORMCP_NUM_THREADS"

T = TypeVar("T")
R = TypeVar("R")


def worker_count() -> int:
    """Threads the CPU backend runs tiles on: ``DEFORMCP_NUM_THREADS``, else the CPUs this process may use.

    Raises
    ------
    ValueError
        If ``DEFORMCP_NUM_THREADS`` is set to anything but a positive integer.
    """
    env = os.environ.get(NUM_THREADS_VARIABLE)
    if env:
        try:
            count = int(env, 10)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{NUM_THREADS_VARIABLE} must be a positive integer (the CPU backend's worker "
                             f"threads), got {env!r}")
        return count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def quiet(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` under a NumPy error state that neither warns nor raises on floating-point conditions."""
    @functools.wraps(fn)
    def quietly(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return quietly


class TileWorkers:
    """The threads one call runs its tiles on: :attr:`count` of them, through :meth:`map`."""

    def __init__(self, count: int, pool: Optional[ThreadPoolExecutor]):
        self.count = count
        self._pool = pool
        self._in_flight: Deque[Future] = deque()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        """``fn(item)`` for every item on the worker threads, yielded in order.

        At most one item per worker is in flight, which keeps the scratch space under the
        workspace limit; yielding in order lets the caller add up partial results in a fixed
        order, so results do not depend on thread timing.  With one worker, or one item, the
        calling thread runs them.
        """
        fn = quiet(fn)
        if self._pool is None or len(items) == 1:
            yield from map(fn, items)
            return
        in_flight = self._in_flight
        for item in items:
            in_flight.append(self._pool.submit(fn, item))
            if len(in_flight) >= self.count:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def _finish(self) -> None:
        """Wait for whatever a :meth:`map` left running (after an error), so no task outlives the call."""
        for future in self._in_flight:
            future.cancel()
        wait(self._in_flight)
        self._in_flight.clear()


@contextlib.contextmanager
def tile_workers() -> Iterator[TileWorkers]:
    """The worker threads for one call; with more than one, BLAS is held to one thread until the call ends.

    Raises
    ------
    ValueError
        If ``DEFORMCP_NUM_THREADS`` is not a positive integer (before any work).
    """
    count = worker_count()
    if count == 1:
        yield TileWorkers(1, None)
        return
    _blas_limit.hold()
    workers = TileWorkers(count, _shared_pool(count))
    try:
        yield workers
    finally:
        workers._finish()
        _blas_limit.release()


# --- process-bound state: the pool and the BLAS limit, guarded by one lock and reset in a forked child ---

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _shared_pool(count: int) -> ThreadPoolExecutor:
    """The process's worker pool, with at least ``count`` threads."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < count:
            # A smaller pool is dropped, not shut down: a call in flight may still be submitting to it.
            # Its threads end with the process.
            _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="deformcp"), count
        return _pool


@functools.lru_cache(maxsize=None)
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    # Built once: finding the loaded BLAS libraries walks the process's shared objects.
    return threadpoolctl.ThreadpoolController()


def _give_up_blas_control() -> None:
    """Let another thread set OpenBLAS's thread count next.

    threadpoolctl (from 3.6) ignores, silently, a thread that sets OpenBLAS's process-wide
    thread count while another live thread last set it and has not given that up.  The
    limit is set by the first call's thread and restored by the last one's, so whichever
    thread sets it gives it up at once.  Older versions have no such rule.
    """
    give_up = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if give_up is not None:
        give_up()


class _SharedBlasLimit:
    """BLAS at one thread while any holder is in; what it was before once the last has left."""

    def __init__(self):
        self._holders = 0
        self._limiter = None  # threadpoolctl's record of the thread counts before the first holder

    def hold(self) -> None:
        with _lock:
            if self._holders == 0:
                self._limiter = _blas_controller().limit(limits=1, user_api="blas")
                _give_up_blas_control()
            self._holders += 1

    def release(self) -> None:
        with _lock:
            self._holders -= 1
            if self._holders == 0:
                self._restore()

    def _restore(self) -> None:
        self._limiter.restore_original_limits()
        _give_up_blas_control()
        self._limiter, self._holders = None, 0

    def forget_holders(self) -> None:
        """In a forked child: the holders were the parent's calls, none of which runs here."""
        if self._holders:
            self._restore()


_blas_limit = _SharedBlasLimit()


def _after_fork_in_child() -> None:
    global _pool, _pool_size, _lock
    # The parent held _lock across the fork (so no thread was half-way through a change to this
    # state); the child's copy is released by replacing it.
    _lock = threading.Lock()
    # The inherited pool has no threads in the child: work submitted to it would wait forever.
    _pool, _pool_size = None, 0
    _blas_limit.forget_holders()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _lock.acquire(), after_in_parent=lambda: _lock.release(),
                        after_in_child=_after_fork_in_child)
