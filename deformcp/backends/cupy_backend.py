"""GPU backend: deformable convolution on CuPy arrays with the CUDA kernels of ``kernels/``.

How it works
------------
Three kernels (see ``docs/cuda.md``) do the sampling; the convolution itself is a batched
matrix product per weight group through ``cupy.matmul`` (cuBLAS)::

    forward   columns = im2col(x, offset, mask)             # (images, C*K, pixels)
              out     = weight_g @ columns_g                 # per group, broadcast over images
    backward  grad_columns = weight_g^T @ grad_out_g         # (C*K, images, pixels)
              grad_x              <- col2im(grad_columns)    # scatter, atomic adds
              grad_offset, grad_mask <- col2im_coord(grad_columns, x)
              grad_weight += grad_out_g @ columns_g^T

The column matrix is held in the accumulation type (float32 for float16 and bfloat16),
so half-precision results are rounded once, at the end.  Work is split into tiles of
images and output rows under the workspace limit (:mod:`deformcp.workspace`).

Everything runs on the device of ``x`` and on CuPy's current stream, with no host
synchronisation.  Kernels use 32-bit index arithmetic unless an element count needs 64.

This module imports CuPy; :func:`deformcp.backends.backend_for_device` imports it only
when CUDA arrays arrive.
"""

from __future__ import annotations

import functools
from typing import Optional

import cupy
import numpy as np

from ..dtypes import is_half
from ..geometry import ConvGeometry
from ..workspace import Tile, plan_tiles
from .cuda_kernels import get_kernel

__all__ = ["forward", "backward", "im2col"]

_THREADS_PER_BLOCK = 256
# Enough resident blocks to fill every multiprocessor; the grid-stride loops do the rest.
_BLOCKS_PER_MULTIPROCESSOR = 8
_INT32_MAX = 2**31 - 1
# The narrowest index width used.  Tests set it to 64 to run the 64-bit instances on
# small problems; nothing else should change it.
_MIN_INDEX_BITS = 32


@functools.lru_cache(maxsize=None)
def _max_blocks(device_id: int) -> int:
    properties = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(properties["multiProcessorCount"]) * _BLOCKS_PER_MULTIPROCESSOR


class _Launch:
    """What every kernel launch of one call shares: device, types, geometry arguments."""

    def __init__(self, geom: ConvGeometry, acc: np.dtype, x):
        self.geom = geom
        self.device_id = int(x.device.id)
        self.dtype = np.dtype(x.dtype)
        self.acc = acc
        self.max_blocks = _max_blocks(self.device_id)
        self.index = np.int32 if _MIN_INDEX_BITS == 32 else np.int64

    def choose_index_width(self, *element_counts: int) -> None:
        """Use 64-bit indices if any count (or a grid-stride step past it) could overflow int32."""
        headroom = self.max_blocks * _THREADS_PER_BLOCK
        if max(element_counts, default=0) > _INT32_MAX - headroom:
            self.index = np.int64

    @property
    def index_bits(self) -> int:
        return 8 * np.dtype(self.index).itemsize

    def geometry_args(self, tile: Tile, col_batch_stride: int, col_row_stride: int) -> tuple:
        """The kernels' geometry arguments, in the order of ``DCN_GEOMETRY_PARAMS``."""
        g = self.geom
        values = (g.in_channels, g.height, g.width, g.kernel_h, g.kernel_w, g.stride[0], g.stride[1],
                  g.padding[0], g.padding[1], g.dilation[0], g.dilation[1], g.offset_groups, g.out_h, g.out_w,
                  tile.batch_start, tile.images, tile.row_start, tile.out_rows, col_batch_stride, col_row_stride)
        return tuple(self.index(v) for v in values)

    def run(self, stage: str, work_items: int, *args) -> None:
        """Launch ``stage`` over ``work_items`` threads' worth of work; nothing for an empty range."""
        if work_items == 0:
            return
        blocks = min(-(-work_items // _THREADS_PER_BLOCK), self.max_blocks)
        kernel = get_kernel(self.device_id, stage, self.dtype.name, self.index_bits)
        kernel((blocks,), (_THREADS_PER_BLOCK,), (self.index(work_items),) + args)


def _contiguous(*arrays):
    return tuple(None if a is None else cupy.ascontiguousarray(a) for a in arrays)


def _mask_args(launch: _Launch, offset, mask) -> tuple:
    # Without a mask the kernels never read it; any array of the right type fills the slot.
    return (offset, launch.index(0)) if mask is None else (mask, launch.index(1))


def _tile_pixels(geom: ConvGeometry, tile: Tile) -> int:
    return tile.out_rows * geom.out_w


def _im2col_into(launch: _Launch, tile: Tile, x, offset, mask, columns, col_batch_stride: int,
                 col_row_stride: int) -> None:
    geom = launch.geom
    work = tile.images * geom.in_channels * _tile_pixels(geom, tile)
    launch.run("im2col", work, x, offset, *_mask_args(launch, offset, mask), columns,
               *launch.geometry_args(tile, col_batch_stride, col_row_stride))


def _weight_matrix(launch: _Launch, weight):
    """``weight`` as ``(groups, C_out/groups, C/groups * K)`` in the accumulation type."""
    geom = launch.geom
    return weight.astype(launch.acc, copy=False).reshape(
        geom.groups, geom.out_channels_per_group, geom.channels_per_group * geom.kernel_points)


def forward(geom: ConvGeometry, acc: np.dtype, x, offset, mask, weight, bias):
    """Deformable convolution on CuPy arrays; see :func:`deformcp.deform_conv2d`."""
    x, offset, mask, weight = _contiguous(x, offset, mask, weight)
    with x.device:
        launch = _Launch(geom, acc, x)
        out = cupy.empty(geom.out_shape, dtype=launch.dtype)
        rows = geom.in_channels * geom.kernel_points
        s = launch.acc.itemsize
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, (rows + geom.out_channels) * s, 0)
        launch.choose_index_width(x.size, offset.size, *(rows * t.images * _tile_pixels(geom, t) for t in tiles))
        wmat = _weight_matrix(launch, weight)
        bias_acc = None if bias is None else bias.astype(launch.acc, copy=False).reshape(-1, 1, 1)
        for tile in tiles:
            pixels = _tile_pixels(geom, tile)
            columns = cupy.empty((tile.images, rows, pixels), dtype=launch.acc)
            _im2col_into(launch, tile, x, offset, mask, columns, rows * pixels, pixels)
            grouped = columns.reshape(tile.images, geom.groups, rows // geom.groups, pixels)
            y = cupy.matmul(wmat, grouped).reshape(tile.images, geom.out_channels, tile.out_rows, geom.out_w)
            if bias_acc is not None:
                y += bias_acc
            out[tile.batch, :, tile.rows] = y.astype(launch.dtype, copy=False)
    return out


def im2col(geom: ConvGeometry, acc: np.dtype, x, offset, mask):
    """Deformable im2col on CuPy arrays; see :func:`deformcp.deform_im2col`."""
    x, offset, mask = _contiguous(x, offset, mask)
    with x.device:
        launch = _Launch(geom, acc, x)
        out = cupy.empty(geom.columns_shape, dtype=launch.dtype)
        rows, pixels = geom.in_channels * geom.kernel_points, geom.out_pixels
        if not is_half(launch.dtype):
            # The result is the column matrix itself: written in place, no scratch space.
            launch.choose_index_width(x.size, offset.size, out.size)
            _im2col_into(launch, Tile(0, geom.batch, 0, geom.out_h), x, offset, mask, out, rows * pixels, pixels)
            return out
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, rows * launch.acc.itemsize, 0)
        launch.choose_index_width(x.size, offset.size, *(rows * t.images * _tile_pixels(geom, t) for t in tiles))
        for tile in tiles:
            tile_pixels = _tile_pixels(geom, tile)
            columns = cupy.empty((tile.images, rows, tile_pixels), dtype=launch.acc)
            _im2col_into(launch, tile, x, offset, mask, columns, rows * tile_pixels, tile_pixels)
            first = tile.row_start * geom.out_w
            out[tile.batch, :, first:first + tile_pixels] = columns.astype(launch.dtype)
    return out


def backward(geom: ConvGeometry, acc: np.dtype, grad_out, x, offset, mask, weight, wrt: frozenset) -> dict:
    """The gradients named in ``wrt`` on CuPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    Returns a dict from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    """
    grad_out, x, offset, mask, weight = _contiguous(grad_out, x, offset, mask, weight)
    with x.device:
        launch = _Launch(geom, acc, x)
        dtype = launch.dtype
        grads = {}
        if "bias" in wrt:
            grads["bias"] = grad_out.astype(acc, copy=False).sum(axis=(0, 2, 3)).astype(dtype, copy=False)
        want_offset = "offset" in wrt
        want_mask = "mask" in wrt and mask is not None
        grad_x = cupy.zeros(geom.x_shape, dtype=acc) if "x" in wrt else None
        if want_offset:
            grads["offset"] = cupy.empty(geom.offset_shape, dtype=dtype)
        if want_mask:
            grads["mask"] = cupy.empty(geom.mask_shape, dtype=dtype)
        wmat = _weight_matrix(launch, weight)
        grad_w = cupy.zeros(wmat.shape, dtype=acc) if "weight" in wrt else None
        if grad_x is not None or want_offset or want_mask or grad_w is not None:
            _backward_tiles(launch, grad_out, x, offset, mask, wmat, grad_x, grad_w,
                            grads.get("offset"), grads.get("mask"))
        if grad_x is not None:
            grads["x"] = grad_x.astype(dtype, copy=False)
        if grad_w is not None:
            grads["weight"] = grad_w.reshape(geom.weight_shape).astype(dtype, copy=False)
    return grads


def _backward_tiles(launch: _Launch, grad_out, x, offset, mask, wmat, grad_x, grad_w,
                    grad_offset: Optional[object], grad_mask: Optional[object]) -> None:
    """Accumulate the gradients tile by tile; the column matrices are ``(C*K, images, pixels)``."""
    geom = launch.geom
    rows = geom.in_channels * geom.kernel_points
    s = launch.acc.itemsize
    tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, 2 * (rows + geom.out_channels) * s, 0)
    launch.choose_index_width(x.size, offset.size, *(rows * t.images * _tile_pixels(geom, t) for t in tiles))
    per_group = rows // geom.groups
    want_coord = grad_offset is not None or grad_mask is not None
    mask_args = _mask_args(launch, offset, mask)
    for tile in tiles:
        pixels = _tile_pixels(geom, tile)
        span = tile.images * pixels
        strides = (pixels, span)  # column (image b, row r, pixel p) at b*pixels + r*span + p
        # grad_out of the tile as (groups, C_out/groups, images * pixels)
        go = cupy.ascontiguousarray(grad_out[tile.batch, :, tile.rows].astype(launch.acc, copy=False)
                                    .transpose(1, 0, 2, 3)).reshape(geom.groups, geom.out_channels_per_group, span)
        if grad_w is not None:
            columns = cupy.empty((rows, tile.images, pixels), dtype=launch.acc)
            _im2col_into(launch, tile, x, offset, mask, columns, *strides)
            grad_w += cupy.matmul(go, columns.reshape(geom.groups, per_group, span).transpose(0, 2, 1))
            del columns
        if grad_x is None and not want_coord:
            continue
        grad_columns = cupy.matmul(wmat.transpose(0, 2, 1), go)  # (groups, C/groups * K, span)
        geometry = launch.geometry_args(tile, *strides)
        if grad_x is not None:
            launch.run("col2im", rows * span, grad_columns, offset, *mask_args, grad_x, *geometry)
        if want_coord:
            launch.run("col2im_coord", geom.offset_groups * geom.kernel_points * span, grad_columns, x, offset,
                       *mask_args,
                       offset if grad_offset is None else grad_offset, launch.index(grad_offset is not None),
                       offset if grad_mask is None else grad_mask, launch.index(grad_mask is not None),
                       *geometry)
