"""Timing several runners side by side: warm-up, then interleaved runs, median.

The runners of one case are timed in turns (run 1 of each, then run 2 of each,
...), with the starting runner rotating, so that drift in the machine's speed
(frequency, other load) falls on all of them alike.

Each timed run is preceded by a pause (``settle``) and one untimed run of the
same runner.  The pause lets the previous peer's worker threads stop: they keep
spinning for a while after a call and would slow down whichever peer runs next.
The untimed run then brings the runner back to the state it has in a loop of
calls (its threads awake, its memory mapped), which a pause alone does not
(benchmarks/NOTES.md has the figures).  So every figure is a peer's steady-state
time with the machine to itself.  Garbage
collection is off inside a timed call, as in :mod:`timeit`.  A device runner's
time ends only after it has synchronised.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from .runner import Runner

__all__ = ["Timing", "measure_interleaved"]


@dataclass(frozen=True)
class Timing:
    """The timed runs of one runner, in seconds."""

    samples: List[float]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def quartiles(self) -> tuple:
        """The 25th and 75th percentiles, to show the spread."""
        return float(np.percentile(self.samples, 25)), float(np.percentile(self.samples, 75))

    def as_dict(self) -> dict:
        low, high = self.quartiles
        return {"median_s": self.median, "q1_s": low, "q3_s": high, "samples_s": list(self.samples)}


def _timed(runner: Runner) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        runner()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def measure_interleaved(runners: Dict[str, Runner], warmup: int, repeats: int, settle: float = 0.2,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Warm each runner up ``warmup`` times, then time ``repeats`` runs of each, interleaved.

    Parameters
    ----------
    settle : float
        Seconds to wait before each timed run (and its untimed run), for other
        threads to go idle.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples = {name: [] for name in names}
    for turn in range(repeats):
        if progress is not None:
            progress(f"run {turn + 1}/{repeats}")
        rotation = names[turn % len(names):] + names[:turn % len(names)]
        for name in rotation:
            time.sleep(settle)
            runners[name]()
            samples[name].append(_timed(runners[name]))
    return {name: Timing(samples[name]) for name in names}
