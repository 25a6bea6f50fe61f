"""The CPU speed targets of deformcp, stated once, and whether a measured case meets them.

Ratios are deformcp's median time over the peer's: below 1, deformcp is faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..shapes import TARGET_SHAPES
from .runner import FORWARD, TRAINING

__all__ = ["Target", "TARGETS", "evaluate_target"]


@dataclass(frozen=True)
class Target:
    """deformcp's time on ``task`` for ``shapes`` must be at most ``limit`` times the fastest of ``against``."""

    task: str
    shapes: Tuple[str, ...]
    against: Tuple[str, ...]
    limit: float
    description: str


TARGETS = (
    Target(FORWARD, TARGET_SHAPES, ("onnxruntime", "openvino"), 2.0,
           "CPU float32 forward at most 2.0x the faster of ONNX Runtime and OpenVINO"),
    Target(TRAINING, TARGET_SHAPES, ("grid_sample",), 0.5,
           "CPU float32 forward+backward at most 0.5x the grid_sample version"),
)


def evaluate_target(task: str, shape_name: str, medians: Dict[str, float], device: str) -> Optional[dict]:
    """Whether the case meets its target; ``None`` if no target covers it or no peer of the target ran.

    Parameters
    ----------
    medians : dict
        Median seconds by peer name; must include ``"deformcp"``.
    """
    if device != "cpu":
        return None
    for target in TARGETS:
        if target.task != task or shape_name not in target.shapes:
            continue
        ran = {peer: medians[peer] for peer in target.against if peer in medians}
        if not ran:
            return None
        fastest = min(ran, key=ran.get)
        ratio = medians["deformcp"] / ran[fastest]
        return {"description": target.description, "against": fastest, "ratio": ratio,
                "limit": target.limit, "met": ratio <= target.limit}
    return None
