"""Whether a peer's results agree with deformcp's: relative error per output, against a tolerance.

Both sides compute in float32, in different orders, so they differ by rounding:
about ``1e-6`` relative for sums of a few thousand terms.  The tolerances leave a
wide margin over that and none for a semantic difference (a wrong offset layout,
padding order or border rule gives errors of ``1e-2`` and more).  The offset
gradient of the grid_sample version gets a looser bound, for the reason given in
:mod:`.grid_sample_peer` and ``docs/benchmarks.md``.  The relative error is
:func:`deformcp.testing.relative_error`'s, so a NaN or an infinity never agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from deformcp.testing import relative_error

from .runner import OUTPUT_NAMES

__all__ = ["Agreement", "DEFAULT_TOLERANCE", "compare_outputs"]

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
        """Whether the error is within the tolerance (never for a non-finite value or a shape mismatch)."""
        return self.error <= self.tolerance


def compare_outputs(peer: str, task: str, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE) -> List[Agreement]:
    """The agreement of each of ``outputs`` with ``reference`` (deformcp's), in the task's output order."""
    names = OUTPUT_NAMES[task]
    if len(outputs) != len(names):
        raise ValueError(f"{peer} returned {len(outputs)} outputs for {task}; expected {len(names)}: {names}")
    return [Agreement(name, relative_error(got, want),
                      max(tolerance, _TOLERANCE_OVERRIDES.get((peer, name), tolerance)))
            for name, got, want in zip(names, outputs, reference)]
