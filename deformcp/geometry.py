"""The geometry of one deformable convolution, validated once at the API boundary.

Every public entry point turns its shapes and keyword arguments into a
:class:`ConvGeometry` before any work is done; the backends receive that object
and trust it.  Shape errors are raised here, as ``ValueError`` naming the
argument and the expected versus actual value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

IntPair = Union[int, Tuple[int, int]]
Padding = Union[int, Tuple[int, int], Tuple[int, int, int, int]]

__all__ = ["ConvGeometry", "conv_geometry", "im2col_geometry", "normalize_count", "normalize_pair", "normalize_padding"]


@dataclass(frozen=True)
class ConvGeometry:
    """Immutable description of a deformable convolution's shapes.

    Attributes
    ----------
    batch, in_channels, height, width : int
        Shape of the input ``x``: ``[batch, in_channels, height, width]``.
    out_channels : int
        ``C_out``; 0 for :func:`deformcp.deform_im2col`, which has no weight.
    kernel_h, kernel_w : int
        Kernel size.
    stride, dilation : tuple of int
        ``(h, w)``.
    padding : tuple of int
        ``(top, left, bottom, right)``, the ONNX ``DeformConv`` order.
    groups : int
        Convolution groups, ``in_channels // weight.shape[1]``.
    offset_groups : int
        Offset groups, ``offset.shape[1] // (2 * kernel_h * kernel_w)``.
    has_mask, has_bias : bool
        Whether a modulation mask (DCNv2) and a bias were given.
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    dilation: Tuple[int, int]
    groups: int
    offset_groups: int
    has_mask: bool
    has_bias: bool

    @property
    def out_h(self) -> int:
        """Output height."""
        return _out_size(self.height, self.padding[0] + self.padding[2], self.dilation[0], self.kernel_h, self.stride[0])

    @property
    def out_w(self) -> int:
        """Output width."""
        return _out_size(self.width, self.padding[1] + self.padding[3], self.dilation[1], self.kernel_w, self.stride[1])

    @property
    def kernel_points(self) -> int:
        """``kernel_h * kernel_w``, the number of sampling points per output pixel."""
        return self.kernel_h * self.kernel_w

    @property
    def out_pixels(self) -> int:
        """``out_h * out_w``."""
        return self.out_h * self.out_w

    @property
    def channels_per_group(self) -> int:
        """Input channels per convolution group."""
        return self.in_channels // self.groups

    @property
    def channels_per_offset_group(self) -> int:
        """Input channels sharing one offset (and mask) field."""
        return self.in_channels // self.offset_groups

    @property
    def out_channels_per_group(self) -> int:
        """Output channels per convolution group."""
        return self.out_channels // self.groups

    @property
    def x_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def offset_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, 2 * self.offset_groups * self.kernel_points, self.out_h, self.out_w)

    @property
    def mask_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.offset_groups * self.kernel_points, self.out_h, self.out_w)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.channels_per_group, self.kernel_h, self.kernel_w)

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def columns_shape(self) -> Tuple[int, int, int]:
        """Shape of :func:`deformcp.deform_im2col`'s result, ``torch.nn.functional.unfold``'s layout."""
        return (self.batch, self.in_channels * self.kernel_points, self.out_pixels)


def _out_size(size: int, pad_total: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {type(value).__name__} {value!r}") from None


def _as_tuple(value, name: str, lengths: Sequence[int]) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) not in lengths:
            allowed = " or ".join(str(n) for n in lengths)
            raise ValueError(f"{name} must be an int or a tuple of {allowed} ints, got {len(value)} values {tuple(value)!r}")
        return tuple(_as_int(v, name) for v in value)
    v = _as_int(value, name)
    return (v,) * min(lengths)


def normalize_pair(value: IntPair, name: str, *, minimum: int = 1) -> Tuple[int, int]:
    """Turn ``stride`` or ``dilation`` (an int or ``(h, w)``) into ``(h, w)``, checking each is ``>= minimum``."""
    pair = _as_tuple(value, name, (2,))
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum} in each dimension, got {pair!r}")
    return pair  # type: ignore[return-value]


def normalize_count(value, name: str) -> int:
    """A layer's channel or group count as a Python int: any integer (``np.int64`` too), at least 1.

    Raises TypeError for a non-integer (a float, a bool) and ValueError below 1, naming ``name``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def normalize_padding(value: Padding) -> Tuple[int, int, int, int]:
    """Turn ``padding`` (int, ``(h, w)`` or ``(top, left, bottom, right)``) into four values, all ``>= 0``."""
    pad = _as_tuple(value, "padding", (2, 4))
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    if any(v < 0 for v in pad):
        raise ValueError(f"padding must be non-negative, got (top, left, bottom, right) = {pad!r}")
    return pad  # type: ignore[return-value]


def _check_ndim(shape: Tuple[int, ...], ndim: int, name: str, layout: str) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(shape)!r} ({len(shape)}-D)")


def _check_positive(value: int, what: str) -> None:
    if value < 1:
        raise ValueError(f"{what} must be positive, got {value}")


def _geometry(
    x_shape, offset_shape, mask_shape, kernel, out_channels, groups, bias_shape, stride, padding, dilation
) -> ConvGeometry:
    batch, channels, height, width = x_shape
    kh, kw = kernel
    _check_positive(channels, "x.shape[1] (input channels)")
    _check_positive(height, "x.shape[2] (height)")
    _check_positive(width, "x.shape[3] (width)")
    stride = normalize_pair(stride, "stride")
    dilation = normalize_pair(dilation, "dilation")
    padding = normalize_padding(padding)

    padded = (height + padding[0] + padding[2], width + padding[1] + padding[3])
    extent = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if extent[0] > padded[0] or extent[1] > padded[1]:
        raise ValueError(
            f"the kernel ({kh}x{kw}) with dilation {dilation} spans {extent[0]}x{extent[1]}, larger than the "
            f"padded input {padded[0]}x{padded[1]} (x's {height}x{width} with padding {padding}): "
            "no output pixel fits"
        )

    _check_ndim(offset_shape, 4, "offset", "[B, 2*offset_groups*kh*kw, H_out, W_out]")
    points = kh * kw
    if offset_shape[1] == 0 or offset_shape[1] % (2 * points):
        raise ValueError(
            f"offset.shape[1] must be a positive multiple of 2*kh*kw = {2 * points}, got {offset_shape[1]}"
        )
    offset_groups = offset_shape[1] // (2 * points)
    if channels % offset_groups:
        raise ValueError(
            f"input channels ({channels}) must be divisible by offset groups "
            f"(offset.shape[1] // (2*kh*kw) = {offset_groups})"
        )

    geom = ConvGeometry(
        batch=batch, in_channels=channels, height=height, width=width, out_channels=out_channels,
        kernel_h=kh, kernel_w=kw, stride=stride, padding=padding, dilation=dilation,
        groups=groups, offset_groups=offset_groups, has_mask=mask_shape is not None,
        has_bias=bias_shape is not None,
    )
    if tuple(offset_shape) != geom.offset_shape:
        raise ValueError(f"offset must have shape {geom.offset_shape}, got {tuple(offset_shape)}")
    if mask_shape is not None:
        _check_ndim(mask_shape, 4, "mask", "[B, offset_groups*kh*kw, H_out, W_out]")
        if tuple(mask_shape) != geom.mask_shape:
            raise ValueError(f"mask must have shape {geom.mask_shape}, got {tuple(mask_shape)}")
    if bias_shape is not None and tuple(bias_shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},) (C_out), got {tuple(bias_shape)}")
    return geom


def conv_geometry(
    x_shape, offset_shape, mask_shape: Optional[tuple], weight_shape, bias_shape: Optional[tuple],
    *, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
) -> ConvGeometry:
    """Validate the shapes of a :func:`deformcp.deform_conv2d` call and describe its geometry.

    Parameters
    ----------
    x_shape, offset_shape, weight_shape : tuple of int
        Shapes of ``x``, ``offset`` and ``weight``.
    mask_shape, bias_shape : tuple of int or None
        Shapes of ``mask`` and ``bias``, ``None`` where they are absent.
    stride, padding, dilation
        As accepted by :func:`deformcp.deform_conv2d`.

    Returns
    -------
    ConvGeometry

    Raises
    ------
    ValueError
        Naming the argument, with the expected and the actual shape or value.
    """
    _check_ndim(x_shape, 4, "x", "[B, C, H, W]")
    _check_ndim(weight_shape, 4, "weight", "[C_out, C/groups, kh, kw]")
    if bias_shape is not None:
        _check_ndim(bias_shape, 1, "bias", "[C_out]")
    _check_positive(x_shape[1], "x.shape[1] (input channels)")
    out_channels, per_group, kh, kw = weight_shape
    _check_positive(out_channels, "weight.shape[0] (output channels)")
    _check_positive(per_group, "weight.shape[1] (input channels per group)")
    _check_positive(kh, "weight.shape[2] (kernel height)")
    _check_positive(kw, "weight.shape[3] (kernel width)")
    channels = x_shape[1]
    if channels % per_group:
        raise ValueError(
            f"input channels ({channels}) must be divisible by weight.shape[1] ({per_group}), "
            "the channels per group"
        )
    groups = channels // per_group
    if out_channels % groups:
        raise ValueError(f"output channels ({out_channels}) must be divisible by groups ({groups})")
    return _geometry(x_shape, offset_shape, mask_shape, (kh, kw), out_channels, groups, bias_shape,
                     stride, padding, dilation)


def im2col_geometry(
    x_shape, offset_shape, mask_shape: Optional[tuple], kernel_size: IntPair,
    *, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
) -> ConvGeometry:
    """Validate the shapes of a :func:`deformcp.deform_im2col` call; ``out_channels`` is 0."""
    _check_ndim(x_shape, 4, "x", "[B, C, H, W]")
    kernel = normalize_pair(kernel_size, "kernel_size")
    return _geometry(x_shape, offset_shape, mask_shape, kernel, 0, 1, None, stride, padding, dilation)
