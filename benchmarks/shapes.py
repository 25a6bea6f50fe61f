"""The benchmark shapes, and random inputs for them; shared by the asv suite and the comparison.

Every shape is a 3x3 deformable convolution with a mask and a bias.  The inputs
are random (never zeros): ``x`` and ``grad_out`` standard normal, offsets normal
with a spread of 2 pixels, masks uniform in (0, 1), weights scaled so that the
output has unit variance.

asv runs its suite against older commits of deformcp too, so this module uses
nothing of deformcp at all (the suite uses only its public API).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["BenchShape", "Inputs", "SHAPES", "TARGET_SHAPES", "TINY", "make_inputs", "shape_named"]

OFFSET_SPREAD = 2.0


@dataclass(frozen=True)
class BenchShape:
    """One benchmark geometry.

    ``padding`` is ``(top, left, bottom, right)``, the order :func:`deformcp.deform_conv2d`
    and ONNX use.
    """

    name: str
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    groups: int = 1
    offset_groups: int = 1
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int, int, int] = (1, 1, 1, 1)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def out_size(self) -> Tuple[int, int]:
        """``(H_out, W_out)``.

        deformcp's own formula is in its internal ``ConvGeometry``; written out here
        because asv imports this module against older commits, whose internals differ.
        """
        kh, kw = self.kernel
        top, left, bottom, right = self.padding
        oh = (self.height + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (self.width + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    @property
    def kwargs(self) -> dict:
        """The geometry keywords of :func:`deformcp.deform_conv2d`."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    @property
    def label(self) -> str:
        """A one-line description, e.g. ``B=8 C=64 64x64 C_out=64``."""
        extra = ""
        if self.groups > 1:
            extra += f" groups={self.groups}"
        if self.offset_groups > 1:
            extra += f" offset_groups={self.offset_groups}"
        return (f"B={self.batch} C={self.in_channels} {self.height}x{self.width} "
                f"C_out={self.out_channels}{extra}")

    def as_dict(self) -> dict:
        """The fields, for JSON."""
        return {field: getattr(self, field) for field in self.__dataclass_fields__}


# The first three are the CPU speed targets; the ResNet-50 stages are
# those of a detector at an 800x1333 input (strides 8, 16 and 32).
SHAPES: Dict[str, BenchShape] = {s.name: s for s in (
    BenchShape("b8_c64_64x64", 8, 64, 64, 64, 64),
    BenchShape("b2_c256_64x64", 2, 256, 64, 64, 256),
    BenchShape("b1_c32_200x320", 1, 32, 200, 320, 32),
    BenchShape("resnet_c3_128_100x167", 2, 128, 100, 167, 128),
    BenchShape("resnet_c4_256_50x84", 2, 256, 50, 84, 256),
    BenchShape("resnet_c5_512_25x42", 2, 512, 25, 42, 512),
    BenchShape("depthwise_c256_50x84", 2, 256, 50, 84, 256, groups=256),
    BenchShape("offset_groups4_c256_50x84", 2, 256, 50, 84, 256, offset_groups=4),
)}

TARGET_SHAPES = ("b8_c64_64x64", "b2_c256_64x64", "b1_c32_200x320")

# Small enough for a test, with every geometry feature the peers must agree on.
TINY = BenchShape("tiny", 2, 8, 9, 11, 6, groups=2, offset_groups=2, stride=(1, 2), padding=(1, 2, 0, 1),
                  dilation=(2, 1))


def shape_named(name: str) -> BenchShape:
    """The shape called ``name`` (one of :data:`SHAPES`, or ``"tiny"``).

    Raises
    ------
    KeyError
        If there is no such shape; the message lists the names.
    """
    if name == TINY.name:
        return TINY
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join([*SHAPES, TINY.name])}") from None


@dataclass(frozen=True)
class Inputs:
    """The arrays of one problem: the five inputs of the convolution and an output gradient."""

    x: np.ndarray
    offset: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    grad_out: np.ndarray

    @property
    def conv_args(self) -> tuple:
        """``(x, offset, mask, weight, bias)``, the positional arguments of deform_conv2d."""
        return (self.x, self.offset, self.mask, self.weight, self.bias)

    def astype(self, dtype) -> "Inputs":
        """A copy with every array cast to ``dtype``."""
        return replace(self, **{f: getattr(self, f).astype(dtype) for f in self.__dataclass_fields__})


def make_inputs(shape: BenchShape, seed: int = 0, dtype=np.float32, *, with_grad_out: bool = True) -> Inputs:
    """Random inputs for ``shape``, drawn in float32 (cheap even for the large shapes) and cast.

    Parameters
    ----------
    shape : BenchShape
    seed : int
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal inputs.
    dtype : dtype-like
        float16, bfloat16 (``ml_dtypes``), float32 or float64.
    with_grad_out : bool, keyword-only
        Whether to draw ``grad_out`` (otherwise it is a zero-size placeholder), which
        forward-only benchmarks do not need.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    kh, kw = shape.kernel
    k = kh * kw
    oh, ow = shape.out_size
    b, g = shape.batch, shape.offset_groups
    fan_in = k * shape.in_channels // shape.groups
    inputs = Inputs(
        x=rng.standard_normal((b, shape.in_channels, shape.height, shape.width), dtype=f32),
        offset=rng.standard_normal((b, 2 * g * k, oh, ow), dtype=f32) * f32(OFFSET_SPREAD),
        mask=rng.uniform(0.0, 1.0, (b, g * k, oh, ow)).astype(f32),
        weight=rng.standard_normal((shape.out_channels, shape.in_channels // shape.groups, kh, kw), dtype=f32)
        * f32(1.0 / np.sqrt(fan_in)),
        bias=rng.standard_normal(shape.out_channels, dtype=f32),
        grad_out=(rng.standard_normal((b, shape.out_channels, oh, ow), dtype=f32) if with_grad_out
                  else np.empty((0,), f32)),
    )
    return inputs if np.dtype(dtype) == np.float32 else inputs.astype(dtype)


def dtype_named(name: str) -> Optional[np.dtype]:
    """The NumPy dtype called ``name``; ``None`` for bfloat16 when ml_dtypes is not installed."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
