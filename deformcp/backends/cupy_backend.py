"""GPU backend: deformable convolution on CuPy arrays with the CUDA kernels of ``kernels/``.

How it works
------------
The kernels read the input channels-last (NHWC): one transposed copy of ``x``, none when
``x`` is already laid out so (a PyTorch ``channels_last`` tensor).  Per tile of images and
output rows (under the workspace limit), with ``g`` a convolution group::

    forward   columns  = sample(x, offset, mask)            # (images, pixels, row) in x's dtype
              out[tile, g] = weight'_g @ columns_g^T         # cuBLAS, straight into NCHW
    backward  columns  = sample(x, offset, mask)            # only for grad_weight
              grad_weight'_g += grad_out_g @ columns_g       # cuBLAS, one call per image
              grad_columns_g = grad_out_g^T @ weight'_g      # cuBLAS, (images, pixels, C*K)
              grad_offset, grad_mask, grad_x <- sample_backward(grad_columns, x)
              grad_x (deterministic=True) <- gather(grad_columns) over corners sorted by pixel

A column row holds, for each convolution group, its ``K*C/groups`` samples (kernel point
major, channel minor: a thread stores a vector of channels at once), then a column of ones
when there is a bias (its weight is the bias: the product adds it), padded to 16 bytes.
``weight'`` is the weight in that order, the bias appended.  The products take strided
views (:mod:`.cublas_products`): the output tile is a slice of NCHW with leading dimension
``H_out*W_out``, ``grad_out`` is read in place, transposed by the product.

Precision: the columns and ``grad_columns`` are held in the input's own type, so float16
and bfloat16 products run on tensor cores with float32 accumulation (one more rounding of
the sampled values than on the CPU, docs/semantics.md); float32 uses TF32 only with
``allow_tf32``.  ``grad_x`` and ``grad_weight`` accumulate in float32 for the half types.

Everything runs on the device of ``x`` and on CuPy's current stream, with no host
synchronisation.  Kernels use 32-bit index arithmetic unless an element count needs 64.

This module imports CuPy; :func:`deformcp.backends.backend_for_device` imports it only
when CUDA arrays arrive.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import cupy
import numpy as np

from ..geometry import ConvGeometry
from ..workspace import Tile, device_workspace_limit, plan_tiles
from .cublas_products import matmul
from .cuda_kernels import get_kernel, vector_widths

__all__ = ["forward", "backward", "im2col"]

_THREADS_PER_BLOCK = 256  # the kernels' dcn::kBlockThreads
# Enough resident blocks to fill every multiprocessor; the kernels loop over the rest.
_BLOCKS_PER_MULTIPROCESSOR = 8
_INT32_MAX = 2**31 - 1
# The narrowest index width used.  Tests set it to 64 to run the 64-bit instances on
# small problems; nothing else should change it.
_MIN_INDEX_BITS = 32
_VECTOR_BYTES = 16  # one 128-bit load or store
_ROW_ALIGNMENT = 8  # elements: every group's columns start on 16 bytes for the 16-bit types


@functools.lru_cache(maxsize=None)
def _device(device_id: int) -> Tuple[int, int]:
    """``(multiprocessors, total memory in bytes)`` of a device."""
    properties = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(properties["multiProcessorCount"]), int(properties["totalGlobalMem"])


class _Columns(NamedTuple):
    """Where column element (image, pixel, channel c, kernel point k) lives, as the kernels' strides.

    ``image * image + pixel * pixel + (c // group_channels) * group + k * point
    + (c % group_channels) * channel``.
    """

    image: int
    pixel: int
    group: int
    point: int
    channel: int


class _ProductLayout(NamedTuple):
    """The pixel-major column rows the products read: per group its samples, the ones column, padding."""

    samples: int  # K * C/groups, a group's samples of one pixel
    used: int     # the columns a product reads: samples, and the ones column if there is one
    width: int    # a group's columns, padded to _ROW_ALIGNMENT
    row: int      # a pixel's columns, all groups

    @classmethod
    def of(cls, geom: ConvGeometry, ones: bool) -> "_ProductLayout":
        samples = geom.kernel_points * geom.channels_per_group
        width = -(-(samples + ones) // _ROW_ALIGNMENT) * _ROW_ALIGNMENT
        return cls(samples, samples + ones, width, width * geom.groups)

    def columns(self, geom: ConvGeometry, pixels: int) -> _Columns:
        return _Columns(pixels * self.row, self.row, self.width, geom.channels_per_group, 1)


def _grad_columns(geom: ConvGeometry, pixels: int) -> _Columns:
    """``grad_columns``, ``(images, pixels, C*K)``: per pixel, each group's K*C/groups values."""
    row = geom.in_channels * geom.kernel_points
    group = geom.kernel_points * geom.channels_per_group
    return _Columns(pixels * row, row, group, geom.channels_per_group, 1)


def _unfold_columns(geom: ConvGeometry) -> _Columns:
    """``torch.nn.functional.unfold``'s ``(B, C*K, L)``: element ``(b, c*K + k, pixel)``."""
    pixels, points = geom.out_pixels, geom.kernel_points
    return _Columns(geom.in_channels * points * pixels, 1, geom.channels_per_group * points * pixels, pixels,
                    points * pixels)


def _lanes(vectors: int) -> int:
    """Threads per sample, as the kernels' dcn::lanes_for: the power of two covering ``vectors``, at most a block."""
    lanes = 1
    while lanes < _THREADS_PER_BLOCK and lanes < vectors:
        lanes *= 2
    return lanes


class _Launch:
    """What every kernel launch of one call shares: device, types, vector width, geometry arguments."""

    def __init__(self, geom: ConvGeometry, acc: np.dtype, x_nhwc):
        self.geom = geom
        self.device_id = int(x_nhwc.device.id)
        self.dtype = np.dtype(x_nhwc.dtype)
        self.acc = np.dtype(acc)
        multiprocessors, self.device_memory = _device(self.device_id)
        self.max_blocks = multiprocessors * _BLOCKS_PER_MULTIPROCESSOR
        self.index = np.int32 if _MIN_INDEX_BITS == 32 else np.int64
        # Channel vectors: as wide as the channel counts of both kinds of group and the
        # input's alignment allow (the buffers deformcp allocates are aligned).
        widest = vector_widths(self.dtype.name)[1]
        channels = math.gcd(geom.channels_per_group, geom.channels_per_offset_group)
        aligned = x_nhwc.data.ptr % _VECTOR_BYTES == 0
        self.vector = widest if channels % widest == 0 and aligned else 1
        self.lanes = _lanes(geom.channels_per_offset_group // self.vector)

    @property
    def workspace_limit(self) -> int:
        return device_workspace_limit(self.device_memory)

    def choose_index_width(self, *element_counts: int) -> None:
        """Use 64-bit indices if any count (or a loop step past it) could overflow int32."""
        headroom = self.max_blocks * _THREADS_PER_BLOCK
        if max(element_counts, default=0) > _INT32_MAX - headroom:
            self.index = np.int64

    @property
    def index_bits(self) -> int:
        return 8 * np.dtype(self.index).itemsize

    def sampling_args(self, tile: Tile, columns: _Columns) -> tuple:
        """The kernels' geometry and column-layout arguments, in the order of ``DCN_SAMPLING_PARAMS``."""
        g = self.geom
        values = (g.in_channels, g.height, g.width, g.kernel_h, g.kernel_w, g.stride[0], g.stride[1],
                  g.padding[0], g.padding[1], g.dilation[0], g.dilation[1], g.offset_groups, g.out_h, g.out_w,
                  tile.batch_start, tile.images, tile.row_start, tile.out_rows, g.channels_per_group, *columns)
        return tuple(self.index(v) for v in values)

    def samples(self, tile: Tile) -> int:
        g = self.geom
        return tile.images * tile.out_rows * g.out_w * g.offset_groups * g.kernel_points

    def run_samples(self, stage: str, tile: Tile, *args) -> None:
        """Launch a cooperative stage over the tile's samples, ``256 / lanes`` samples per block at a time."""
        samples = self.samples(tile)
        if samples == 0:
            return
        per_round = _THREADS_PER_BLOCK // self.lanes
        self._launch(stage, -(-samples // per_round), self.vector, args)

    def run_items(self, stage: str, items: int, *args, vector: int = 1) -> None:
        """Launch a grid-stride stage over ``items`` work items; nothing for an empty range."""
        if items:
            self._launch(stage, -(-items // _THREADS_PER_BLOCK), vector, args)

    def _launch(self, stage: str, blocks: int, vector: int, args: tuple) -> None:
        kernel = get_kernel(self.device_id, stage, self.dtype.name, self.index_bits, vector)
        kernel((min(blocks, self.max_blocks),), (_THREADS_PER_BLOCK,), args)


def _contiguous(*arrays):
    return tuple(None if a is None else cupy.ascontiguousarray(a) for a in arrays)


def _channels_last(x):
    """``x`` as a C-contiguous ``(B, H, W, C)`` array: a view of a channels-last ``x``, else one copy."""
    nhwc = x.transpose(0, 2, 3, 1)
    return nhwc if nhwc.flags.c_contiguous else cupy.ascontiguousarray(nhwc)


def _mask_args(launch: _Launch, offset, mask) -> tuple:
    # Without a mask the kernels never read it; any array of the right type fills the slot.
    return (offset, launch.index(0)) if mask is None else (mask, launch.index(1))


def _tile_pixels(geom: ConvGeometry, tile: Tile) -> int:
    return tile.out_rows * geom.out_w


def _sample(launch: _Launch, tile: Tile, x_nhwc, offset, mask, columns, layout: _Columns, ones_at: int = -1) -> None:
    """The ``sample`` stage: the tile's columns, with a column of ones at ``ones_at`` of each group if >= 0."""
    launch.run_samples("sample", tile, x_nhwc, offset, *_mask_args(launch, offset, mask), columns,
                       launch.index(ones_at), *launch.sampling_args(tile, layout))


def _packed_weight(geom: ConvGeometry, weight, bias, layout: _ProductLayout):
    """``(groups, C_out/groups, layout.width)``: each group's weight in column order, the bias after it.

    Columns past ``layout.used`` are padding that no product reads.
    """
    groups, per_group = geom.groups, geom.out_channels_per_group
    packed = cupy.empty((groups, per_group, layout.width), dtype=weight.dtype)
    # (C_out, C/g, kh, kw) -> (g, C_out/g, K * C/g): kernel point major, as the columns are.  Only
    # contiguous arrays are reshaped for a view that is written: a reshape may copy otherwise.
    packed[:, :, :layout.samples] = weight.reshape(groups, per_group, geom.channels_per_group, geom.kernel_points) \
        .transpose(0, 1, 3, 2).reshape(groups, per_group, layout.samples)
    if bias is not None:
        packed[:, :, layout.samples] = bias.reshape(groups, per_group)
    return packed


def forward(geom: ConvGeometry, acc: np.dtype, x, offset, mask, weight, bias, *, allow_tf32: bool = False):
    """Deformable convolution on CuPy arrays; see :func:`deformcp.deform_conv2d`."""
    offset, mask, weight, bias = _contiguous(offset, mask, weight, bias)
    with x.device:
        x_nhwc = _channels_last(x)
        launch = _Launch(geom, acc, x_nhwc)
        out = cupy.empty(geom.out_shape, dtype=launch.dtype)
        layout = _ProductLayout.of(geom, ones=bias is not None)
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, layout.row * launch.dtype.itemsize, 0,
                           limit=launch.workspace_limit)
        launch.choose_index_width(x_nhwc.size, offset.size,
                                  *(layout.row * t.images * _tile_pixels(geom, t) for t in tiles))
        packed = _packed_weight(geom, weight, bias, layout)
        # (B, groups, C_out/g, pixels): a view of the contiguous output, sliced per tile.
        out_groups = out.reshape(geom.batch, geom.groups, geom.out_channels_per_group, geom.out_pixels)
        for tile in tiles:
            pixels, first = _tile_pixels(geom, tile), tile.row_start * geom.out_w
            columns = cupy.empty((tile.images, pixels, layout.row), dtype=launch.dtype)
            _sample(launch, tile, x_nhwc, offset, mask, columns, layout.columns(geom, pixels),
                    layout.samples if bias is not None else -1)
            # out[image, group] (C_out/g, pixels) = weight'_g (C_out/g, used) @ columns[image, group]^T (used, pixels)
            columns_t = columns.reshape(tile.images, pixels, geom.groups, layout.width)[..., :layout.used]
            target = out_groups[tile.batch, :, :, first:first + pixels]
            _grouped_matmul(packed[None, :, :, :layout.used], columns_t.transpose(0, 2, 3, 1), target, allow_tf32)
    return out


def im2col(geom: ConvGeometry, acc: np.dtype, x, offset, mask):
    """Deformable im2col on CuPy arrays; see :func:`deformcp.deform_im2col`.

    The sampling kernel writes the result in unfold's layout directly, in ``x``'s dtype.
    """
    offset, mask = _contiguous(offset, mask)
    with x.device:
        x_nhwc = _channels_last(x)
        launch = _Launch(geom, acc, x_nhwc)
        out = cupy.empty(geom.columns_shape, dtype=launch.dtype)
        launch.choose_index_width(x_nhwc.size, offset.size, out.size)
        _sample(launch, Tile(0, geom.batch, 0, geom.out_h), x_nhwc, offset, mask, out, _unfold_columns(geom))
    return out


def backward(geom: ConvGeometry, acc: np.dtype, grad_out, x, offset, mask, weight, wrt: frozenset, *,
             deterministic: Optional[bool] = None, allow_tf32: bool = False) -> dict:
    """The gradients named in ``wrt`` on CuPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    ``deterministic=True`` computes ``grad_x`` by the gather of ``deform_gather.cu`` instead
    of atomic additions (the other gradients are deterministic either way).  Returns a dict
    from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    """
    grad_out, offset, mask, weight = _contiguous(grad_out, offset, mask, weight)
    with x.device:
        x_nhwc = _channels_last(x)
        launch = _Launch(geom, acc, x_nhwc)
        dtype = launch.dtype
        want = _Wanted.of(wrt, mask is not None, bool(deterministic))
        grads = {}
        layout = _ProductLayout.of(geom, ones=False)
        grad_x = cupy.zeros((geom.batch, geom.height, geom.width, geom.in_channels), dtype=launch.acc) \
            if want.x else None
        grad_w = cupy.empty((geom.groups, geom.out_channels_per_group, layout.used), dtype=launch.acc) \
            if want.weight else None
        if want.offset:
            grads["offset"] = cupy.empty(geom.offset_shape, dtype=dtype)
        if want.mask:
            grads["mask"] = cupy.empty(geom.mask_shape, dtype=dtype)
        wrote_weight = _backward_tiles(launch, want, layout, grad_out, x_nhwc, offset, mask, weight, grad_x, grad_w,
                                       grads.get("offset"), grads.get("mask"), allow_tf32)
        if grad_x is not None:
            grads["x"] = cupy.empty(geom.x_shape, dtype=dtype)
            grads["x"][...] = grad_x.transpose(0, 3, 1, 2)
        if grad_w is not None:
            if not wrote_weight:  # no product ran (an empty batch): nothing was summed
                grad_w.fill(0)
            groups, per_group = geom.groups, geom.out_channels_per_group
            grads["weight"] = cupy.empty(geom.weight_shape, dtype=dtype)
            grads["weight"].reshape(groups, per_group, geom.channels_per_group, geom.kernel_points)[...] = \
                grad_w[:, :, :layout.samples].reshape(groups, per_group, geom.kernel_points,
                                                      geom.channels_per_group).transpose(0, 1, 3, 2)
        if want.bias:
            grads["bias"] = grad_out.sum(axis=(0, 2, 3), dtype=launch.acc).astype(dtype, copy=False)
    return grads


@dataclass(frozen=True)
class _Wanted:
    """Which gradients one backward call computes, and how."""

    x: bool
    offset: bool
    mask: bool
    weight: bool
    bias: bool
    deterministic: bool

    @classmethod
    def of(cls, wrt: frozenset, has_mask: bool, deterministic: bool) -> "_Wanted":
        return cls("x" in wrt, "offset" in wrt, "mask" in wrt and has_mask, "weight" in wrt, "bias" in wrt,
                   deterministic)

    @property
    def grad_columns(self) -> bool:
        return self.x or self.offset or self.mask

    @property
    def atomic_x(self) -> bool:
        return self.x and not self.deterministic


def _backward_tiles(launch: _Launch, want: _Wanted, layout: _ProductLayout, grad_out, x_nhwc, offset, mask, weight,
                    grad_x, grad_w, grad_offset, grad_mask, allow_tf32: bool) -> bool:
    """Accumulate the gradients tile by tile; return whether any weight product ran."""
    geom = launch.geom
    item = launch.dtype.itemsize
    grad_row = geom.in_channels * geom.kernel_points
    per_pixel = item * ((layout.row if want.weight else 0) + (grad_row if want.grad_columns else 0))
    per_image = 0
    if want.x and want.deterministic:
        # Four corner entries per sample (key, coefficient, sorted order and key) and each pixel's start.
        per_pixel += 4 * geom.offset_groups * geom.kernel_points * (3 * 8 + launch.acc.itemsize)
        per_image = 8 * (geom.offset_groups * geom.height * geom.width + 1)
    tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, per_pixel, per_image, limit=launch.workspace_limit)
    counts = [x_nhwc.size, offset.size]
    for t in tiles:
        pixels = t.images * _tile_pixels(geom, t)
        counts += [layout.row * pixels, grad_row * pixels, 4 * launch.samples(t) + 4,
                   t.images * geom.offset_groups * geom.height * geom.width * geom.channels_per_offset_group]
    launch.choose_index_width(*counts)
    packed = _packed_weight(geom, weight, None, layout) if want.grad_columns else None
    grad_out_groups = grad_out.reshape(geom.batch, geom.groups, geom.out_channels_per_group, geom.out_pixels)
    groups = geom.groups
    mask_args = _mask_args(launch, offset, mask)
    wrote_weight = False
    for tile in tiles:
        pixels, first = _tile_pixels(geom, tile), tile.row_start * geom.out_w
        if want.weight:
            columns = cupy.empty((tile.images, pixels, layout.row), dtype=launch.dtype)
            _sample(launch, tile, x_nhwc, offset, mask, columns, layout.columns(geom, pixels))
            for i in range(tile.images):
                # grad_w'_g += grad_out_g (C_out/g, pixels) @ columns_g (pixels, K*C/g): a batch over groups.
                grad_out_i = grad_out_groups[tile.batch_start + i, :, :, first:first + pixels]
                columns_i = columns[i].reshape(pixels, groups, layout.width).transpose(1, 0, 2)[:, :, :layout.used]
                matmul(grad_out_i, columns_i, grad_w, accumulate=wrote_weight, allow_tf32=allow_tf32)
                wrote_weight = True
            del columns
        if not want.grad_columns:
            continue
        grad_layout = _grad_columns(geom, pixels)
        grad_columns = cupy.empty((tile.images, pixels, grad_row), dtype=launch.dtype)
        # grad_columns[image, group] (pixels, K*C/g) = grad_out[image, group]^T (pixels, C_out/g) @ weight'_g
        grad_out_t = grad_out_groups[tile.batch, :, :, first:first + pixels]
        _grouped_matmul(grad_out_t.transpose(0, 1, 3, 2), packed[None, :, :, :layout.samples],
                        grad_columns.reshape(tile.images, pixels, groups, layout.samples).transpose(0, 2, 1, 3),
                        allow_tf32)
        sampling = launch.sampling_args(tile, grad_layout)
        if want.offset or want.mask or want.atomic_x:
            launch.run_samples("sample_backward", tile, grad_columns, x_nhwc, offset, *mask_args,
                               grad_x if want.atomic_x else _nothing(launch), launch.index(want.atomic_x),
                               offset if grad_offset is None else grad_offset, launch.index(want.offset),
                               offset if grad_mask is None else grad_mask, launch.index(want.mask), *sampling)
        if want.x and want.deterministic:
            _gather_grad_x(launch, tile, offset, mask_args, grad_columns, grad_x, sampling)
    return wrote_weight


def _grouped_matmul(a, b, out, allow_tf32: bool) -> None:
    """``out[i, g] = a[i, g] @ b[i, g]`` for views of shape ``(images or 1, groups, rows, cols)``.

    One cuBLAS call per group, batched over the images, or per image, batched over the
    groups, whichever makes fewer calls (a depthwise convolution has many groups).  An
    operand with one image is repeated over the images (the weight).
    """
    images, groups = out.shape[:2]
    if groups <= images:
        for g in range(groups):
            matmul(a[:, g], b[:, g], out[:, g], allow_tf32=allow_tf32)
    else:
        for i in range(images):
            matmul(a[min(i, a.shape[0] - 1)], b[min(i, b.shape[0] - 1)], out[i], allow_tf32=allow_tf32)


def _nothing(launch: _Launch):
    """A one-element accumulator for a kernel's pointer argument it will not touch."""
    return cupy.empty((1,), dtype=launch.acc)


def _gather_grad_x(launch: _Launch, tile: Tile, offset, mask_args: tuple, grad_columns, grad_x, sampling: tuple):
    """Add the tile's contributions to ``grad_x`` (NHWC) pixel by pixel, in sample order: no atomics."""
    geom = launch.geom
    entries = 4 * launch.samples(tile)
    if entries == 0:
        return
    keys = cupy.empty((entries,), dtype=launch.index)
    coefficients = cupy.empty((entries,), dtype=launch.acc)
    launch.run_items("gather_keys", launch.samples(tile), offset, *mask_args, keys, coefficients, *sampling)
    order = cupy.argsort(keys)  # CuPy's sort is stable: each pixel's entries stay in sample order
    targets = tile.images * geom.offset_groups * geom.height * geom.width
    starts = cupy.searchsorted(keys[order], cupy.arange(targets + 1, dtype=launch.index))
    items = targets * (geom.channels_per_offset_group // launch.vector)
    launch.run_items("gather", items, launch.index(items), starts, order, coefficients, grad_columns, grad_x,
                     *sampling, vector=launch.vector)
