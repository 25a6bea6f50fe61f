"""The pure-PyTorch deformable convolution people write without a compiled operator.

Bilinear sampling through ``torch.nn.functional.grid_sample`` (``align_corners=True``,
zero padding: the same forward semantics as ours, since a corner outside the image
reads zero), then the mask, then one matrix product per group; gradients by
autograd.  This is the training baseline: deformcp's forward and backward are
compared with its forward and backward.

``grid_sample`` takes positions normalised to ``[-1, 1]``; with ``align_corners=True``
``-1`` and ``1`` are the centres of the first and last pixel, so a position ``p`` maps
to ``2 p / (size - 1) - 1``.  That is undefined for an image of height or width 1,
which this peer therefore refuses.  In float32 the round trip moves a position by
about ``1e-7 * size`` pixels, so a sample lying that close to a pixel line can fall
in the neighbouring cell, whose offset gradient differs: see ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Optional

from ..shapes import BenchShape, Inputs
from .runner import FORWARD, TRAINING, PeerUnavailable, Runner
from .torch_autograd import torch_missing, torch_runner

NAME = "grid_sample"
TASKS = (FORWARD, TRAINING)


def missing(device: str) -> Optional[str]:
    """Why this peer cannot run on ``device``, or ``None``."""
    return torch_missing(device)


def grid_sample_deform_conv(shape: BenchShape):
    """``conv(x, offset, mask, weight, bias)`` for ``shape``, written with grid_sample."""
    import torch
    import torch.nn.functional as F

    kh, kw = shape.kernel
    k, g, groups = kh * kw, shape.offset_groups, shape.groups
    oh, ow = shape.out_size
    height, width = shape.height, shape.width
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    top, left = shape.padding[:2]

    def conv(x, offset, mask, weight, bias):
        batch, channels = x.shape[:2]
        # Undeformed sampling positions of kernel point k = i*kw + j: (K, H_out, 1) and (K, 1, W_out).
        ki = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw)
        kj = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh)
        out_y = torch.arange(oh, device=x.device, dtype=x.dtype) * stride_h - top
        out_x = torch.arange(ow, device=x.device, dtype=x.dtype) * stride_w - left
        base_y = (ki * dil_h)[:, None, None] + out_y[None, :, None]
        base_x = (kj * dil_w)[:, None, None] + out_x[None, None, :]
        pair = offset.view(batch, g, k, 2, oh, ow)
        py = pair[:, :, :, 0] + base_y
        px = pair[:, :, :, 1] + base_x
        grid = torch.stack((px * (2.0 / (width - 1)) - 1.0, py * (2.0 / (height - 1)) - 1.0), dim=-1)
        sampled = F.grid_sample(x.reshape(batch * g, channels // g, height, width),
                                grid.view(batch * g, k * oh, ow, 2),
                                mode="bilinear", padding_mode="zeros", align_corners=True)
        # (B*G, C/G, K*H_out, W_out) -> (B, G, C/G, K, L), times the mask of each group's points.
        sampled = sampled.view(batch, g, channels // g, k, oh * ow) * mask.view(batch, g, 1, k, oh * ow)
        # Channels then kernel points: the order of weight.view(C_out, C/groups * K).
        columns = sampled.view(batch, groups, (channels // groups) * k, oh * ow)
        out = torch.matmul(weight.view(groups, -1, (channels // groups) * k), columns)
        return out.view(batch, -1, oh, ow) + bias.view(1, -1, 1, 1)

    return conv


def prepare(task: str, shape: BenchShape, inputs: Inputs, device: str) -> Runner:
    """The grid_sample version on PyTorch tensors of the inputs; training by autograd."""
    if shape.height < 2 or shape.width < 2:
        raise PeerUnavailable("grid_sample with align_corners=True cannot address an image of height or width 1")
    return torch_runner(task, inputs, device, grid_sample_deform_conv(shape), "grid_sample (align_corners=True)")
