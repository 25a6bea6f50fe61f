"""PyTorch adapter: ``deformcp::deform_conv2d`` as a custom operator with autograd, and a module.

The forward and the backward are both ``torch.library.custom_op`` operators with
fake (meta) implementations, so they work under autograd, ``torch.compile``
(``fullgraph=True`` included) and ``torch.export``.  Their real implementations
call the plain :mod:`deformcp` API, whose interop layer views the tensors as NumPy
arrays (CPU) or CuPy arrays on PyTorch's current CUDA stream, without copying.

Double backward is not supported: the backward operator has no derivative of its own.

Examples
--------
>>> import torch, deformcp.torch as dt
>>> x = torch.randn(1, 4, 8, 8, requires_grad=True)
>>> offset = torch.randn(1, 18, 8, 8, requires_grad=True)
>>> weight = torch.randn(6, 4, 3, 3, requires_grad=True)
>>> y = dt.deform_conv2d(x, offset, None, weight, padding=1)
>>> y.sum().backward()
>>> x.grad.shape
torch.Size([1, 4, 8, 8])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import api
from .api import INPUT_NAMES
from .geometry import IntPair, Padding, conv_geometry, normalize_pair, normalize_padding

__all__ = ["DeformConv2d", "deform_conv2d"]

def _shape(tensor: Optional[Tensor]):
    return None if tensor is None else tuple(tensor.shape)

def _geometry(x, offset, mask, weight, bias, stride, padding, dilation):
    return conv_geometry(_shape(x), _shape(offset), _shape(mask), _shape(weight), _shape(bias),
                         stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))

@torch.library.custom_op("deformcp::deform_conv2d", mutates_args=())
def _forward_op(x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    # The fake implementations promise contiguous results, whatever layout a backend picks.
    return api.deform_conv2d(x, offset, mask, weight, bias, stride=tuple(stride), padding=tuple(padding),
                             dilation=tuple(dilation)).contiguous()

@_forward_op.register_fake
def _forward_fake(x, offset, mask, weight, bias, stride, padding, dilation):
    geom = _geometry(x, offset, mask, weight, bias, stride, padding, dilation)
    return x.new_empty(geom.out_shape)

@torch.library.custom_op("deformcp::deform_conv2d_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                 bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 wanted: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients; one not in ``wanted`` (or of an absent input) is an empty tensor.

    An operator cannot return None, so empty tensors stand in and the autograd
    formula maps them back to None.
    """
    wrt = [name for name, want in zip(INPUT_NAMES, wanted) if want]
    grads = api.deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, stride=tuple(stride),
                                       padding=tuple(padding), dilation=tuple(dilation), wrt=wrt)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)

@_backward_op.register_fake
def _backward_fake(grad_out, x, offset, mask, weight, bias, stride, padding, dilation, wanted):
    _geometry(x, offset, mask, weight, bias, stride, padding, dilation)
    inputs = (x, offset, mask, weight, bias)
    return tuple(t.new_empty(t.shape) if want and t is not None else x.new_empty(0)
                 for t, want in zip(inputs, wanted))

def _setup_context(ctx, inputs, output):
    x, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, offset, mask, weight, bias)
    ctx.conv_args = (stride, padding, dilation)

def _backward(ctx, grad):
    x, offset, mask, weight, bias = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:5])
    grads = _backward_op(grad, x, offset, mask, weight, bias, *ctx.conv_args, wanted)
    return tuple(g if want else None for g, want in zip(grads, wanted)) + (None, None, None)

_forward_op.register_autograd(_backward, setup_context=_setup_context)

def deform_conv2d(x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                  *, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> Tensor:
    """Deformable 2-D convolution on tensors, differentiable and ``torch.compile``-able.

    The operator ``torch.ops.deformcp.deform_conv2d``; its gradient is the operator
    ``torch.ops.deformcp.deform_conv2d_backward``, which computes only the gradients
    autograd asks for.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W)
    offset : Tensor, shape (B, 2*G*kh*kw, H_out, W_out)
    mask : Tensor, shape (B, G*kh*kw, H_out, W_out), or None
        None means DCNv1 (a mask of ones).
    weight : Tensor, shape (C_out, C/groups, kh, kw)
    bias : Tensor, shape (C_out,), optional
    stride, padding, dilation
        As for :func:`deformcp.deform_conv2d`; padding may be ``(top, left, bottom, right)``.

    Returns
    -------
    Tensor, shape (B, C_out, H_out, W_out)
        On ``x``'s device, of its dtype.

    Raises
    ------
    ValueError, TypeError
        As :func:`deformcp.deform_conv2d`, naming the argument.

    Notes
    -----
    Unlike ``torchvision.ops.deform_conv2d``, the mask is the third positional
    argument, as everywhere in deformcp.  Double backward is not supported.
    """
    return torch.ops.deformcp.deform_conv2d(x, offset, mask, weight, bias, list(normalize_pair(stride, "stride")),
                                            list(normalize_padding(padding)),
                                            list(normalize_pair(dilation, "dilation")))

class DeformConv2d(nn.Module):
    """Deformable convolution layer that predicts its own offsets (and mask), as in DCNv2.

    A plain ``nn.Conv2d`` with the layer's kernel size, stride, padding and dilation
    (``offset_predictor``) reads ``x`` and predicts ``2*G*kh*kw`` offset channels,
    followed, when ``modulated``, by ``G*kh*kw`` mask logits.  The predictor starts at
    zero (weight and bias), so a fresh layer is exactly an ordinary convolution:
    the offsets are 0 and the mask is ``2 * sigmoid(logits) = 1``.  The mask
    therefore lies in ``(0, 2)`` rather than DCNv2's ``(0, 1)``; the factor 2 only
    rescales what the predictor learns.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int) or (int, int, int, int)
        As for :func:`deformcp.deform_conv2d`.
    groups : int
        Convolution groups; must divide both channel counts.
    offset_groups : int
        Offset groups ``G``; must divide ``in_channels``.
    bias : bool
        Whether the convolution has a bias.
    modulated : bool
        DCNv2 (a predicted mask) when True, DCNv1 when False.

    Attributes
    ----------
    weight : Parameter, shape (out_channels, in_channels/groups, kh, kw)
        Initialised as ``nn.Conv2d`` initialises its weight.
    bias : Parameter, shape (out_channels,), or None
    offset_predictor : nn.Conv2d
        Predicts offsets and mask logits; zero-initialised.

    Examples
    --------
    >>> import torch, deformcp.torch as dt
    >>> layer = dt.DeformConv2d(4, 8, 3, padding=1)
    >>> layer(torch.randn(2, 4, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, modulated: bool = True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                            ("offset_groups", offset_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) "
                             f"and out_channels ({out_channels})")
        if in_channels % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must divide in_channels ({in_channels})")
        kh, kw = normalize_pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride = normalize_pair(stride, "stride")
        self.padding = normalize_padding(padding)
        self.dilation = normalize_pair(dilation, "dilation")
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        top, left, bottom, right = self.padding
        # nn.Conv2d pads symmetrically only; asymmetric padding is applied by F.pad in forward.
        self._symmetric = (top, left) == (bottom, right)
        points = offset_groups * kh * kw
        self.offset_predictor = nn.Conv2d(in_channels, (3 if modulated else 2) * points, (kh, kw),
                                          stride=self.stride, padding=(top, left) if self._symmetric else 0,
                                          dilation=self.dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation for the weight and bias; zeros for the offset predictor."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def predict(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The offsets and (when ``modulated``) the mask the layer would use for ``x``."""
        if not self._symmetric:
            top, left, bottom, right = self.padding
            x = F.pad(x, (left, right, top, bottom))
        predicted = self.offset_predictor(x)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset = predicted[:, :n_offset]
        mask = 2 * torch.sigmoid(predicted[:, n_offset:]) if self.modulated else None
        return offset, mask

    def forward(self, x: Tensor, offset: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Deformable convolution of ``x``.

        Parameters
        ----------
        x : Tensor, shape (B, in_channels, H, W)
        offset : Tensor, optional
            Offsets from outside (as ``torchvision.ops.DeformConv2d`` takes them);
            predicted from ``x`` when None.
        mask : Tensor, optional
            A mask from outside; when None, a ``modulated`` layer predicts it and an
            unmodulated one uses none (DCNv1).

        Returns
        -------
        Tensor, shape (B, out_channels, H_out, W_out)
        """
        predict_mask = mask is None and self.modulated
        if offset is None or predict_mask:
            predicted_offset, predicted_mask = self.predict(x)
            offset = predicted_offset if offset is None else offset
            mask = predicted_mask if predict_mask else mask
        return deform_conv2d(x, offset, mask, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"offset_groups={self.offset_groups}, bias={self.bias is not None}, modulated={self.modulated}")
