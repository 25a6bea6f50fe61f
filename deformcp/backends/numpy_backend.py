"""CPU backend: deformable convolution with NumPy and SciPy.

This is both the CPU implementation and the oracle the CUDA kernels are tested
against, so it follows ``docs/semantics.md`` to the letter.

How it works
------------
Bilinear sampling is linear in the input, so for one offset group the deformable
im2col of a tile of images is a sparse matrix ``S`` with four entries per row
(one row per sample ``(image, output pixel, kernel point)``, one column per input
pixel) applied to the channels-last input ``X``::

    columns = S @ X              # forward, one pass in scipy.sparse
    grad_X  = S.T @ grad_columns # the exact transpose, no scatter loops

The *sampling plan* (four corner indices and four weights per sample, the mask
folded in) is computed once per offset group and shared by all its channels.
Each convolution group is then one BLAS matrix product.  Every input image gets
one extra all-zero pixel, which corners outside the image point at, so no
branch is needed per corner.  Work is tiled under the workspace limit
(:mod:`deformcp.workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import scipy.sparse

from ..dtypes import compute_dtype
from ..geometry import ConvGeometry
from ..workspace import Tile, plan_tiles

__all__ = ["forward", "backward", "im2col"]

_ALL_GRADIENTS = frozenset({"x", "offset", "mask", "weight", "bias"})


@dataclass(frozen=True)
class SamplingPlan:
    """How every sample of one offset group in one tile reads the input.

    Rows are ordered ``(image, output row, output column, kernel point)``.
    Corners are ordered ``(y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)``.

    Attributes
    ----------
    corner_index : ndarray of int, shape (N, 4)
        Row of the stacked channels-last tile input each corner reads; the image's
        zero pixel where the corner lies outside the image.
    bilinear : ndarray, shape (N, 4)
        Bilinear weights, without the mask; 0 where the sample lies outside
        ``(-1, H) x (-1, W)`` or the corner outside the image; NaN where the
        sampling position is NaN.
    frac_y, frac_x : ndarray, shape (N,)
        ``py - floor(py)`` and ``px - floor(px)``, for the coordinate gradient.
    mask : ndarray, shape (N,), or None
    outside : ndarray of bool, shape (N,)
        Samples that read nothing (the early exit of the bilinear interpolation).
    zero_pixel : ndarray of int, shape (N,)
        Index of the zero pixel of each sample's image.
    n_columns : int
        Rows of the stacked channels-last tile input.
    """

    corner_index: np.ndarray
    bilinear: np.ndarray
    frac_y: np.ndarray
    frac_x: np.ndarray
    mask: Optional[np.ndarray]
    outside: np.ndarray
    zero_pixel: np.ndarray
    n_columns: int

    @cached_property
    def operator(self) -> scipy.sparse.csr_array:
        """The sparse sampling matrix ``S`` (rows: samples, columns: stacked input pixels).

        Outside samples read the zero pixel, so that a non-finite input value on the
        border of the image does not leak into a sample that torchvision never reads.
        A NaN mask still poisons them, as torchvision's ``mask * 0`` does.
        """
        index = np.where(self.outside[:, None], self.zero_pixel[:, None], self.corner_index)
        weights = self.bilinear if self.mask is None else self.bilinear * self.mask[:, None]
        rows = index.shape[0]
        indptr = np.arange(0, 4 * rows + 1, 4, dtype=index.dtype)
        return scipy.sparse.csr_array((weights.ravel(), index.ravel(), indptr), shape=(rows, self.n_columns))


def _sampling_plan(geom: ConvGeometry, tile: Tile, offset: np.ndarray, mask: Optional[np.ndarray],
                   group: int, dtype: np.dtype, index_dtype) -> SamplingPlan:
    """Sampling plan of offset group ``group`` for the tile (offset and mask already cut to it)."""
    kh, kw, k = geom.kernel_h, geom.kernel_w, geom.kernel_points
    height, width = geom.height, geom.width
    images, rows, cols = tile.images, tile.out_rows, geom.out_w
    (stride_h, stride_w), (dil_h, dil_w) = geom.stride, geom.dilation
    pad_top, pad_left = geom.padding[0], geom.padding[1]

    # offset[b, g*2K + 2k + {0: dy, 1: dx}, r, c] -> (b, r, c, k), rows in plan order
    pair = offset[:, group * 2 * k:(group + 1) * 2 * k].reshape(images, k, 2, rows, cols)
    dy = pair[:, :, 0].transpose(0, 2, 3, 1).astype(dtype, copy=False)
    dx = pair[:, :, 1].transpose(0, 2, 3, 1).astype(dtype, copy=False)
    out_y = np.arange(tile.row_start, tile.row_stop, dtype=dtype)[:, None, None]
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

    # Integer corner coordinates, clamped so that NaN and huge values cast safely;
    # a clamped value is always outside the image, so it is never read.
    y0i = np.clip(np.nan_to_num(y0, nan=-2.0), -2, height).astype(index_dtype)
    x0i = np.clip(np.nan_to_num(x0, nan=-2.0), -2, width).astype(index_dtype)
    y_in = ((y0i >= 0) & (y0i < height), (y0i >= -1) & (y0i < height - 1))
    x_in = ((x0i >= 0) & (x0i < width), (x0i >= -1) & (x0i < width - 1))

    pixels = height * width
    image_base = (np.arange(images, dtype=index_dtype) * (pixels + 1)).repeat(rows * cols * k)
    zero_pixel = image_base + pixels
    top_left = image_base + y0i * width + x0i
    corner_index = np.empty((py.size, 4), dtype=index_dtype)
    weights = np.empty((py.size, 4), dtype=dtype)
    wy = (1 - frac_y, frac_y)
    wx = (1 - frac_x, frac_x)
    for q, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        inside = y_in[a] & x_in[b]
        corner_index[:, q] = np.where(inside, top_left + (a * width + b), zero_pixel)
        # Multiplying by the flag (not selecting) keeps a NaN position NaN.
        weights[:, q] = wy[a] * wx[b] * inside
    weights[outside] = 0
    flat_mask = None
    if mask is not None:
        flat_mask = mask[:, group * k:(group + 1) * k].transpose(0, 2, 3, 1).astype(dtype, copy=False).ravel()
    return SamplingPlan(corner_index, weights, frac_y, frac_x, flat_mask, outside, zero_pixel,
                        images * (pixels + 1))


class _Tiler:
    """Shared per-call state: geometry, dtypes, channels-last inputs per tile, reshaped weights."""

    def __init__(self, geom: ConvGeometry, dtype, weight: Optional[np.ndarray]):
        self.geom = geom
        self.dtype = np.dtype(dtype)
        self.cdt = compute_dtype(dtype)
        self.pixels = geom.height * geom.width
        # scipy picks 32-bit indices when they fit; we choose the same up front.
        self.index_dtype = np.int32
        self._cached_batch = None
        self._cached_input = None
        if weight is not None:
            g = geom.groups
            # weight[o, c, i, j] -> per group (C_out/g, K*C/g) with columns ordered (k, c)
            self.wmat = (weight.astype(self.cdt, copy=False).transpose(0, 2, 3, 1)
                         .reshape(g, geom.out_channels_per_group, geom.kernel_points * geom.channels_per_group))

    def tiles(self, bytes_per_pixel: int, bytes_per_image: int):
        tiles = plan_tiles(self.geom.batch, self.geom.out_h, self.geom.out_w, bytes_per_pixel, bytes_per_image)
        limit = np.iinfo(np.int32).max
        for t in tiles:
            n = t.images * t.out_rows * self.geom.out_w * self.geom.kernel_points * 4
            if n >= limit or t.images * (self.pixels + 1) >= limit:
                self.index_dtype = np.int64
        return tiles

    def channels_last(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        """The tile's images as ``(G, images * (H*W + 1), C/G)``; the last pixel of each image is zero."""
        if self._cached_batch != (tile.batch_start, tile.batch_stop):
            g, geom = self.geom.offset_groups, self.geom
            cg = geom.channels_per_offset_group
            out = np.empty((g, tile.images, self.pixels + 1, cg), dtype=self.cdt)
            out[:, :, self.pixels] = 0
            out[:, :, :self.pixels] = x[tile.batch].reshape(tile.images, g, cg, self.pixels).transpose(1, 0, 3, 2)
            self._cached_batch = (tile.batch_start, tile.batch_stop)
            self._cached_input = out.reshape(g, tile.images * (self.pixels + 1), cg)
        return self._cached_input

    def plans(self, tile: Tile, offset: np.ndarray, mask: Optional[np.ndarray]):
        off = offset[tile.batch, :, tile.rows]
        msk = None if mask is None else mask[tile.batch, :, tile.rows]
        return [_sampling_plan(self.geom, tile, off, msk, g, self.cdt, self.index_dtype)
                for g in range(self.geom.offset_groups)]

    def columns(self, xl: np.ndarray, plans, tile: Tile) -> np.ndarray:
        """Deformable im2col of the tile as ``(samples_per_kernel_point, K, C)``, i.e. rows (b, r, c)."""
        geom = self.geom
        npix = tile.images * tile.out_rows * geom.out_w
        if geom.offset_groups == 1:
            cols = plans[0].operator @ xl[0]
            return cols.reshape(npix, geom.kernel_points, geom.in_channels)
        cols = np.empty((npix, geom.kernel_points, geom.in_channels), dtype=self.cdt)
        cg = geom.channels_per_offset_group
        for g, plan in enumerate(plans):
            part = plan.operator @ xl[g]
            cols[:, :, g * cg:(g + 1) * cg] = part.reshape(npix, geom.kernel_points, cg)
        return cols

    def per_group(self, cols: np.ndarray) -> np.ndarray:
        """``(npix, K, C)`` -> ``(groups, npix, K*C/groups)``, matching :attr:`wmat`'s columns."""
        geom = self.geom
        npix = cols.shape[0]
        if geom.groups == 1:
            return cols.reshape(1, npix, -1)
        cc = geom.channels_per_group
        split = cols.reshape(npix, geom.kernel_points, geom.groups, cc).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(split).reshape(geom.groups, npix, geom.kernel_points * cc)

    def from_groups(self, grouped: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`per_group`: ``(groups, npix, K*C/groups)`` -> ``(npix, K, C)``."""
        geom = self.geom
        npix = grouped.shape[1]
        if geom.groups == 1:
            return grouped.reshape(npix, geom.kernel_points, geom.in_channels)
        split = grouped.reshape(geom.groups, npix, geom.kernel_points, geom.channels_per_group)
        return np.ascontiguousarray(split.transpose(1, 2, 0, 3)).reshape(npix, geom.kernel_points, geom.in_channels)


def _bytes_per_pixel(geom: ConvGeometry, cdt: np.dtype, backward: bool) -> int:
    s = cdt.itemsize
    k, c = geom.kernel_points, geom.in_channels
    plan = k * geom.offset_groups * (4 * 8 + 4 * s + 4 * s + 4 * 8)  # indices, weights, fractions, temporaries
    forward = 2 * k * c * s + 2 * geom.out_channels * s  # columns (and their per-group copy), output
    if not backward:
        return plan + forward
    return plan + forward + 3 * k * c * s + geom.out_channels * s  # grad columns, gathered corners


def forward(geom: ConvGeometry, x, offset, mask, weight, bias) -> np.ndarray:
    """Deformable convolution on NumPy arrays; see :func:`deformcp.deform_conv2d`."""
    tiler = _Tiler(geom, x.dtype, weight)
    out = np.empty(geom.out_shape, dtype=x.dtype)
    s = tiler.cdt.itemsize
    tiles = tiler.tiles(_bytes_per_pixel(geom, tiler.cdt, False), (tiler.pixels + 1) * geom.in_channels * s)
    bias_c = None if bias is None else bias.astype(tiler.cdt, copy=False)
    for tile in tiles:
        xl = tiler.channels_last(x, tile)
        plans = tiler.plans(tile, offset, mask)
        cols = tiler.per_group(tiler.columns(xl, plans, tile))
        y = np.matmul(cols, tiler.wmat.transpose(0, 2, 1))  # (groups, npix, C_out/groups)
        y = y.transpose(1, 0, 2).reshape(tile.images, tile.out_rows, geom.out_w, geom.out_channels)
        if bias_c is not None:
            y = y + bias_c
        out[tile.batch, :, tile.rows] = y.transpose(0, 3, 1, 2)
    return out


def im2col(geom: ConvGeometry, x, offset, mask) -> np.ndarray:
    """Deformable im2col on NumPy arrays; see :func:`deformcp.deform_im2col`."""
    tiler = _Tiler(geom, x.dtype, None)
    k = geom.kernel_points
    out = np.empty((geom.batch, geom.in_channels, k, geom.out_h, geom.out_w), dtype=x.dtype)
    s = tiler.cdt.itemsize
    tiles = tiler.tiles(_bytes_per_pixel(geom, tiler.cdt, False), (tiler.pixels + 1) * geom.in_channels * s)
    for tile in tiles:
        xl = tiler.channels_last(x, tile)
        cols = tiler.columns(xl, tiler.plans(tile, offset, mask), tile)
        cols = cols.reshape(tile.images, tile.out_rows, geom.out_w, k, geom.in_channels)
        out[tile.batch, :, :, tile.rows] = cols.transpose(0, 4, 3, 1, 2)
    return out.reshape(geom.columns_shape)


def backward(geom: ConvGeometry, grad_out, x, offset, mask, weight, wrt=_ALL_GRADIENTS) -> dict:
    """The gradients named in ``wrt`` on NumPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    Returns a dict from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    """
    tiler = _Tiler(geom, x.dtype, weight)
    cdt = tiler.cdt
    k, cg = geom.kernel_points, geom.channels_per_offset_group
    need_cols_grad = bool(wrt & {"x", "offset", "mask"})
    need_coord = bool(wrt & {"offset", "mask"})
    grads = {}
    if "x" in wrt:
        grads["x"] = np.zeros(geom.x_shape, dtype=cdt)
    if "offset" in wrt:
        grads["offset"] = np.empty(geom.offset_shape, dtype=x.dtype)
    if "mask" in wrt and mask is not None:
        grads["mask"] = np.empty(geom.mask_shape, dtype=x.dtype)
    if "weight" in wrt:
        gw = np.zeros_like(tiler.wmat)
    if "bias" in wrt:
        grads["bias"] = grad_out.astype(cdt, copy=False).sum(axis=(0, 2, 3)).astype(x.dtype)
    if not (need_cols_grad or "weight" in wrt):
        return grads

    s = cdt.itemsize
    tiles = tiler.tiles(_bytes_per_pixel(geom, cdt, True), 2 * (tiler.pixels + 1) * geom.in_channels * s)
    for tile in tiles:
        npix = tile.images * tile.out_rows * geom.out_w
        go = (grad_out[tile.batch, :, tile.rows].transpose(0, 2, 3, 1).astype(cdt, copy=False)
              .reshape(npix, geom.groups, geom.out_channels_per_group).transpose(1, 0, 2))
        xl = tiler.channels_last(x, tile)
        plans = tiler.plans(tile, offset, mask)
        if "weight" in wrt:
            cols = tiler.per_group(tiler.columns(xl, plans, tile))
            gw += np.matmul(go.transpose(0, 2, 1), cols)
            del cols
        if not need_cols_grad:
            continue
        grad_cols = tiler.from_groups(np.matmul(go, tiler.wmat))  # (npix, K, C)
        gxl = np.zeros_like(xl) if "x" in wrt else None
        for g, plan in enumerate(plans):
            gcols = grad_cols[:, :, g * cg:(g + 1) * cg].reshape(npix * k, cg)
            if geom.offset_groups > 1:
                gcols = np.ascontiguousarray(gcols)
            if gxl is not None:
                gxl[g] = plan.operator.T @ gcols
            if need_coord:
                _coordinate_gradients(geom, tile, plan, xl[g], gcols, g, grads)
        if gxl is not None:
            pixels = tiler.pixels
            part = gxl.reshape(geom.offset_groups, tile.images, pixels + 1, cg)[:, :, :pixels]
            grads["x"][tile.batch] += part.transpose(1, 0, 3, 2).reshape(
                tile.images, geom.in_channels, geom.height, geom.width)

    if "x" in grads:
        grads["x"] = grads["x"].astype(x.dtype, copy=False)
    if "weight" in wrt:
        grads["weight"] = (gw.reshape(geom.out_channels, geom.kernel_h, geom.kernel_w, geom.channels_per_group)
                           .transpose(0, 3, 1, 2).astype(x.dtype))
    return grads


def _coordinate_gradients(geom: ConvGeometry, tile: Tile, plan: SamplingPlan, xg: np.ndarray,
                          gcols: np.ndarray, group: int, grads: dict) -> None:
    """Gradients of offset and mask for one offset group of one tile, written into ``grads``.

    ``s[q] = sum_c grad_column[c] * value[c, corner q]`` over the group's channels; the
    coordinate derivative uses every corner inside the image with no early exit (so it
    is non-zero exactly on the lines ``py = -1`` and ``px = -1``), as torchvision does.
    """
    k = geom.kernel_points
    s = np.empty((gcols.shape[0], 4), dtype=gcols.dtype)
    for q in range(4):
        s[:, q] = np.einsum("nc,nc->n", xg[plan.corner_index[:, q]], gcols)
    shape = (tile.images, tile.out_rows, geom.out_w, k)
    rows = tile.rows
    if "offset" in grads:
        fy, fx = plan.frac_y, plan.frac_x
        d_py = (1 - fx) * (s[:, 2] - s[:, 0]) + fx * (s[:, 3] - s[:, 1])
        d_px = (1 - fy) * (s[:, 1] - s[:, 0]) + fy * (s[:, 3] - s[:, 2])
        if plan.mask is not None:
            d_py *= plan.mask
            d_px *= plan.mask
        both = np.stack([d_py.reshape(shape), d_px.reshape(shape)], axis=-1)  # (b, r, c, K, 2)
        grads["offset"][tile.batch, group * 2 * k:(group + 1) * 2 * k, rows] = (
            both.transpose(0, 3, 4, 1, 2).reshape(tile.images, 2 * k, tile.out_rows, geom.out_w))
    if "mask" in grads:
        d_mask = np.einsum("nq,nq->n", plan.bilinear, s)
        grads["mask"][tile.batch, group * k:(group + 1) * k, rows] = d_mask.reshape(shape).transpose(0, 3, 1, 2)

