"""What a peer hands the comparison: a prepared, timeable call, and how to read its results.

A peer module turns a shape and its inputs into a :class:`Runner` once (building
and compiling models, moving inputs to the device: none of it timed); the
comparison then calls it many times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Tuple

import numpy as np

__all__ = ["FORWARD", "TRAINING", "TASKS", "OUTPUT_NAMES", "PeerUnavailable", "Runner"]

FORWARD = "forward"
TRAINING = "training"
TASKS = (FORWARD, TRAINING)

# What each task returns, in order: the forward its output; training (forward, then the
# gradients of all five inputs) the output and the gradients.
OUTPUT_NAMES = {
    FORWARD: ("out",),
    TRAINING: ("out", "grad_x", "grad_offset", "grad_mask", "grad_weight", "grad_bias"),
}


class PeerUnavailable(Exception):
    """A peer cannot run this case: its library is absent, there is no GPU, or the geometry is unsupported.

    The message says which, and is printed in the table in place of a time.
    """


def _nothing() -> None:
    return None


@dataclass
class Runner:
    """One implementation, prepared for one case.

    Attributes
    ----------
    call : callable
        The work to time; returns the outputs (possibly on a device) in the order of
        :data:`OUTPUT_NAMES`.
    fetch : callable
        Turns what ``call`` returned into a tuple of NumPy arrays; not timed.
    settings : str
        How the peer was configured (threads, provider, precision), for the output.
    synchronize : callable
        Waits for queued device work; a timing ends only after it returns.
    """

    call: Callable[[], Any]
    fetch: Callable[[Any], Tuple[np.ndarray, ...]]
    settings: str
    synchronize: Callable[[], None] = _nothing

    def __call__(self) -> Any:
        """Run once and wait for the device; return the raw outputs."""
        result = self.call()
        self.synchronize()
        return result
