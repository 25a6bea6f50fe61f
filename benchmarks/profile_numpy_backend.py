"""Where the CPU backend spends its time, line by line: ``python -m benchmarks.profile_numpy_backend``.

A deterministic line timer (``sys.settrace``) over the frames of the NumPy backend's modules
(``deformcp/backends/numpy_backend.py``, ``numpy_tiling.py``, ``numpy_grid.py`` and
``numpy_sampling.py``): each line's wall time, *inclusive* of the
functions it calls (NumPy, SciPy, BLAS, and the backend's own helpers, whose lines
are listed too).  Whole-array NumPy operations hold no Python lines of their own,
so a line's time is the time of the operations on it; tracing adds a few
microseconds per line, nothing next to operations of milliseconds.  The backend
runs its tiles on worker threads, which ``sys.settrace`` does not follow, so the
traced calls run with ``DEFORMCP_NUM_THREADS=1`` and BLAS at one thread, as each
worker computes; the header gives the call's time as configured too.  The figures are medians over
``--repeats`` calls after one untimed call.  Notes on what
the profiles showed are in ``benchmarks/NOTES.md``.  Run it from the clone's root
(it imports ``benchmarks.shapes``).
"""

import argparse
import linecache
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import threadpoolctl

import deformcp

from .shapes import SHAPES, TARGET_SHAPES, make_inputs

SERIAL_VARIABLE = "DEFORMCP_NUM_THREADS"


class LineTimer:
    """Wall time per (function, line) of the traced file, summed over the traced calls.

    ``inclusive`` counts everything the line does; ``self`` leaves out the time spent
    in lines of the traced file that it calls (the backend's own helpers), so the
    self times add up to the whole call and show where the time really goes.
    """

    def __init__(self, filenames: frozenset):
        self.filenames = filenames
        self.inclusive = defaultdict(float)
        self.self = defaultdict(float)
        self._line = {}      # frame -> (line, start time, time spent in traced callees so far)
        self._entered = {}   # frame -> time it was entered

    def _close_line(self, frame, now):
        line = self._line.pop(frame, None)
        if line is not None:
            key = (frame.f_code.co_filename, frame.f_code.co_name, line[0])
            self.inclusive[key] += now - line[1]
            self.self[key] += now - line[1] - line[2]

    def _local(self, frame, event, arg):
        now = time.perf_counter()
        self._close_line(frame, now)
        if event == "line":
            self._line[frame] = (frame.f_lineno, time.perf_counter(), 0.0)
        elif event == "return":
            entered = self._entered.pop(frame, now)
            # The nearest traced caller; untraced frames (a decorator's wrapper) may sit between.
            caller = frame.f_back
            while caller is not None and caller not in self._line:
                caller = caller.f_back
            if caller is not None:
                line, start, inner = self._line[caller]
                self._line[caller] = (line, start, inner + (now - entered))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename not in self.filenames:
            return None
        self._entered[frame] = time.perf_counter()
        return self._local

    def run(self, fn):
        sys.settrace(self._global)
        try:
            return fn()
        finally:
            sys.settrace(None)


def _backend_files() -> frozenset:
    """The traced files.  Imported here, not at the top: asv imports every module under
    benchmarks/ when it looks for benchmarks, and its suite must need only deformcp's public API."""
    from deformcp.backends import numpy_backend, numpy_grid, numpy_products, numpy_sampling, numpy_tiling

    return frozenset(str(Path(m.__file__).resolve()) for m in (numpy_backend, numpy_tiling, numpy_grid, numpy_sampling,
                                                                     numpy_products))


def _median_seconds(fn, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    return float(np.median(walls))


def _profile(operation, shape_name: str, repeats: int, top: int) -> None:
    shape = SHAPES[shape_name]
    inputs = make_inputs(shape, seed=0)
    kwargs = shape.kwargs
    if operation == "forward":
        def call():
            return deformcp.deform_conv2d(*inputs.conv_args, **kwargs)
    else:
        def call():
            return deformcp.deform_conv2d_backward(inputs.grad_out, *inputs.conv_args, **kwargs)

    call()
    threaded = _median_seconds(call, repeats)
    # The tiles run on worker threads, which sys.settrace does not follow: trace one thread.
    # With several workers each computes with BLAS at one thread, so the traced thread does too:
    # its lines then cost what they cost a worker (BLAS's own threads can make a product many
    # times slower or faster than that, depending on its shape).
    previous = os.environ.get(SERIAL_VARIABLE)
    os.environ[SERIAL_VARIABLE] = "1"
    try:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            serial = _median_seconds(call, repeats)
            timer = LineTimer(_backend_files())
            traced = _median_seconds(lambda: timer.run(call), repeats)
    finally:
        if previous is None:
            del os.environ[SERIAL_VARIABLE]
        else:
            os.environ[SERIAL_VARIABLE] = previous

    print(f"\n== {operation} {shape_name} ({shape.label}), float32: median {1e3 * threaded:.1f} ms as configured, "
          f"{1e3 * serial:.1f} ms on one thread ({SERIAL_VARIABLE}=1, BLAS at 1), {1e3 * traced:.1f} ms traced ==")
    print(f"{'self ms':>8} {'% call':>7} {'incl ms':>8}  {'function:line':<30} source")
    ranked = sorted(timer.self.items(), key=lambda item: -item[1])[:top]
    for key, total in ranked:
        filename, function, line = key
        per_call = total / repeats
        source = linecache.getline(filename, line).strip()
        print(f"{1e3 * per_call:8.1f} {100 * per_call / traced:6.1f}% {1e3 * timer.inclusive[key] / repeats:8.1f}  "
              f"{f'{function}:{line}':<30} {source[:100]}")
    by_function = defaultdict(float)
    for (_, function, _), total in timer.self.items():
        by_function[function] += total / repeats
    print("self ms by function: " + ", ".join(
        f"{function} {1e3 * total:.1f}" for function, total in sorted(by_function.items(), key=lambda i: -i[1])
        if total >= 0.0005))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(TARGET_SHAPES), choices=list(SHAPES))
    parser.add_argument("--operations", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="lines shown per profile")
    args = parser.parse_args(argv)
    for shape_name in args.shapes:
        for operation in args.operations:
            _profile(operation, shape_name, args.repeats, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
