"""The CPU backend's bilinear sampling: a sparse matrix with four entries per sample.

For one offset group, every sample ``(image, output pixel, kernel point)`` reads at
most four input pixels.  Stacking the samples as rows and the pixels of the
channels-last input ``X`` as columns gives a sparse matrix ``S``::

    columns = S @ X              # deformable im2col
    grad_X += S.T @ grad_columns # its exact transpose, no scatter loop

:func:`sampling_plan` computes the four corner indices and weights of every
sample once; :class:`SamplingPlan` applies ``S`` and ``S.T``.  Every image of
``X`` carries one extra all-zero pixel, which corners outside the image point at,
so no branch is needed per corner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse

from ..geometry import ConvGeometry

try:
    # SciPy's own CSR/CSC kernels behind ``csr_array @ dense``.  Called directly they
    # accumulate into an output we own, which the public operator cannot: ``S.T @ G``
    # would return a fresh zeroed array of the whole input per chunk of samples.
    # They release the GIL.  Private API, so the public operator stays as the fallback.
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _csr_matvecs = _csc_matvecs = None

__all__ = ["SamplingPlan", "sampling_plan"]


@dataclass(frozen=True)
class SamplingPlan:
    """How every sample of one offset group in one chunk of the output reads the input.

    Rows are ordered ``(image, output row, output column, kernel point)``.
    Corners are ordered ``(y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)``.

    Attributes
    ----------
    index : ndarray of int, shape (N, 4)
        Row of the stacked channels-last input each corner reads: the image's
        zero pixel where the corner lies outside the image or the sample outside
        ``(-1, H) x (-1, W)`` (the early exit), so that a non-finite value on the
        border does not leak into a sample torchvision never reads.
    bilinear : ndarray, shape (N, 4)
        Bilinear weights, without the mask; 0 where ``index`` is the zero pixel;
        NaN where the sampling position is NaN.
    coordinate_index : ndarray of int, shape (N, 4), or None
        Like ``index`` but without the early exit, for the coordinate gradient,
        which reads the corners on the lines ``py = -1`` and ``px = -1`` too.
        Only computed when asked for.
    frac_y, frac_x : ndarray, shape (N,)
        ``py - floor(py)`` and ``px - floor(px)``, for the coordinate gradient.
    mask : ndarray, shape (N,), or None
    outside : ndarray of bool, shape (N,)
        Samples that take the early exit.
    n_columns : int
        Rows of the stacked channels-last input the indices point into.
    """

    index: np.ndarray
    bilinear: np.ndarray
    coordinate_index: Optional[np.ndarray]
    frac_y: np.ndarray
    frac_x: np.ndarray
    mask: Optional[np.ndarray]
    outside: np.ndarray
    n_columns: int

    @functools.cached_property
    def weights(self) -> np.ndarray:
        """The entries of ``S``: bilinear weights times the mask, shape (N, 4).

        The mask multiplies the weights after the early exit zeroed them, so a NaN mask
        still poisons an outside sample, as torchvision's ``mask * 0`` does.
        """
        return self.bilinear if self.mask is None else self.bilinear * self.mask[:, None]

    @functools.cached_property
    def operator(self) -> scipy.sparse.csr_array:
        """``S`` as a SciPy CSR array (rows: samples, columns: stacked input pixels)."""
        rows = self.index.shape[0]
        return scipy.sparse.csr_array((self.weights.ravel(), self.index.ravel(), _indptr(rows, self.index.dtype)),
                                      shape=(rows, self.n_columns))

    def gather(self, source: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[...] = S @ source``: the samples' values, ``(N, channels)`` from ``(n_columns, channels)``."""
        if _csr_matvecs is None:
            out[...] = self.operator @ source
            return out
        out.fill(0)
        rows, channels = out.shape
        _csr_matvecs(rows, self.n_columns, channels, _indptr(rows, self.index.dtype), self.index.ravel(),
                     self.weights.ravel(), _flat(source, "source"), _flat(out, "out"))
        return out

    def scatter_add(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out += S.T @ values``: the samples' gradients summed into the input pixels they read."""
        if _csc_matvecs is None:
            out += self.operator.T @ values
            return out
        rows, channels = values.shape
        # S's CSR arrays are S.T's CSC arrays.
        _csc_matvecs(self.n_columns, rows, channels, _indptr(rows, self.index.dtype), self.index.ravel(),
                     self.weights.ravel(), _flat(values, "values"), _flat(out, "out"))
        return out


@functools.lru_cache(maxsize=16)
def _indptr(rows: int, dtype) -> np.ndarray:
    """Row pointers of a CSR matrix with four entries in every row (shared, read-only)."""
    indptr = np.arange(0, 4 * rows + 1, 4, dtype=dtype)
    indptr.flags.writeable = False
    return indptr


def _flat(array: np.ndarray, name: str) -> np.ndarray:
    """A 1-D view of a C-contiguous array; never a copy, which the kernels would write into and lose."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return array.reshape(-1)


# Non-finite offsets are defined behaviour (docs/semantics.md), not numerical accidents to warn about.
@np.errstate(invalid="ignore")
def sampling_plan(geom: ConvGeometry, offset: np.ndarray, mask: Optional[np.ndarray], group: int, *,
                  row_start: int, first_image: int, n_columns: int, dtype, index_dtype,
                  coordinate_index: bool) -> SamplingPlan:
    """Sampling plan of offset group ``group`` for a block of the output.

    Parameters
    ----------
    geom : ConvGeometry
    offset, mask : ndarray
        ``offset`` and ``mask`` (or None) cut to the block: its images and its output rows,
        which start at output row ``row_start``.
    group : int
        The offset group.
    first_image : int
        Position of the block's first image among the images stacked in the input the
        indices point into; each image there has ``H*W + 1`` pixels, the last one zero.
    n_columns : int
        Rows of that stacked input.
    dtype, index_dtype
        Floating type of the weights, integer type of the indices.
    coordinate_index : bool
        Whether to compute :attr:`SamplingPlan.coordinate_index` too.
    """
    kh, kw, k = geom.kernel_h, geom.kernel_w, geom.kernel_points
    height, width = geom.height, geom.width
    images, rows, cols = offset.shape[0], offset.shape[2], geom.out_w
    (stride_h, stride_w), (dil_h, dil_w) = geom.stride, geom.dilation
    pad_top, pad_left = geom.padding[0], geom.padding[1]

    # offset[b, g*2K + 2k + {0: dy, 1: dx}, r, c] -> (b, r, c, k), rows in plan order
    pair = offset[:, group * 2 * k:(group + 1) * 2 * k].reshape(images, k, 2, rows, cols)
    dy = pair[:, :, 0].transpose(0, 2, 3, 1).astype(dtype, copy=False)
    dx = pair[:, :, 1].transpose(0, 2, 3, 1).astype(dtype, copy=False)
    out_y = np.arange(row_start, row_start + rows, dtype=dtype)[:, None, None]
    out_x = np.arange(cols, dtype=dtype)[None, :, None]
    ki = np.repeat(np.arange(kh, dtype=dtype), kw)
    kj = np.tile(np.arange(kw, dtype=dtype), kh)
    base_y = out_y * stride_h - pad_top + ki * dil_h          # (rows, 1, K)
    base_x = out_x * stride_w - pad_left + kj * dil_w         # (1, cols, K)
    py = (dy + base_y).ravel()
    px = (dx + base_x).ravel()

    y0 = np.floor(py)
    x0 = np.floor(px)
    frac_y = py - y0
    frac_x = px - x0
    outside = (py <= -1) | (py >= height) | (px <= -1) | (px >= width)
    keep = ~outside
    # Clamped, huge and infinite positions cast safely and stay outside the image.  A NaN
    # position casts to an arbitrary integer; its weights are NaN, so the sample is NaN
    # whichever pixel it names.
    y0i = np.clip(y0, -2, height + 1).astype(index_dtype)
    x0i = np.clip(x0, -2, width + 1).astype(index_dtype)
    unsigned = np.dtype(index_dtype).str.replace("i", "u")
    # One unsigned comparison tests 0 <= v < n.
    y_in = (y0i.view(unsigned) < height, (y0i + 1).view(unsigned) < height)
    x_in = (x0i.view(unsigned) < width, (x0i + 1).view(unsigned) < width)

    pixels = height * width
    image_base = (np.arange(first_image, first_image + images, dtype=index_dtype) * (pixels + 1)).repeat(rows * cols * k)
    zero_pixel = image_base + pixels
    top_left = image_base + y0i * width + x0i
    n = py.size
    index = np.empty((n, 4), dtype=index_dtype)
    coord = np.empty((n, 4), dtype=index_dtype) if coordinate_index else None
    bilinear = np.empty((n, 4), dtype=dtype)
    wy = (1 - frac_y, frac_y)
    wx = (1 - frac_x, frac_x)
    for q, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        inside = y_in[a] & x_in[b]
        read = inside & keep
        corner = top_left + (a * width + b)
        index[:, q] = np.where(read, corner, zero_pixel)
        if coord is not None:
            coord[:, q] = np.where(inside, corner, zero_pixel)
        # Multiplying by the flag (not selecting) keeps a NaN position NaN ...
        bilinear[:, q] = wy[a] * wx[b] * inside
    # ... unless the other coordinate takes the early exit, which is an exact 0.
    bilinear[outside] = 0
    flat_mask = None
    if mask is not None:
        flat_mask = mask[:, group * k:(group + 1) * k].transpose(0, 2, 3, 1).astype(dtype, copy=False).ravel()
    return SamplingPlan(index, bilinear, coord, frac_y, frac_x, flat_mask, outside, n_columns)
