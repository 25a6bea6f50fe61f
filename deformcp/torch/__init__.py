"""PyTorch adapter: torchvision's ``deform_conv2d`` and ``DeformConv2d``, and mmcv's ``DeformConv2dPack``.

:func:`deform_conv2d` takes ``torchvision.ops.deform_conv2d``'s arguments, in its
order; :class:`DeformConv2d` is ``torchvision.ops.DeformConv2d``;
:class:`DeformConv2dPack` predicts its own offsets and mask as mmcv's
``ModulatedDeformConv2dPack`` and DCNv2's ``DCN`` do, and loads their checkpoints.
All run on the operator ``torch.ops.deformcp.deform_conv2d`` (:mod:`.ops`):
autograd, ``torch.compile``, ``torch.export``, TorchScript, autocast, ``vmap``, and
ONNX export to the standard ``DeformConv`` node (:mod:`.onnx`).  docs/torch.md has
the whole story, docs/migration.md the way over from torchvision, mmcv and DCNv2.

Examples
--------
>>> import torch
>>> from deformcp.torch import deform_conv2d
>>> x = torch.randn(1, 4, 8, 8, requires_grad=True)
>>> offset = torch.randn(1, 18, 8, 8, requires_grad=True)
>>> weight = torch.randn(6, 4, 3, 3, requires_grad=True)
>>> y = deform_conv2d(x, offset, weight, padding=1)
>>> y.sum().backward()
>>> x.grad.shape
torch.Size([1, 4, 8, 8])
"""

from .modules import DeformConv2d, DeformConv2dPack
from .onnx import onnx_translation_table, register_torchscript_symbolic
from .ops import deform_conv2d

register_torchscript_symbolic()

__all__ = ["DeformConv2d", "DeformConv2dPack", "deform_conv2d", "onnx_translation_table"]
