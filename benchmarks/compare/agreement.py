"""Whether a peer's results agree with deformcp's: relative error per output, against a tolerance.

Both sides compute in float32, in different orders, so they differ by rounding:
about ``1e-6`` relative for sums of a few thousand terms.  The tolerances leave a
wide margin over that and none for a semantic difference (a wrong offset layout,
padding order or border rule gives errors of ``1e-2`` and more).  The offset
gradient of the grid_sample version gets a looser bound, for the reason given in
:mod:`.grid_sample_peer` and ``docs/benchmarks.md``.  NaN never agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from .runner import OUTPUT_NAMES

__all__ = ["Agreement", "DEFAULT_TOLERANCE", "compare_outputs", "relative_error"]

DEFAULT_TOLERANCE = 1e-4
# Positions normalised by grid_sample shift by ~1e-7 * size pixels and can change cell.
GRID_SAMPLE_OFFSET_TOLERANCE = 1e-2
_TOLERANCE_OVERRIDES = {("grid_sample", "grad_offset"): GRID_SAMPLE_OFFSET_TOLERANCE}


@dataclass(frozen=True)
class Agreement:
    """One output of one peer against deformcp's."""

    output: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """Whether the error is within the tolerance (never for NaN or a shape mismatch)."""
        return self.error <= self.tolerance


def relative_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64; inf on a shape mismatch or any NaN."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape or np.isnan(actual).any() or np.isnan(expected).any():
        return float("inf")
    scale = np.linalg.norm(expected)
    difference = np.linalg.norm(actual - expected)
    return float(difference / scale) if scale > 0 else float(difference)


def compare_outputs(peer: str, task: str, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE) -> List[Agreement]:
    """The agreement of each of ``outputs`` with ``reference`` (deformcp's), in the task's output order."""
    names = OUTPUT_NAMES[task]
    if len(outputs) != len(names):
        raise ValueError(f"{peer} returned {len(outputs)} outputs for {task}; expected {len(names)}: {names}")
    return [Agreement(name, relative_error(got, want),
                      max(tolerance, _TOLERANCE_OVERRIDES.get((peer, name), tolerance)))
            for name, got, want in zip(names, outputs, reference)]
