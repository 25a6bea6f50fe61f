"""``torchvision.ops.deform_conv2d`` on a CUDA device, forward and (by autograd) backward.

It is the operator whose semantics deformcp reproduces.  Only its CUDA kernels are
compared: on the CPU the comparison's baselines are the inference runtimes and the
grid_sample version.  torchvision pads symmetrically, so a shape with asymmetric
padding is refused.
"""

from __future__ import annotations

from typing import Optional

from ..shapes import BenchShape, Inputs
from .runner import FORWARD, TRAINING, PeerUnavailable, Runner
from .torch_autograd import torch_missing, torch_runner

NAME = "torchvision"
TASKS = (FORWARD, TRAINING)


def missing(device: str) -> Optional[str]:
    """Why torchvision cannot run on ``device``, or ``None``."""
    if device != "gpu":
        return "compared on a CUDA device only"
    return torch_missing(device, extra=("torchvision",))


def prepare(task: str, shape: BenchShape, inputs: Inputs, device: str) -> Runner:
    """torchvision's operator on CUDA tensors of the inputs."""
    top, left, bottom, right = shape.padding
    if (top, left) != (bottom, right):
        raise PeerUnavailable(f"torchvision pads symmetrically; padding {shape.padding} is not")
    import torchvision
    from torchvision.ops import deform_conv2d

    def conv(x, offset, mask, weight, bias):
        return deform_conv2d(x, offset, weight, bias, stride=shape.stride, padding=(top, left),
                             dilation=shape.dilation, mask=mask)

    return torch_runner(task, inputs, device, conv, f"torchvision {torchvision.__version__}")
