"""Running a PyTorch deformable convolution for the comparison: inputs as tensors, gradients by autograd.

Shared by the two PyTorch peers (:mod:`.grid_sample_peer`, :mod:`.torchvision_peer`).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..shapes import Inputs
from .machine import cpu_threads
from .runner import FORWARD, Runner

__all__ = ["torch_missing", "torch_runner"]


def torch_missing(device: str, extra: tuple = ()) -> Optional[str]:
    """Why PyTorch (and the modules named in ``extra``) cannot run on ``device``, or ``None``."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    for name in extra:
        try:
            __import__(name)
        except ImportError:
            return f"{name} is not installed"
    if device == "gpu" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


def torch_runner(task: str, inputs: Inputs, device: str, conv: Callable, library: str) -> Runner:
    """A runner for ``conv(x, offset, mask, weight, bias)`` on torch tensors.

    For the forward it runs under ``torch.no_grad()``; for training it runs the forward
    with all five inputs requiring gradients and ``backward(grad_out)``, as a training
    step does, clearing the gradients before each run.
    """
    import torch

    where = "cuda" if device == "gpu" else "cpu"
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
        settings = f"{library}, torch {torch.__version__} CPU, torch.get_num_threads()={torch.get_num_threads()}"
        synchronize = None
    else:
        settings = f"{library}, torch {torch.__version__} on {torch.cuda.get_device_name()}"
        synchronize = torch.cuda.synchronize
    tensors = [torch.from_numpy(a).to(where) for a in inputs.conv_args]
    grad_out = torch.from_numpy(inputs.grad_out).to(where)

    if task == FORWARD:
        def call():
            with torch.no_grad():
                return (conv(*tensors),)
    else:
        leaves = [t.clone().requires_grad_(True) for t in tensors]

        def call():
            for leaf in leaves:
                leaf.grad = None
            out = conv(*leaves)
            out.backward(grad_out)
            return (out.detach(), *(leaf.grad for leaf in leaves))

    def fetch(outputs):
        return tuple(t.detach().cpu().numpy() for t in outputs)

    runner = Runner(call, fetch, settings)
    if synchronize is not None:
        runner.synchronize = synchronize
    return runner
