"""Random deformable-convolution problems for the tests: one generator every test module shares.

``Spec`` describes a geometry; :func:`make_problem` draws fresh random arrays for it
(offsets with a spread of about 2 pixels, masks uniform in (0, 1), never zeros);
:func:`specs` is the hypothesis strategy over the geometry space the core, the
kernel-emulation and the GPU tests all cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from hypothesis import strategies as st

import deformcp
from deformcp.api import INPUT_NAMES
from deformcp.geometry import ConvGeometry
from deformcp import testing
from deformcp.testing import TOLERANCE, assert_within_tolerance, relative_error  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Spec:
    batch: int = 2
    in_channels: int = 4
    height: int = 6
    width: int = 5
    out_channels: int = 4
    kernel: Tuple[int, int] = (3, 3)
    groups: int = 1
    offset_groups: int = 1
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, ...] = (1, 1, 1, 1)
    dilation: Tuple[int, int] = (1, 1)
    mask: bool = True
    bias: bool = True

    @property
    def geometry(self) -> ConvGeometry:
        """The spec's geometry (unvalidated: hypothesis only draws valid specs); the output size is its."""
        pad = self.padding if len(self.padding) == 4 else (*self.padding, *self.padding)
        return ConvGeometry(batch=self.batch, in_channels=self.in_channels, height=self.height, width=self.width,
                            out_channels=self.out_channels, kernel_h=self.kernel[0], kernel_w=self.kernel[1],
                            stride=self.stride, padding=pad, dilation=self.dilation, groups=self.groups,
                            offset_groups=self.offset_groups, has_mask=self.mask, has_bias=self.bias)

    @property
    def out_size(self) -> Tuple[int, int]:
        return self.geometry.out_h, self.geometry.out_w

    @property
    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


@dataclass
class Problem:
    """Arrays of one random problem; ``mask`` and ``bias`` are None when the spec has none."""

    spec: Spec
    x: np.ndarray
    offset: np.ndarray
    mask: Optional[np.ndarray]
    weight: np.ndarray
    bias: Optional[np.ndarray]
    grad_out: np.ndarray

    @property
    def inputs(self) -> tuple:
        """``(x, offset, mask, weight, bias)``, the positional arguments of deform_conv2d."""
        return (self.x, self.offset, self.mask, self.weight, self.bias)

    def astype(self, dtype) -> "Problem":
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        return Problem(self.spec, *(cast(a) for a in (self.x, self.offset, self.mask, self.weight, self.bias,
                                                         self.grad_out)))


def make_problem(spec: Spec, rng: np.random.Generator, dtype=np.float64, offset_spread: float = 2.0) -> Problem:
    """Draw a random problem for ``spec`` (float64 draws, cast to ``dtype``)."""
    kh, kw = spec.kernel
    oh, ow = spec.out_size
    k = kh * kw
    b = spec.batch
    x = rng.standard_normal((b, spec.in_channels, spec.height, spec.width))
    offset = rng.normal(0.0, offset_spread, (b, 2 * spec.offset_groups * k, oh, ow))
    mask = rng.uniform(0.0, 1.0, (b, spec.offset_groups * k, oh, ow)) if spec.mask else None
    weight = rng.standard_normal((spec.out_channels, spec.in_channels // spec.groups, kh, kw)) / np.sqrt(
        k * spec.in_channels / spec.groups)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    grad_out = rng.standard_normal((b, spec.out_channels, oh, ow))
    return Problem(spec, x, offset, mask, weight, bias, grad_out).astype(dtype)


@st.composite
def specs(draw, max_batch: int = 3, max_size: int = 7, allow_empty_batch: bool = True) -> Spec:
    """Hypothesis strategy over small geometries: groups, offset groups, stride, symmetric and
    asymmetric padding, dilation, non-square kernels, mask or not, bias or not, H or W of 1."""
    groups = draw(st.sampled_from([1, 2]))
    offset_groups = draw(st.sampled_from([1, 2]))
    per = draw(st.integers(1, 2))
    in_channels = groups * offset_groups * per
    out_channels = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.booleans()):
        p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        padding = p + p
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    # The padded input must hold the dilated kernel.
    min_h = max(1, dilation[0] * (kh - 1) + 1 - padding[0] - padding[2])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - padding[1] - padding[3])
    height = draw(st.integers(min_h, max(min_h, max_size)))
    width = draw(st.integers(min_w, max(min_w, max_size)))
    batch = draw(st.integers(0 if allow_empty_batch else 1, max_batch))
    return Spec(batch=batch, in_channels=in_channels, height=height, width=width, out_channels=out_channels,
                kernel=(kh, kw), groups=groups, offset_groups=offset_groups, stride=stride, padding=padding,
                dilation=dilation, mask=draw(st.booleans()), bias=draw(st.booleans()))


# ---------------------------------------------------------------------------
# Helpers shared by the core test modules (forward, gradients, properties,
# invariants, dtypes, non-finite, workspace): run a Problem through deformcp or
# through the float64 loop reference, and compare.
# ---------------------------------------------------------------------------



def run_forward(problem: Problem, **kwargs):
    """``deformcp.deform_conv2d`` on the problem's inputs and geometry (``kwargs`` override the geometry)."""
    return deformcp.deform_conv2d(*problem.inputs, **{**problem.spec.kwargs, **kwargs})


def run_backward(problem: Problem, **kwargs) -> dict:
    """``deformcp.deform_conv2d_backward`` on the problem, as a dict keyed x/offset/mask/weight/bias."""
    grads = deformcp.deform_conv2d_backward(problem.grad_out, *problem.inputs,
                                            **{**problem.spec.kwargs, **kwargs})
    return dict(zip(INPUT_NAMES, grads))


def run_im2col(problem: Problem, **kwargs):
    """``deformcp.deform_im2col`` on the problem, reshaped to the reference's (B, C, K, H_out, W_out)."""
    cols = deformcp.deform_im2col(problem.x, problem.offset, problem.mask, problem.spec.kernel,
                                  **{**problem.spec.kwargs, **kwargs})
    b, c = problem.x.shape[:2]
    kh, kw = problem.spec.kernel
    return cols.reshape(b, c, kh * kw, *problem.spec.out_size)


def loop_forward(problem: Problem) -> np.ndarray:
    """Float64 loop-reference forward pass of the problem (inputs read as float64)."""
    return testing.loop_deform_conv2d(*_float64(problem.inputs), **problem.spec.kwargs)


def loop_backward(problem: Problem) -> dict:
    """Float64 loop-reference gradients of the problem, keyed x/offset/mask/weight/bias."""
    return testing.loop_deform_conv2d_backward(*_float64((problem.grad_out, *problem.inputs)), **problem.spec.kwargs)


def loop_columns(problem: Problem) -> np.ndarray:
    """Float64 loop-reference deformable im2col, shape (B, C, K, H_out, W_out)."""
    x, offset, mask = _float64((problem.x, problem.offset, problem.mask))
    return testing.loop_im2col(x, offset, mask, *problem.spec.kernel, **problem.spec.kwargs)


def _float64(arrays):
    return tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)


def assert_gradients_match(actual: dict, expected: dict, dtype_name: str = "float64") -> None:
    """Compare every gradient of ``actual`` with ``expected``; both must agree on which are None."""
    for name in INPUT_NAMES:
        assert (actual[name] is None) == (expected[name] is None), f"grad_{name}: presence differs"
        if expected[name] is not None:
            assert_within_tolerance(actual[name], expected[name], dtype_name, f"grad_{name}")


def nudge_offsets(offset: np.ndarray) -> np.ndarray:
    """Move every sampling coordinate's fractional part into [0.1, 0.9].

    The kernel's base positions are integers, so the fractional part of a
    sampling coordinate is that of its offset.  Away from integer coordinates the
    output is a smooth (bilinear) function of the offsets, including near the
    -1 and H, W boundaries (which are integers too), so finite differences apply.
    """
    floor = np.floor(offset)
    return floor + 0.1 + 0.8 * (offset - floor)


# Named geometries the explicit (parametrized) tests run over: each stresses one
# feature; all are tiny because the loop reference is slow.
EXAMPLE_SPECS = {
    "basic": Spec(),
    "groups2": Spec(in_channels=4, out_channels=6, groups=2),
    "offset_groups2": Spec(in_channels=4, offset_groups=2),
    "groups2_offset_groups2": Spec(in_channels=4, out_channels=2, groups=2, offset_groups=2),
    "groups4_offset_groups2": Spec(in_channels=4, out_channels=4, groups=4, offset_groups=2),
    # One channel per group, two output channels each; four offset groups in one sampling plan.
    "depthwise_multiplier2_offset_groups4": Spec(in_channels=4, out_channels=8, groups=4, offset_groups=4),
    "stride2": Spec(height=7, width=6, stride=(2, 2)),
    "stride_2x1": Spec(stride=(2, 1)),
    "asymmetric_padding": Spec(padding=(0, 2, 1, 0)),
    "padding_hw": Spec(padding=(2, 0)),
    "no_padding": Spec(padding=(0, 0, 0, 0)),
    "dilation": Spec(height=7, width=7, dilation=(2, 1), padding=(2, 1, 2, 1)),
    "kernel_1x3": Spec(kernel=(1, 3), padding=(0, 1, 0, 1)),
    "kernel_3x2": Spec(kernel=(3, 2), dilation=(1, 2), padding=(1, 0, 2, 1)),
    "kernel_1x1": Spec(kernel=(1, 1), padding=(0, 0, 0, 0)),
    "no_mask": Spec(mask=False),
    "no_bias": Spec(bias=False),
    "no_mask_no_bias": Spec(mask=False, bias=False, groups=2, in_channels=4, out_channels=2),
    "height1": Spec(height=1, width=5),
    "width1": Spec(height=5, width=1),
    "pixel1": Spec(batch=1, height=1, width=1, kernel=(1, 1), padding=(0, 0, 0, 0)),
    "pixel1_padded": Spec(height=1, width=1),
    "batch0": Spec(batch=0),
    "batch33": Spec(batch=33, in_channels=2, out_channels=2, height=2, width=3, kernel=(2, 2),
                    padding=(1, 0, 0, 1), offset_groups=2),
}
