"""ONNX export: deformcp's operator as ONNX's standard ``DeformConv`` node (opset 19, default domain).

ONNX ``DeformConv`` computes what deformcp computes (torchvision's semantics): its
inputs are ``X, W, offset, B, mask`` (``B`` and ``mask`` optional), ``pads`` is
``[top, left, bottom, right]``, and the offset channels are ordered
``(offset group, kernel point, (dy, dx))``, deformcp's order.

* The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) has a global
  registry: importing :mod:`deformcp.torch` registers the symbolic function of
  ``deformcp::deform_conv2d`` for opset 19 and later.
* The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, PyTorch's default)
  has none.  While it captures a model, :func:`deformcp.torch.deform_conv2d` and the
  modules emit the node themselves through ``torch.onnx.ops.symbolic``
  (:func:`exporting_with_dynamo`), so a model exports with no extra argument.  A
  program captured beforehand (``torch.export.export``) holds the operator instead:
  pass ``custom_translation_table=deformcp.torch.onnx_translation_table()``.

All three routes take the node's attributes from :func:`deform_conv_attributes`.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.onnx.symbolic_helper import parse_args

from ..geometry import conv_geometry

__all__ = ["OPSET", "deform_conv_attributes", "onnx_translation_table"]

OPSET = 19
"""The ONNX opset that introduced ``DeformConv``; exports need this opset or a later one."""

_OPERATOR = "deformcp::deform_conv2d"


def deform_conv_attributes(in_channels: int, offset_channels: int, weight_shape: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Dict[str, object]:
    """The attributes of the ONNX ``DeformConv`` node for one call of the operator.

    Parameters
    ----------
    in_channels, offset_channels : int
        ``x.shape[1]`` and ``offset.shape[1]``.
    weight_shape : sequence of int
        ``(C_out, C/groups, kh, kw)``.
    stride, dilation : sequence of int
        ``(h, w)``.
    padding : sequence of int
        ``(top, left, bottom, right)``, which is ONNX's ``pads`` order.

    Returns
    -------
    dict
        ``dilations, group, kernel_shape, offset_group, pads, strides``.
    """
    kh, kw = int(weight_shape[2]), int(weight_shape[3])
    return dict(dilations=[int(d) for d in dilation], group=int(in_channels) // int(weight_shape[1]),
                kernel_shape=[kh, kw], offset_group=int(offset_channels) // (2 * kh * kw),
                pads=[int(p) for p in padding], strides=[int(s) for s in stride])


# --------------------------------------------------------------------- the TorchScript exporter


def _static_sizes(value, name: str, dims: Sequence[int]) -> List[Optional[int]]:
    sizes = value.type().varyingSizes()
    if sizes is None or any(sizes[d] is None for d in dims):
        raise ValueError(f"ONNX export of {_OPERATOR} needs static sizes in dimensions {tuple(dims)} of {name}, "
                         f"got sizes {sizes}")
    return sizes


@parse_args("v", "v", "v", "v", "v", "is", "is", "is")
def _torchscript_symbolic(g, x, offset, mask, weight, bias, stride, padding, dilation):
    attributes = deform_conv_attributes(_static_sizes(x, "input", (1,))[1], _static_sizes(offset, "offset", (1,))[1],
                                        _static_sizes(weight, "weight", (1, 2, 3)), stride, padding, dilation)
    inputs = [x, weight, offset]
    has_mask, has_bias = (not v.node().mustBeNone() for v in (mask, bias))
    if has_mask or has_bias:
        # An absent input before a present one is ONNX's empty name: a None typed as an optional tensor,
        # as the exporter's own symbolic functions write it.
        inputs.append(bias if has_bias else g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor()))
    if has_mask:
        inputs.append(mask)
    return g.op("DeformConv", *inputs, **{f"{key}_i": value for key, value in attributes.items()})


def register_torchscript_symbolic() -> None:
    """Register the symbolic function of ``deformcp::deform_conv2d`` with the TorchScript exporter.

    Called once by ``import deformcp.torch``.  It serves opset 19 and later; at an
    earlier opset the exporter reports the operator as unsupported.
    """
    torch.onnx.register_custom_op_symbolic(_OPERATOR, _torchscript_symbolic, OPSET)


# -------------------------------------------------------------------------- the dynamo exporter


def exporting_with_dynamo() -> bool:
    """Whether a model is being captured by ``torch.onnx.export(..., dynamo=True)`` now.

    ``torch.onnx.is_in_onnx_export()`` is also true under the TorchScript exporter,
    which traces with ``torch.jit``; that one translates the operator itself.
    """
    return (hasattr(torch.onnx, "ops") and torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing())


@torch.jit.unused
def deform_conv_node(x: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                     stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    """The ``DeformConv`` node, as ``torch.onnx.ops.symbolic`` records it in a dynamo capture.

    The operator is not called, so its validation runs here: the same geometry
    gives the output shape.
    """
    geom = conv_geometry(tuple(x.shape), tuple(offset.shape), None if mask is None else tuple(mask.shape),
                         tuple(weight.shape), None if bias is None else tuple(bias.shape),
                         stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
    attributes = deform_conv_attributes(x.shape[1], offset.shape[1], weight.shape, stride, padding, dilation)
    return torch.onnx.ops.symbolic("DeformConv", [x, weight, offset, bias, mask], attributes, dtype=x.dtype,
                                   shape=geom.out_shape, version=OPSET)


def _translate(x, offset, mask, weight, bias, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]):
    from onnxscript import opset19 as op

    attributes = deform_conv_attributes(x.shape[1], offset.shape[1], weight.shape, stride, padding, dilation)
    return op.DeformConv(x, weight, offset, bias, mask, **attributes)


def onnx_translation_table() -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export`` of a program that holds the operator.

    Needed only for a ``torch.export.ExportedProgram`` captured before the export
    (a module or function passed to ``torch.onnx.export`` emits the node itself).
    The translation builds the node with ONNX Script (``pip install onnxscript``,
    which the dynamo exporter needs anyway).

    Returns
    -------
    dict
        ``{torch.ops.deformcp.deform_conv2d.default: <translation>}``, to pass as
        ``torch.onnx.export(program, custom_translation_table=onnx_translation_table())``
        (docs/torch.md and docs/migration.md show it run).
    """
    return {torch.ops.deformcp.deform_conv2d.default: _translate}
