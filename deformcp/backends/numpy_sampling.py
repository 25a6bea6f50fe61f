"""The CPU backend's bilinear sampling: a sparse matrix with four entries per sample.

Every sample ``(image, output pixel, kernel point, offset group)`` reads at most
four input pixels.  Stacking the samples as rows and the pixels of the
channels-last input ``X`` as columns (each offset group's channels a block of its
own rows) gives a sparse matrix ``S``, block-diagonal over the offset groups::

    columns = S @ X              # deformable im2col
    grad_X += S.T @ grad_columns # its exact transpose, no scatter loop

:func:`sampling_plan` computes the four corner indices and weights of every
sample once; :class:`SamplingPlan` applies ``S`` and ``S.T``.

Every image of ``X`` is stored on a grid one pixel larger on each side than the
image, whose border is zero (:mod:`.numpy_grid`).  The four corners of any
sample that can read the image then lie on that grid, the ones outside the image
on its zero border, so no corner needs a test or a branch: they are the grid
pixels ``t, t + 1, t + W + 2, t + W + 3`` from the top-left one ``t``, two pairs
of neighbours in memory.  Samples that read nothing use ``t = W + 1``, the last
pixel of the grid's first row: its four "corners" ``(0, W+1), (1, 0), (1, W+1),
(2, 0)`` wrap from the end of one grid row to the start of the next and are all
border pixels.  (A geometric 2x2 block in a corner of the grid would not do: it
would include an image pixel.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse

from ..geometry import ConvGeometry
from .numpy_grid import grid_pixels, padded_grid

try:
    # SciPy's own CSR/CSC kernels behind ``csr_array @ dense``.  Called directly they
    # accumulate into an output we own, which the public operator cannot: ``S.T @ G``
    # would return a fresh zeroed array of the whole input per chunk of samples.
    # They release the GIL.  Private API, so the public operator stays as the fallback.
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _csr_matvecs = _csc_matvecs = None

__all__ = ["SamplingPlan", "all_finite", "sampling_plan"]

# (row, column) of each corner from the top-left one, in the order of SamplingPlan's columns.
_CORNER_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))


@dataclass(frozen=True)
class SamplingPlan:
    """How every sample of one chunk of the output reads the input.

    Rows are ordered ``(image, output row, output column, kernel point, offset group)``.
    Corners are ordered ``(y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)``.

    Attributes
    ----------
    index : ndarray of int, shape (N, 4)
        Row of the stacked channels-last input each corner reads.  Corners outside
        the image fall on the zero border; samples outside ``(-1, H) x (-1, W)``
        (the early exit) read four border pixels (see the module's docstring), so
        that a non-finite value in the image does not leak into a sample
        torchvision never reads.
    weights : ndarray, shape (N, 4)
        The entries of ``S``: the bilinear weights (:attr:`bilinear`) times the mask.
        The mask multiplies the weights after the early exit zeroed them, so a NaN mask
        still poisons an outside sample, as torchvision's ``mask * 0`` does.
    coordinate_corner : ndarray of int, shape (N,), or None
        Top-left corner of each sample like ``index[:, 0]`` but without the early exit,
        for the coordinate gradient, which reads the corners on the lines ``py = -1``
        and ``px = -1`` too.  Its other corners are ``+1``, ``+W+2`` and ``+W+3``.
        Only computed when asked for.
    frac_y, frac_x : ndarray, shape (N,)
        ``py - floor(py)`` and ``px - floor(px)``, for the coordinate gradient.
    mask : ndarray, shape (N,), or None
    outside : ndarray of bool, shape (N,)
        Samples that take the early exit.
    input_rows : int
        Rows of the stacked channels-last input the indices point into.
    """

    index: np.ndarray
    weights: np.ndarray
    coordinate_corner: Optional[np.ndarray]
    frac_y: np.ndarray
    frac_x: np.ndarray
    mask: Optional[np.ndarray]
    outside: np.ndarray
    input_rows: int

    @functools.cached_property
    def bilinear(self) -> np.ndarray:
        """Bilinear weights ``(N, 4)`` without the mask: 0 for the early exit, NaN where the position is NaN.

        :attr:`weights` without the mask; computed when asked for (the coordinate gradients).
        """
        if self.mask is None:
            return self.weights
        return _corner_weights(*_weight_factors(self.frac_y, self.frac_x, self.outside))

    @functools.cached_property
    def operator(self) -> scipy.sparse.csr_array:
        """``S`` as a SciPy CSR array (rows: samples, columns: stacked input pixels)."""
        rows = self.index.shape[0]
        return scipy.sparse.csr_array((self.weights.ravel(), self.index.ravel(), _indptr(rows, self.index.dtype)),
                                      shape=(rows, self.input_rows))

    def gather(self, source: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[...] = S @ source``: the samples' values, ``(N, channels)`` from ``(input_rows, channels)``."""
        if _csr_matvecs is None:
            out[...] = self.operator @ source
        else:
            out.fill(0)
            rows, channels = out.shape
            _csr_matvecs(rows, self.input_rows, channels, _indptr(rows, self.index.dtype), self.index.ravel(),
                         self.weights.ravel(), _flat(source, "source"), _flat(out, "out"))
        if not self.mask_is_finite():
            # S carries the mask in its weights, (w * m) * v.  torchvision multiplies the sum,
            # m * (sum of w * v): the same but for an infinite mask, where a corner of weight 0
            # would give 0 * Inf = NaN instead of +-Inf.  Those rarest of samples are redone.
            infinite = np.flatnonzero(np.isinf(self.mask))
            if infinite.size:
                corners = source[self.index[infinite]]  # (samples, 4, channels)
                value = sum(self.bilinear[infinite, q, None] * corners[:, q] for q in range(4))
                out[infinite] = self.mask[infinite, None] * value
        return out

    def scatter_add(self, values: np.ndarray, out: np.ndarray, near_only: bool) -> np.ndarray:
        """``out += S.T @ values``: the samples' gradients summed into the input pixels they read.

        torchvision adds a sample's gradient only to the corners within distance 1 of its
        position: the far corners of an integer coordinate, whose weight is 0, get nothing.
        Adding ``0 * g`` there changes nothing while ``values`` and the mask are finite; where
        one of them is not (``0 * Inf = NaN``), the caller asks for ``near_only`` and those
        entries are sent to a border pixel instead.
        """
        index = self._near_corners_only() if near_only else self.index
        rows, channels = values.shape
        if _csc_matvecs is None:
            operator = scipy.sparse.csr_array((self.weights.ravel(), index.ravel(), _indptr(rows, index.dtype)),
                                              shape=(rows, self.input_rows))
            out += operator.T @ values
            return out
        # S's CSR arrays are S.T's CSC arrays.
        _csc_matvecs(self.input_rows, rows, channels, _indptr(rows, index.dtype), index.ravel(),
                     self.weights.ravel(), _flat(values, "values"), _flat(out, "out"))
        return out

    def mask_is_finite(self) -> bool:
        """Whether every mask value is finite (True without a mask)."""
        return self._mask_finite

    @functools.cached_property
    def _mask_finite(self) -> bool:
        return self.mask is None or all_finite(self.mask)

    def _near_corners_only(self) -> np.ndarray:
        """:attr:`index` with the corners farther than 1 from the position sent to a border pixel.

        Row 0 of the stacked input is the top border row of its first image, whose
        gradient is never read.
        """
        near_y = (1 - self.frac_y > 0, self.frac_y > 0)
        near_x = (1 - self.frac_x > 0, self.frac_x > 0)
        index = self.index.copy()
        for q, (a, b) in enumerate(_CORNER_OFFSETS):
            index[~(near_y[a] & near_x[b]), q] = 0
        return index


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of ``array`` is finite.

    The backend asks this of whole chunks to choose the order of its sums (docs/cpu.md), so
    it is made cheap: a finite sum, one fast reduction, proves it (a NaN or an infinity would
    make the sum NaN or infinite); only a sum that is not finite, because of such a value or
    an overflow, needs the test of every value.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow or NaN of the sum is expected
        total = np.add.reduce(array, axis=None)
    return bool(np.isfinite(total)) or bool(np.isfinite(array).all())


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


def sampling_plan(geom: ConvGeometry, offset: np.ndarray, mask: Optional[np.ndarray], *, row_start: int,
                  first_image: int, group_rows: int, dtype, index_dtype, coordinate_corner: bool) -> SamplingPlan:
    """Sampling plan of every offset group for a block of the output, in one.

    The samples are ordered ``(image, output row, output column, kernel point, offset group)``,
    so that ``S @ X`` gives the columns ``(pixels, K, C)`` with channel ``g * C/G + c``: one
    sparse product over the block-diagonal operator of all the offset groups, rather than
    one per group (each group's rows index its own block of the stacked input).

    Parameters
    ----------
    geom : ConvGeometry
    offset, mask : ndarray
        ``offset`` and ``mask`` (or None) cut to the block: its images and its output rows,
        which start at output row ``row_start``.
    first_image : int
        Position of the block's first image among the images stacked in the input the
        indices point into, each on its grid (:mod:`.numpy_grid`).
    group_rows : int
        Rows of one offset group's stacked input; group ``g``'s rows start at ``g * group_rows``.
    dtype, index_dtype
        Floating type of the weights, integer type of the indices.
    coordinate_corner : bool
        Whether to compute :attr:`SamplingPlan.coordinate_corner` too.

    Non-finite offsets are defined behaviour (docs/semantics.md); the backend calls this,
    like all its numerical work, under an error state that does not warn about them.
    """
    images, rows = offset.shape[0], offset.shape[2]
    groups = geom.offset_groups
    samples_per_image = rows * geom.out_w * geom.kernel_points * groups
    input_rows = groups * group_rows
    _check_index_type(index_dtype, input_rows, images * samples_per_image)
    py, px = _sampling_positions(geom, offset, row_start, dtype)
    y0 = np.floor(py)
    x0 = np.floor(px)
    frac_y = py - y0
    frac_x = px - x0
    outside = (py <= -1) | (py >= geom.height) | (px <= -1) | (px >= geom.width)
    first_rows = _first_rows(geom, images, first_image, group_rows, index_dtype)
    if coordinate_corner:
        corner, read = _coordinate_corners(geom, y0, x0, outside, first_rows)
    else:
        corner, read = None, _read_corners(geom, y0, x0, outside, first_rows)
    wy, wx = _weight_factors(frac_y, frac_x, outside)
    flat_mask = _flat_mask(geom, mask, dtype)
    if flat_mask is not None:
        # The mask multiplies a factor zeroed at the early exit, so a NaN mask still poisons an
        # outside sample, as torchvision's mask * 0 does.
        wy = (wy[0] * flat_mask, wy[1] * flat_mask)
    return SamplingPlan(_corner_index(geom, read), _corner_weights(wy, wx), corner, frac_y, frac_x, flat_mask,
                        outside, input_rows)


@functools.lru_cache(maxsize=None)
def _largest(index_dtype) -> int:
    return int(np.iinfo(index_dtype).max)  # np.iinfo takes longer than the rest of the check


def _check_index_type(index_dtype, input_rows: int, samples: int) -> None:
    """Refuse an index type too small for the input's rows or the row pointers of ``samples`` samples.

    SciPy's kernels do not check bounds: an index or row pointer that wrapped around would
    read and write other memory.  The caller picks the type; this makes sure.
    """
    if max(input_rows, 4 * samples) > _largest(index_dtype):
        raise OverflowError(f"{np.dtype(index_dtype)} cannot index {input_rows} input rows and {samples} samples")


def _sampling_positions(geom: ConvGeometry, offset: np.ndarray, row_start: int, dtype) -> tuple:
    """Every sample's position ``(py, px)`` in the input, flat in plan order ``(image, row, column, K, G)``."""
    k, groups = geom.kernel_points, geom.offset_groups
    images, rows, cols = offset.shape[0], offset.shape[2], geom.out_w
    # offset[b, g*2K + 2k + {0: dy, 1: dx}, r, c] -> (b, r, c, k, g), rows in plan order
    pair = offset.reshape(images, groups, k, 2, rows, cols)
    dy = pair[:, :, :, 0].transpose(0, 3, 4, 2, 1).astype(dtype, copy=False)
    dx = pair[:, :, :, 1].transpose(0, 3, 4, 2, 1).astype(dtype, copy=False)
    base_y, base_x = _kernel_positions(geom, np.dtype(dtype))
    return (dy + base_y[row_start:row_start + rows]).ravel(), (dx + base_x).ravel()


@functools.lru_cache(maxsize=16)
def _kernel_positions(geom: ConvGeometry, dtype: np.dtype) -> tuple:
    """Where each kernel point of each output row and column samples without offset (read-only, shared).

    ``(base_y, base_x)``, shaped ``(H_out, 1, K, 1)`` and ``(1, W_out, K, 1)`` to broadcast
    against the offsets in plan order.
    """
    (stride_h, stride_w), (dil_h, dil_w) = geom.stride, geom.dilation
    ki, kj = np.divmod(np.arange(geom.kernel_points), geom.kernel_w)
    base_y = (np.arange(geom.out_h)[:, None] * stride_h - geom.padding[0] + ki * dil_h).astype(dtype)
    base_x = (np.arange(geom.out_w)[:, None] * stride_w - geom.padding[1] + kj * dil_w).astype(dtype)
    base_y, base_x = base_y[:, None, :, None], base_x[None, :, :, None]
    for array in (base_y, base_x):
        array.flags.writeable = False
    return base_y, base_x


def _first_rows(geom: ConvGeometry, images: int, first_image: int, group_rows: int, index_dtype) -> np.ndarray:
    """Row of the stacked input where each image's grid starts, per offset group: ``(images, 1, G)``.

    Broadcast against a plan's arrays shaped ``(images, samples per image and group, G)``.
    """
    image_starts = np.arange(first_image, first_image + images, dtype=index_dtype) * grid_pixels(geom)
    group_starts = np.arange(geom.offset_groups, dtype=index_dtype) * group_rows
    return image_starts[:, None, None] + group_starts


def _read_corners(geom: ConvGeometry, y0: np.ndarray, x0: np.ndarray, outside: np.ndarray,
                  first_rows: np.ndarray) -> np.ndarray:
    """Row of the stacked input holding the top-left corner each sample reads (see the module's docstring).

    Every sample that does not take the early exit has ``-1 <= y0 <= H - 1`` and
    ``-1 <= x0 <= W - 1``: its 2x2 block lies on the grid.  The others read the four border
    pixels at ``W + 1``.  Positions are clamped to the grid before the cast to integers
    (``fmax``/``fmin`` turn a NaN into a bound), so every index is valid; a NaN position's
    weights are NaN, so that sample is NaN whatever it reads.
    """
    grid_cols = padded_grid(geom)[1]
    gy = np.fmin(np.fmax(y0, -1), geom.height - 1).astype(first_rows.dtype)
    gx = np.fmin(np.fmax(x0, -1), geom.width - 1).astype(first_rows.dtype)
    np.multiply(gy, grid_cols, out=gy)
    gy += gx
    shaped = gy.reshape(first_rows.shape[0], -1, first_rows.shape[2])
    shaped += first_rows + (grid_cols + 1)  # the grid's rows and columns are the image's plus one
    np.copyto(shaped, first_rows + (geom.width + 1), where=outside.reshape(shaped.shape))
    return gy


def _coordinate_corners(geom: ConvGeometry, y0: np.ndarray, x0: np.ndarray, outside: np.ndarray,
                        first_rows: np.ndarray) -> tuple:
    """Each sample's top-left corner for the coordinate gradient, and the one it reads: ``(corner, read)``.

    ``corner`` is the top-left corner on the image's grid wherever the sample's 2x2 block lies on
    it, early exit or not (the coordinate gradient reads the corners on the lines ``py = -1`` and
    ``px = -1`` too), and the four border pixels at ``W + 1`` elsewhere; ``read`` is ``corner`` but
    for the early exit, which reads the border pixels (see the module's docstring).
    """
    height, width = geom.height, geom.width
    grid_cols = padded_grid(geom)[1]
    index_dtype = first_rows.dtype
    # The grid's rows and columns are the image's plus one.  Clamped, huge and infinite positions
    # cast safely and land off the grid.  A NaN position casts to an arbitrary integer, off the grid
    # or not; its weights are NaN, so the sample is NaN whatever it reads.
    gy = np.clip(y0, -2, height).astype(index_dtype) + 1
    gx = np.clip(x0, -2, width).astype(index_dtype) + 1
    unsigned = np.dtype(index_dtype).str.replace("i", "u")
    # One unsigned comparison tests 0 <= v <= n: the 2x2 block from (gy, gx) lies on the grid.
    on_grid = (gy.view(unsigned) <= height) & (gx.view(unsigned) <= width)
    np.multiply(gy, grid_cols, out=gy)
    gy += gx
    shape = (first_rows.shape[0], -1, first_rows.shape[2])
    gy.reshape(shape)[...] += first_rows
    border = first_rows + (width + 1)
    corner = gy
    np.copyto(corner.reshape(shape), border, where=~on_grid.reshape(shape))
    read = corner.copy()
    np.copyto(read.reshape(shape), border, where=outside.reshape(shape))
    return corner, read


def _corner_index(geom: ConvGeometry, read: np.ndarray) -> np.ndarray:
    """The four corners' rows of the stacked input, ``(N, 4)``, from the top-left ones."""
    grid_cols = padded_grid(geom)[1]
    index = np.empty((read.size, 4), dtype=read.dtype)
    # Column by column: NumPy's loops over a trailing axis of 4 run 4 elements per call.
    for q, (a, b) in enumerate(_CORNER_OFFSETS):
        np.add(read, a * grid_cols + b, out=index[:, q])
    return index


def _weight_factors(frac_y: np.ndarray, frac_x: np.ndarray, outside: np.ndarray) -> tuple:
    """``((1 - fy, fy), (1 - fx, fx))``, each an exact 0 at the early exit, even where it is NaN.

    Zeroed by clearing their bits: a bitwise AND on contiguous arrays is cheaper than a masked
    copy into each of the four columns of the weights.
    """
    bits = np.dtype(f"u{frac_y.dtype.itemsize}")
    keep = outside.astype(bits)
    keep -= 1  # all ones inside, zero outside
    factors = ((1 - frac_y, frac_y.copy()), (1 - frac_x, frac_x.copy()))
    for factor in (*factors[0], *factors[1]):
        np.bitwise_and(factor.view(bits), keep, out=factor.view(bits))
    return factors


def _corner_weights(wy: tuple, wx: tuple) -> np.ndarray:
    """``(N, 4)`` weights ``wy[a] * wx[b]`` of the corners ``(a, b)``."""
    weights = np.empty((wy[0].size, 4), dtype=wy[0].dtype)
    for q, (a, b) in enumerate(_CORNER_OFFSETS):
        np.multiply(wy[a], wx[b], out=weights[:, q])
    return weights


def _flat_mask(geom: ConvGeometry, mask: Optional[np.ndarray], dtype) -> Optional[np.ndarray]:
    """The mask flat in plan order, or None."""
    if mask is None:
        return None
    images, rows = mask.shape[0], mask.shape[2]
    # mask[b, g*K + k, r, c] -> (b, r, c, k, g)
    return (mask.reshape(images, geom.offset_groups, geom.kernel_points, rows, geom.out_w)
            .transpose(0, 3, 4, 2, 1).astype(dtype, copy=False).ravel())
