"""The operator ``torch.ops.deformcp.deform_conv2d``, its gradient operator, and the functional form.

Both operators are ``torch.library.custom_op`` operators with fake (meta)
implementations, so they work under autograd, ``torch.compile`` (``fullgraph=True``
included), ``torch.export`` and TorchScript.  Their real implementations call the
plain :mod:`deformcp` API, whose interop layer views the tensors as NumPy arrays
(CPU) or CuPy arrays on PyTorch's current CUDA stream, without copying.

Registered on the forward operator besides autograd:

* an autocast rule for CPU and CUDA: floating inputs (float64 excepted, as in
  PyTorch's own autocast) are cast to the autocast dtype
  (``torch.get_autocast_dtype``), and the operator runs with autocast off;
* a ``torch.func.vmap`` rule that folds the mapped dimension into the batch (or,
  when the weight or bias is mapped, into the channels, as convolution groups), so
  one call does the work of the whole map.

Double backward is not supported: the backward operator has no derivative of its own.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import api
from ..api import INPUT_NAMES
from ..geometry import ConvGeometry, conv_geometry, normalize_pair, normalize_padding
from . import onnx as _onnx

__all__ = ["call_operator", "deform_conv2d"]


def _shape(tensor: Optional[Tensor]):
    return None if tensor is None else tuple(tensor.shape)


def _geometry(x, offset, mask, weight, bias, stride, padding, dilation) -> ConvGeometry:
    return conv_geometry(_shape(x), _shape(offset), _shape(mask), _shape(weight), _shape(bias),
                         stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))


def _output_format(x: Tensor) -> torch.memory_format:
    """``channels_last`` for an input laid out so (and not also plain contiguous), as ``nn.Conv2d`` answers."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _allow_tf32() -> bool:
    """PyTorch's TF32 switch for float32 matrix products, which deformcp's CUDA products follow.

    ``fp32_precision`` (PyTorch 2.9 on) reflects the old ``allow_tf32`` flag, the new setting
    and ``torch.set_float32_matmul_precision("high")``; reading ``allow_tf32`` raises once the
    new setting has been used, so it is read only where ``fp32_precision`` does not exist.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


# ------------------------------------------------------------------------------ the operators


@torch.library.custom_op("deformcp::deform_conv2d", mutates_args=())
def _forward_op(x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    # The fake implementation promises the layout of _output_format, whatever layout a backend picks.
    out = api.deform_conv2d(x, offset, mask, weight, bias, stride=tuple(stride), padding=tuple(padding),
                            dilation=tuple(dilation), allow_tf32=_allow_tf32())
    return out.contiguous(memory_format=_output_format(x))


@_forward_op.register_fake
def _forward_fake(x, offset, mask, weight, bias, stride, padding, dilation):
    geom = _geometry(x, offset, mask, weight, bias, stride, padding, dilation)
    return torch.empty(geom.out_shape, dtype=x.dtype, device=x.device, memory_format=_output_format(x))


@torch.library.custom_op("deformcp::deform_conv2d_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                 bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 wanted: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five gradients; one not in ``wanted`` (or of an absent input) is an empty tensor.

    An operator cannot return None, so empty tensors stand in and the autograd
    formula maps them back to None.
    """
    wrt = [name for name, want in zip(INPUT_NAMES, wanted) if want]
    # torch.use_deterministic_algorithms(True) asks for a bitwise-reproducible grad_x (no atomics on CUDA).
    grads = api.deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, stride=tuple(stride),
                                       padding=tuple(padding), dilation=tuple(dilation), wrt=wrt,
                                       deterministic=torch.are_deterministic_algorithms_enabled(),
                                       allow_tf32=_allow_tf32())
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


# ------------------------------------------------------------------------------------ autocast


def _autocast_rule(device_type: str):
    """The forward operator under ``torch.autocast(device_type)``: inputs in the autocast dtype.

    ``torch.library.register_autocast`` casts to one dtype fixed at registration,
    but autocast's dtype is the caller's choice (float16 or bfloat16 on CUDA), so
    this rule reads it at each call.  The eligible tensors are PyTorch's: floating,
    on ``device_type``, not float64.  The casts are ordinary differentiable ops, so
    the gradients reach the caller's tensors in their own dtypes.
    """
    def rule(x, offset, mask, weight, bias, stride, padding, dilation):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            eligible = (t is not None and t.is_floating_point() and t.device.type == device_type
                        and t.dtype != torch.float64)
            return t.to(dtype) if eligible else t

        with torch.autocast(device_type, enabled=False):
            return _forward_op(cast(x), cast(offset), cast(mask), cast(weight), cast(bias), stride, padding,
                               dilation)
    return rule


for _device_type in ("cpu", "cuda"):
    torch.library.impl("deformcp::deform_conv2d", "Autocast" + _device_type.upper(), _autocast_rule(_device_type))


# ---------------------------------------------------------------------------------------- vmap


def _vmap_rule(info, in_dims, x, offset, mask, weight, bias, stride, padding, dilation):
    """``torch.func.vmap`` over the forward operator as one call of it.

    With a shared weight and bias, the mapped dimension folds into the batch:
    ``(V, B, ...) -> (V*B, ...)``.  With a mapped weight or bias (an ensemble), it
    folds into the channels instead, ``(V, B, C, H, W) -> (B, V*C, H, W)``, and the
    ``V`` weights stack along the output channels: the operator then sees ``V`` times
    the groups and offset groups, so member ``v`` convolves only its own channels
    with its own weight and offsets.  Inputs that are not mapped are broadcast.
    """
    size = info.batch_size
    x_dim, offset_dim, mask_dim, weight_dim, bias_dim = in_dims[:5]

    def leading(t: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
        if t is None:
            return None
        return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)

    if weight_dim is None and bias_dim is None:
        def into_batch(t, dim):
            t = leading(t, dim)
            return None if t is None else t.flatten(0, 1)

        out = _forward_op(into_batch(x, x_dim), into_batch(offset, offset_dim), into_batch(mask, mask_dim),
                          weight, bias, stride, padding, dilation)
        return out.unflatten(0, (size, -1)), 0

    def into_channels(t, dim):
        t = leading(t, dim)
        return None if t is None else t.transpose(0, 1).flatten(1, 2)

    def stacked(t, dim):
        t = leading(t, dim)
        return None if t is None else t.flatten(0, 1)

    out = _forward_op(into_channels(x, x_dim), into_channels(offset, offset_dim), into_channels(mask, mask_dim),
                      stacked(weight, weight_dim), stacked(bias, bias_dim), stride, padding, dilation)
    return out.unflatten(1, (size, -1)), 1


_forward_op.register_vmap(_vmap_rule)


# ---------------------------------------------------------------------------- the public call


def call_operator(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                  stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    """The one path of the functional form and the modules: the operator, with normalized arguments.

    ``stride`` and ``dilation`` are ``[h, w]``; ``padding`` is ``[top, left, bottom, right]``.
    TorchScript compiles this function; in an export by ``torch.onnx.export(..., dynamo=True)``
    it emits the ONNX ``DeformConv`` node instead (:mod:`deformcp.torch.onnx`).
    """
    if not torch.jit.is_scripting():
        if _onnx.exporting_with_dynamo():
            return _onnx.deform_conv_node(input, offset, mask, weight, bias, stride, padding, dilation)
    return torch.ops.deformcp.deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation)


def four_sides(padding: List[int]) -> List[int]:
    """``[h, w]`` or ``[top, left, bottom, right]`` as ``[top, left, bottom, right]`` (TorchScript compiles it)."""
    if len(padding) == 2:
        return [padding[0], padding[1], padding[0], padding[1]]
    return padding


@torch.jit.unused
def _normalized(stride, padding, dilation) -> Tuple[List[int], List[int], List[int]]:
    return (list(normalize_pair(stride, "stride")), list(normalize_padding(padding)),
            list(normalize_pair(dilation, "dilation")))


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (0, 0),
                  dilation: Tuple[int, int] = (1, 1), mask: Optional[Tensor] = None) -> Tensor:
    """Deformable 2-D convolution: ``torchvision.ops.deform_conv2d``'s call, on deformcp's operator.

    The parameters, their order and defaults are torchvision's, so replacing the
    import is the whole migration.  The operator is ``torch.ops.deformcp.deform_conv2d``;
    its gradient is the operator ``torch.ops.deformcp.deform_conv2d_backward``, which
    computes only the gradients autograd asks for.

    Parameters
    ----------
    input : Tensor, shape (B, C, H, W)
    offset : Tensor, shape (B, 2*G*kh*kw, H_out, W_out)
        Channel ``g*2*kh*kw + 2*k`` is the vertical and ``+ 1`` the horizontal
        displacement of kernel point ``k`` in offset group ``g``; ``G`` is inferred.
    weight : Tensor, shape (C_out, C/groups, kh, kw)
        ``groups`` is inferred as ``C // weight.shape[1]``.
    bias : Tensor, shape (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int) or (int, int, int, int)
        ``(h, w)`` as torchvision, or ``(top, left, bottom, right)`` (ONNX's order).
        Under TorchScript the three take ``(int, int)`` only, as torchvision's.
    mask : Tensor, shape (B, G*kh*kw, H_out, W_out), optional
        DCNv2's modulation; None means DCNv1 (a mask of ones).

    Returns
    -------
    Tensor, shape (B, C_out, H_out, W_out)
        On ``input``'s device, of its dtype; ``channels_last`` when ``input`` is.

    Raises
    ------
    ValueError, TypeError
        As :func:`deformcp.deform_conv2d`, naming the argument (``input`` is named ``x`` there).

    Notes
    -----
    Under ``torch.autocast`` the floating inputs (float64 excepted) are cast to the
    autocast dtype.  ``torch.func.vmap`` runs one batched call.  Double backward and
    ``torch.func.grad`` are not supported (docs/torch.md).

    Examples
    --------
    >>> import torch
    >>> from deformcp.torch import deform_conv2d
    >>> x = torch.randn(1, 4, 8, 8, requires_grad=True)
    >>> offset = torch.randn(1, 18, 8, 8)
    >>> weight = torch.randn(6, 4, 3, 3)
    >>> y = deform_conv2d(x, offset, weight, padding=1)
    >>> y.sum().backward()
    >>> y.shape, x.grad.shape
    (torch.Size([1, 6, 8, 8]), torch.Size([1, 4, 8, 8]))
    """
    if torch.jit.is_scripting():
        return call_operator(input, offset, mask, weight, bias, [stride[0], stride[1]],
                             [padding[0], padding[1], padding[0], padding[1]], [dilation[0], dilation[1]])
    return call_operator(input, offset, mask, weight, bias, *_normalized(stride, padding, dilation))
