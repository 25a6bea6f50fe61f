"""The public functions: validate once, pick a backend, run it.

Data flows one way: the caller's arrays -> :mod:`~deformcp.interop` (NumPy or CuPy views,
remembering the caller's array type and device) -> validation into a
:class:`~deformcp.geometry.ConvGeometry` -> backend -> :mod:`~deformcp.interop` (the result
as the caller's array type, on the caller's device).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Tuple

import numpy as np

from . import interop
from .backends import backend_for_device
from .dtypes import common_dtype, compute_dtype
from .geometry import ConvGeometry, IntPair, Padding, conv_geometry, im2col_geometry

__all__ = ["INPUT_NAMES", "Gradients", "deform_conv2d", "deform_conv2d_backward", "deform_im2col"]

# The inputs of deform_conv2d, in its argument order; the gradients are named after them.
INPUT_NAMES = ("x", "offset", "mask", "weight", "bias")
# The arrays that may not be None where a function takes them (mask and bias are optional).
_REQUIRED = ("grad_out", "x", "offset", "weight")


class Gradients(NamedTuple):
    """The gradients of :func:`deform_conv2d` with respect to its five inputs.

    A field is ``None`` when its input was ``None`` (no mask, no bias) or when it was
    not asked for.
    """

    grad_x: Optional[object]
    grad_offset: Optional[object]
    grad_mask: Optional[object]
    grad_weight: Optional[object]
    grad_bias: Optional[object]


def _shape(array):
    return None if array is None else tuple(array.shape)


@contextlib.contextmanager
def _prepared(make_geometry: Callable[..., ConvGeometry], **named) -> Iterator[Tuple]:
    """The one prelude of every public function: arrays in, validated, a backend chosen.

    Converts the caller's arrays (:func:`deformcp.interop.native`), checks their dtypes,
    validates their shapes into a geometry with ``make_geometry(**shapes)``, and picks the
    backend of the device :mod:`~deformcp.interop` found, in that order, so nothing runs
    before every check has passed.

    Yields
    ------
    (call, geom, compute_dtype, backend)
    """
    for name in _REQUIRED:
        if name in named and named[name] is None:
            raise TypeError(f"{name} must be an array, got None (only mask and bias may be None)")
    with interop.native(**named) as call:
        cdt = compute_dtype(common_dtype(**call.arrays))
        geom = make_geometry(**{name: _shape(array) for name, array in call.arrays.items()})
        yield call, geom, cdt, backend_for_device(call.device)


def _conv_geometry(stride, padding, dilation):
    def make(x, offset, mask, weight, bias, **_):
        return conv_geometry(x, offset, mask, weight, bias, stride=stride, padding=padding, dilation=dilation)
    return make


def deform_conv2d(x, offset, mask, weight, bias=None, *, stride: IntPair = 1, padding: Padding = 0,
                  dilation: IntPair = 1, allow_tf32: bool = False):
    """Deformable 2-D convolution (DCNv1, or DCNv2 when ``mask`` is given).

    Each output pixel samples the input at the kernel's points displaced by
    ``offset`` (bilinear interpolation, zero outside the image), multiplies each
    sample by ``mask``, and convolves the samples with ``weight``.  The semantics
    are those of ``torchvision.ops.deform_conv2d``; ``docs/semantics.md`` states them.

    The arrays may come from any library with DLPack support (NumPy, CuPy, PyTorch,
    JAX, ...), all on one device: CPU arrays run on the NumPy/SciPy backend, CUDA
    arrays on the CuPy kernels, without copies.  ``docs/interop.md`` states the rules.
    This is the plain function: for autograd use :mod:`deformcp.torch` or :mod:`deformcp.jax`.

    Parameters
    ----------
    x : array, shape (B, C, H, W)
        Input.
    offset : array, shape (B, 2*G*kh*kw, H_out, W_out)
        Displacements; channel ``g*2*kh*kw + 2*k`` is the vertical and ``+ 1`` the
        horizontal displacement of kernel point ``k = i*kw + j`` in offset group ``g``.
        ``G``, the number of offset groups, is inferred from this shape.
    mask : array, shape (B, G*kh*kw, H_out, W_out), or None
        Modulation (DCNv2); ``None`` means DCNv1, the same as a mask of ones.
    weight : array, shape (C_out, C/groups, kh, kw)
        Convolution weight; ``groups = C // weight.shape[1]``.
    bias : array, shape (C_out,), optional
    stride, dilation : int or (int, int), keyword-only
    padding : int, (int, int) or (int, int, int, int), keyword-only
        Zero padding: all sides, ``(h, w)``, or ``(top, left, bottom, right)`` (ONNX order).
    allow_tf32 : bool, keyword-only
        On a GPU, let float32 products run on tensor cores in TF32 (operands rounded to a
        10-bit mantissa, float32 accumulation): faster, and about 1e-3 relative error
        instead of float32's.  Off by default, as in PyTorch; no effect on the CPU or for
        other dtypes (docs/semantics.md, section 10).

    Returns
    -------
    array, shape (B, C_out, H_out, W_out)
        Of ``x``'s array type, on ``x``'s device, with its dtype, where
        ``H_out = (H + pad_top + pad_bottom - dilation_h*(kh-1) - 1) // stride_h + 1``.

    Raises
    ------
    ValueError
        If a shape or a geometry argument is invalid; the message names it.
    TypeError
        If an input is not an array, or not a floating array of a supported dtype; if
        the dtypes differ; or if the arrays live on different devices.

    Notes
    -----
    float16 and bfloat16 are computed in float32 and rounded once.  NaN in any input
    propagates to the outputs that read it; see ``docs/semantics.md``.

    Examples
    --------
    >>> import numpy as np, deformcp
    >>> x = np.random.rand(1, 4, 8, 8).astype(np.float32)
    >>> w = np.random.rand(6, 4, 3, 3).astype(np.float32)
    >>> offset = np.zeros((1, 18, 8, 8), np.float32)
    >>> deformcp.deform_conv2d(x, offset, None, w, padding=1).shape
    (1, 6, 8, 8)
    """
    allow_tf32 = _checked_flag(allow_tf32, "allow_tf32")
    with _prepared(_conv_geometry(stride, padding, dilation),
                   x=x, offset=offset, mask=mask, weight=weight, bias=bias) as (call, geom, cdt, backend):
        a = call.arrays
        return call.back(backend.forward(geom, cdt, *(a[name] for name in INPUT_NAMES), allow_tf32=allow_tf32))


def deform_conv2d_backward(grad_out, x, offset, mask, weight, bias=None, *, stride: IntPair = 1,
                           padding: Padding = 0, dilation: IntPair = 1,
                           wrt: Iterable[str] = INPUT_NAMES, deterministic: Optional[bool] = None,
                           allow_tf32: bool = False) -> Gradients:
    """Gradients of :func:`deform_conv2d` with respect to all five inputs.

    Parameters
    ----------
    grad_out : array, shape (B, C_out, H_out, W_out)
        Gradient of the loss with respect to the output.
    x, offset, mask, weight, bias, stride, padding, dilation
        The arguments of the forward call.
    wrt : iterable of str, keyword-only
        Which gradients to compute, among ``"x", "offset", "mask", "weight", "bias"``
        (default: all).  Work that only the others need is skipped.
    deterministic : bool or None, keyword-only
        ``True``: bitwise identical results from run to run, whatever the tiling or the
        GPU's scheduling; on a GPU ``grad_x`` is then gathered pixel by pixel in a fixed
        order instead of added up with atomics (slower; docs/cuda.md).  ``None`` (default)
        or ``False``: the backend's fastest way, on a GPU atomics, whose rounding of
        ``grad_x`` can differ between runs.  The CPU backend is always deterministic, and
        every other gradient is deterministic on both.
    allow_tf32 : bool, keyword-only
        As for :func:`deform_conv2d`: TF32 products for float32 on a GPU.

    Returns
    -------
    Gradients
        ``(grad_x, grad_offset, grad_mask, grad_weight, grad_bias)``, each of its
        input's shape and dtype, of ``x``'s array type on ``x``'s device; ``None`` for an
        input that was ``None`` or a gradient not in ``wrt``.

    Raises
    ------
    ValueError, TypeError
        As :func:`deform_conv2d`; also if ``grad_out`` has the wrong shape or ``wrt``
        names an unknown input.

    Notes
    -----
    ``grad_offset`` follows torchvision's rule on integer coordinates: the derivative
    is taken over the cell ``[n, n+1]``, and is non-zero exactly on the lines
    ``py = -1`` and ``px = -1`` (see ``docs/semantics.md``).
    """
    wanted = frozenset(_checked_wrt(wrt))
    if deterministic is not None:
        deterministic = _checked_flag(deterministic, "deterministic", "True, False or None")
    allow_tf32 = _checked_flag(allow_tf32, "allow_tf32")
    with _prepared(_conv_geometry(stride, padding, dilation), grad_out=grad_out,
                   x=x, offset=offset, mask=mask, weight=weight, bias=bias) as (call, geom, cdt, backend):
        a = call.arrays
        if _shape(a["grad_out"]) != geom.out_shape:
            raise ValueError(f"grad_out must have the output's shape {geom.out_shape}, got {_shape(a['grad_out'])}")
        if mask is None:
            wanted -= {"mask"}
        if bias is None:
            wanted -= {"bias"}
        grads = backend.backward(geom, cdt, a["grad_out"], *(a[name] for name in INPUT_NAMES[:4]), wanted,
                                 deterministic=deterministic, allow_tf32=allow_tf32)
        return Gradients(*(call.back(grads.get(name)) for name in INPUT_NAMES))


def _checked_flag(value, name: str, choices: str = "True or False") -> bool:
    # bool or NumPy's bool only: a string or a number would be a slip, not a choice.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {choices}, got {type(value).__name__} {value!r}")
    return bool(value)


def _checked_wrt(wrt) -> list:
    if isinstance(wrt, str):
        wrt = (wrt,)
    try:
        names = list(wrt)
    except TypeError:
        raise TypeError(f"wrt must be a name or an iterable of names among {INPUT_NAMES}, "
                        f"got {type(wrt).__name__} {wrt!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"wrt must name inputs among {INPUT_NAMES} by string, got {names!r}")
    unknown = [n for n in names if n not in INPUT_NAMES]
    if unknown:
        raise ValueError(f"wrt must name inputs among {INPUT_NAMES}, got unknown {unknown}")
    return names


def deform_im2col(x, offset, mask, kernel_size: IntPair, *, stride: IntPair = 1, padding: Padding = 0,
                  dilation: IntPair = 1):
    """Deformable im2col: the sampled, mask-weighted column matrix.

    Parameters
    ----------
    x : array, shape (B, C, H, W)
    offset : array, shape (B, 2*G*kh*kw, H_out, W_out)
    mask : array, shape (B, G*kh*kw, H_out, W_out), or None
    kernel_size : int or (int, int)
        ``(kh, kw)``.
    stride, padding, dilation
        As for :func:`deform_conv2d`.

    Returns
    -------
    array, shape (B, C*kh*kw, H_out*W_out)
        Of ``x``'s array type, on ``x``'s device, with its dtype.  The layout of
        ``torch.nn.functional.unfold``: element ``[b, c*kh*kw + i*kw + j, oy*W_out + ox]``
        is ``mask * bilinear(x[b, c], py, px)`` for kernel point ``(i, j)`` at output pixel
        ``(oy, ox)``.  With zero offsets and no mask it equals ``unfold``; for ``groups=1``,
        ``weight.reshape(C_out, -1) @ columns`` is the convolution.
    """
    def make_geometry(x, offset, mask):
        return im2col_geometry(x, offset, mask, kernel_size, stride=stride, padding=padding, dilation=dilation)

    with _prepared(make_geometry, x=x, offset=offset, mask=mask) as (call, geom, cdt, backend):
        a = call.arrays
        return call.back(backend.im2col(geom, cdt, a["x"], a["offset"], a["mask"]))
