"""The layers: torchvision's ``DeformConv2d``, and ``DeformConv2dPack``, which predicts its own offsets.

Both are drop-ins for their models' checkpoints: ``DeformConv2d`` has torchvision's
parameters (``weight``, ``bias``); ``DeformConv2dPack`` adds mmcv's offset predictor
``conv_offset`` (and loads DCNv2's ``conv_offset_mask`` under that name).  Both
script with ``torch.jit.script``, and take ``device=`` and ``dtype=`` as ``nn.Conv2d``.
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..geometry import IntPair, Padding, normalize_count, normalize_pair, normalize_padding
from .ops import call_operator, four_sides

__all__ = ["DeformConv2d", "DeformConv2dPack"]


def _counts(**counts) -> Tuple[int, ...]:
    """The channel and group counts as Python ints (:func:`deformcp.geometry.normalize_count` each)."""
    return tuple(normalize_count(value, name) for name, value in counts.items())


def _padding_attribute(padding: Padding) -> Tuple[int, ...]:
    """torchvision's ``(h, w)``, or ``(top, left, bottom, right)`` when given as four values (validated)."""
    sides = normalize_padding(padding)
    return sides if isinstance(padding, (tuple, list)) and len(padding) == 4 else sides[:2]


class DeformConv2d(nn.Module):
    """torchvision's ``DeformConv2d``: a deformable convolution whose offsets (and mask) come from outside.

    Its constructor, parameters, state_dict keys (``weight``, ``bias``),
    initialisation and ``forward(input, offset, mask=None)`` are those of
    ``torchvision.ops.DeformConv2d``, so a torchvision checkpoint loads with
    ``strict=True`` and gives the same outputs.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int) or (int, int, int, int)
        As torchvision, or ``(top, left, bottom, right)``.
    groups : int
        Convolution groups; must divide both channel counts.
    bias : bool
        Whether the convolution has a bias.
    device, dtype
        Where and of what type the parameters are created, as for ``nn.Conv2d``.

    Attributes
    ----------
    weight : Parameter, shape (out_channels, in_channels/groups, kh, kw)
    bias : Parameter, shape (out_channels,), or None
    kernel_size, stride, dilation : (int, int)
    padding : (int, int) or (int, int, int, int)

    Examples
    --------
    >>> import torch
    >>> from deformcp.torch import DeformConv2d
    >>> layer = DeformConv2d(4, 8, 3, padding=1)
    >>> x, offset = torch.randn(2, 4, 16, 16), torch.randn(2, 18, 16, 16)
    >>> layer(x, offset).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        in_channels, out_channels, groups = _counts(in_channels=in_channels, out_channels=out_channels,
                                                    groups=groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) "
                             f"and out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = normalize_pair(kernel_size, "kernel_size")
        self.stride = normalize_pair(stride, "stride")
        self.padding = _padding_attribute(padding)
        self.dilation = normalize_pair(dilation, "dilation")
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's (and ``nn.Conv2d``'s) initialisation of the weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _deform(self, input: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        return call_operator(input, offset, mask, self.weight, self.bias, list(self.stride),
                             four_sides(list(self.padding)), list(self.dilation))

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Deformable convolution of ``input``.

        Parameters
        ----------
        input : Tensor, shape (B, in_channels, H, W)
        offset : Tensor, shape (B, 2*G*kh*kw, H_out, W_out)
        mask : Tensor, shape (B, G*kh*kw, H_out, W_out), optional
            DCNv2's modulation; None means DCNv1.

        Returns
        -------
        Tensor, shape (B, out_channels, H_out, W_out)
        """
        return self._deform(input, offset, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class DeformConv2dPack(DeformConv2d):
    """A deformable convolution that predicts its own offsets (and mask) from its input.

    mmcv's ``ModulatedDeformConv2dPack`` (``modulated=True``, the default) and
    ``DeformConv2dPack`` (``modulated=False``), and DCNv2's ``DCN``: a plain
    convolution ``conv_offset`` with the layer's kernel size, stride, padding and
    dilation reads the input and predicts ``3*G*kh*kw`` channels (``2*G*kh*kw``
    when not modulated): the offsets, then the mask logits.  The mask is
    ``mask_scale * sigmoid(logits)``.  ``conv_offset`` starts at zero, as in mmcv and
    DCNv2, so a fresh layer samples the regular grid.

    The parameters and their names are mmcv's (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``), and with the default
    ``mask_scale=1`` the mask is theirs, so mmcv checkpoints load with ``strict=True``
    and give the same outputs; DCNv2's ``conv_offset_mask.*`` keys load into
    ``conv_offset`` (a load hook renames them).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype
        As :class:`DeformConv2d`; the positional order is mmcv's
        (``offset_groups`` is mmcv's ``deform_groups``, DCNv2's ``deformable_groups``).
    offset_groups : int
        ``G``, the number of offset (and mask) groups; must divide ``in_channels``.
    modulated : bool
        DCNv2 (a predicted mask) when True, DCNv1 when False.
    mask_scale : float
        The mask is ``mask_scale * sigmoid(logits)``.  1 is mmcv's and DCNv2's
        convention (a fresh layer is then half a plain convolution); 2 makes a fresh
        layer exactly a plain convolution (``F.conv2d`` with ``weight`` and ``bias``),
        the mask then lying in ``(0, 2)``.

    Attributes
    ----------
    conv_offset : nn.Conv2d
        The predictor of offsets and mask logits.

    Examples
    --------
    >>> import torch
    >>> from deformcp.torch import DeformConv2dPack
    >>> layer = DeformConv2dPack(4, 8, 3, padding=1)
    >>> layer(torch.randn(2, 4, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, modulated: bool = True, mask_scale: float = 1.0, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        (offset_groups,) = _counts(offset_groups=offset_groups)
        in_channels = self.in_channels
        if in_channels % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must divide in_channels ({in_channels})")
        if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not (
                math.isfinite(mask_scale) and mask_scale > 0):
            raise ValueError(f"mask_scale must be a positive finite number, got {mask_scale!r}")
        self.offset_groups, self.modulated, self.mask_scale = offset_groups, bool(modulated), float(mask_scale)
        top, left, bottom, right = normalize_padding(self.padding)
        # nn.Conv2d pads symmetrically only; asymmetric padding is applied by F.pad before it.
        self._symmetric = (top, left) == (bottom, right)
        self._pad_before: List[int] = [left, right, top, bottom]
        points = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, (3 if modulated else 2) * points, self.kernel_size,
                                     stride=self.stride, padding=(top, left) if self._symmetric else 0,
                                     dilation=self.dilation, bias=True, device=device, dtype=dtype)
        self._reset_conv_offset()

    def reset_parameters(self) -> None:
        """torchvision's initialisation of ``weight`` and ``bias``; zeros for ``conv_offset``, as mmcv's."""
        super().reset_parameters()
        # DeformConv2d.__init__ calls this before conv_offset exists; __init__ then resets it.
        if hasattr(self, "conv_offset"):
            self._reset_conv_offset()

    def _reset_conv_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def predict(self, input: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The offsets and (when ``modulated``) the mask the layer uses for ``input``.

        As mmcv's ``o1, o2, m = chunk(conv_offset(x), 3); offset = cat(o1, o2)``: the
        first ``2*G*kh*kw`` channels are the offsets, the rest the mask logits.
        """
        if not self._symmetric:
            input = F.pad(input, self._pad_before)
        predicted = self.conv_offset(input)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        mask: Optional[Tensor] = None
        if self.modulated:
            mask = torch.sigmoid(predicted[:, n_offset:])
            if self.mask_scale != 1.0:
                mask = mask * self.mask_scale
        return predicted[:, :n_offset], mask

    def forward(self, input: Tensor) -> Tensor:
        """Deformable convolution of ``input`` with the offsets and mask it predicts.

        Parameters
        ----------
        input : Tensor, shape (B, in_channels, H, W)

        Returns
        -------
        Tensor, shape (B, out_channels, H_out, W_out)
        """
        offset, mask = self.predict(input)
        return self._deform(input, offset, mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # DCNv2's DCN names the predictor conv_offset_mask; its layout and mask are mmcv's.
        for name in ("weight", "bias"):
            dcnv2_key, key = f"{prefix}conv_offset_mask.{name}", f"{prefix}conv_offset.{name}"
            if dcnv2_key in state_dict and key not in state_dict:
                state_dict[key] = state_dict.pop(dcnv2_key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, offset_groups={self.offset_groups}, modulated={self.modulated}, "
                f"mask_scale={self.mask_scale}")
