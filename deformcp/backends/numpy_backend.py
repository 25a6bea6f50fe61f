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

import functools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Deque, Iterator, List, Optional

import numpy as np
import scipy.sparse
from threadpoolctl import ThreadpoolController

from ..dtypes import compute_dtype
from ..geometry import ConvGeometry
from ..workspace import Tile, get_workspace_limit, plan_tiles

__all__ = ["forward", "backward", "im2col"]

_CORNER_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class SamplingPlan:
    """How every sample of one offset group in one tile reads the input.

    Rows are ordered ``(image, output row, output column, kernel point)``.
    Corners are ordered ``(y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)``.

    Attributes
    ----------
    index : ndarray of int, shape (N, 4)
        Row of the stacked channels-last tile input each corner reads: the image's
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
        Rows of the stacked channels-last tile input.
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
    def operator(self) -> scipy.sparse.csr_array:
        """The sparse sampling matrix ``S`` (rows: samples, columns: stacked input pixels).

        The mask multiplies the weights after the early exit zeroed them, so a NaN mask
        still poisons an outside sample, as torchvision's ``mask * 0`` does.
        """
        weights = self.bilinear if self.mask is None else self.bilinear * self.mask[:, None]
        rows = self.index.shape[0]
        indptr = np.arange(0, 4 * rows + 1, 4, dtype=self.index.dtype)
        return scipy.sparse.csr_array((weights.ravel(), self.index.ravel(), indptr), shape=(rows, self.n_columns))


# Non-finite offsets are defined behaviour (docs/semantics.md), not numerical accidents to warn about.
@np.errstate(invalid="ignore")
def _sampling_plan(geom: ConvGeometry, tile: Tile, offset: np.ndarray, mask: Optional[np.ndarray],
                   group: int, dtype: np.dtype, index_dtype, coordinate_index: bool) -> SamplingPlan:
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
    image_base = (np.arange(images, dtype=index_dtype) * (pixels + 1)).repeat(rows * cols * k)
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
    return SamplingPlan(index, bilinear, coord, frac_y, frac_x, flat_mask, outside, images * (pixels + 1))


class _Call:
    """State shared by the tiles of one call: geometry, dtypes, the weight as per-group matrices."""

    def __init__(self, geom: ConvGeometry, dtype, weight: Optional[np.ndarray]):
        self.geom = geom
        self.dtype = np.dtype(dtype)
        self.cdt = compute_dtype(dtype)
        self.pixels = geom.height * geom.width
        # scipy's sparse products are fastest with 32-bit indices; 64-bit only when a count needs it.
        self.index_dtype = np.int32
        self._lock = threading.Lock()
        self._inputs: dict = {}
        if weight is not None:
            # weight[o, c, i, j] -> per group (C_out/g, K*C/g), columns ordered (k, c) like the columns
            self.wmat = (weight.astype(self.cdt, copy=False).transpose(0, 2, 3, 1)
                         .reshape(geom.groups, geom.out_channels_per_group,
                                  geom.kernel_points * geom.channels_per_group))

    def tiles(self, backward: bool) -> List[Tile]:
        """Tiles under the workspace limit shared among the worker threads, at least one per worker."""
        geom, s = self.geom, self.cdt.itemsize
        k, c, cout = geom.kernel_points, geom.in_channels, geom.out_channels
        # indices, weights, fractions and their temporaries; columns and a per-group copy; the output
        per_pixel = k * geom.offset_groups * (8 * 8 + 8 * s) + 2 * k * c * s + 2 * cout * s
        per_image = (self.pixels + 1) * c * s
        if backward:  # gradient columns and gathered corners; the input gradient
            per_pixel += 3 * k * c * s + cout * s
            per_image *= 2
        workers = _workers()
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, per_pixel, per_image,
                           limit=max(1, get_workspace_limit() // workers), min_tiles=workers)
        limit = np.iinfo(np.int32).max
        if any(t.images * t.out_rows * geom.out_w * k * 4 >= limit or t.images * (self.pixels + 1) >= limit
               for t in tiles):
            self.index_dtype = np.int64
        return tiles

    def channels_last(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        """The tile's images as ``(G, images * (H*W + 1), C/G)``; the last pixel of each image is zero.

        Row bands of one image share one copy: the first band to ask makes it, and it is
        dropped once the tiles have moved past that image (tiles come in batch order).
        """
        key = (tile.batch_start, tile.batch_stop)
        with self._lock:
            entry = self._inputs.get(key)
            if entry is None:
                for old in [k for k in self._inputs if k[1] <= tile.batch_start]:
                    del self._inputs[old]
                entry = self._inputs[key] = _Lazy(lambda: self._channels_last(x, tile))
        return entry.get()

    def _channels_last(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        geom = self.geom
        g, cg = geom.offset_groups, geom.channels_per_offset_group
        out = np.empty((g, tile.images, self.pixels + 1, cg), dtype=self.cdt)
        out[:, :, self.pixels] = 0
        out[:, :, :self.pixels] = x[tile.batch].reshape(tile.images, g, cg, self.pixels).transpose(1, 0, 3, 2)
        return out.reshape(g, tile.images * (self.pixels + 1), cg)

    def plans(self, tile: Tile, offset: np.ndarray, mask: Optional[np.ndarray],
              coordinate_index: bool = False) -> List[SamplingPlan]:
        off = offset[tile.batch, :, tile.rows]
        msk = None if mask is None else mask[tile.batch, :, tile.rows]
        return [_sampling_plan(self.geom, tile, off, msk, g, self.cdt, self.index_dtype, coordinate_index)
                for g in range(self.geom.offset_groups)]

    def columns(self, xl: np.ndarray, plans: List[SamplingPlan], tile: Tile) -> np.ndarray:
        """Deformable im2col of the tile as ``(pixels, K, C)``, pixels ordered (image, row, column)."""
        geom = self.geom
        npix = tile.images * tile.out_rows * geom.out_w
        if geom.offset_groups == 1:
            return (plans[0].operator @ xl[0]).reshape(npix, geom.kernel_points, geom.in_channels)
        cols = np.empty((npix, geom.kernel_points, geom.in_channels), dtype=self.cdt)
        cg = geom.channels_per_offset_group
        for g, plan in enumerate(plans):
            cols[:, :, g * cg:(g + 1) * cg] = (plan.operator @ xl[g]).reshape(npix, geom.kernel_points, cg)
        return cols

    def per_group(self, cols: np.ndarray, tile: Tile) -> np.ndarray:
        """``(pixels, K, C)`` -> ``(groups, images, pixels per image, K*C/groups)``, :attr:`wmat`'s columns."""
        geom = self.geom
        shape = (geom.groups, tile.images, tile.out_rows * geom.out_w, geom.kernel_points * geom.channels_per_group)
        if geom.groups == 1:
            return cols.reshape(shape)
        split = cols.reshape(-1, geom.kernel_points, geom.groups, geom.channels_per_group).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(split).reshape(shape)

    def from_groups(self, grouped: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`per_group`: ``(images, groups, pixels per image, K*C/groups)`` -> ``(pixels, K, C)``."""
        geom = self.geom
        k, cc = geom.kernel_points, geom.channels_per_group
        if geom.groups == 1:
            return grouped.reshape(-1, k, geom.in_channels)
        split = grouped.reshape(grouped.shape[0], geom.groups, -1, k, cc).transpose(0, 2, 3, 1, 4)
        return np.ascontiguousarray(split).reshape(-1, k, geom.in_channels)


class _Lazy:
    """A value computed once, by the first thread that asks; the others wait for it."""

    def __init__(self, make: Callable[[], np.ndarray]):
        self._make = make
        self._lock = threading.Lock()
        self._value: Optional[np.ndarray] = None

    def get(self) -> np.ndarray:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value


def _tile_view(array: np.ndarray, tile: Tile, groups: int) -> np.ndarray:
    """``array[tile.batch, :, tile.rows]`` of an NCHW array as ``(images, groups, C/groups, rows*W)``, a view."""
    view = array[tile.batch, :, tile.rows]
    # Assigning .shape (unlike reshape) raises instead of silently copying.
    view.shape = (tile.images, groups, view.shape[1] // groups, tile.out_rows * array.shape[3])
    return view


def _workers() -> int:
    """Threads the CPU backend runs tiles on: ``DEFORMCP_NUM_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("DEFORMCP_NUM_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _map_tiles(fn: Callable[[Tile], object], tiles: List[Tile]) -> Iterator[object]:
    """``fn(tile)`` for every tile on the worker threads, yielded in tile order.

    The sparse products, BLAS and NumPy's large element-wise loops release the GIL,
    so tiles run concurrently.  At most one tile per worker is in flight, which keeps
    the scratch space under the workspace limit; yielding in order keeps the sums over
    tiles in a fixed order, so results do not depend on thread timing.
    """
    global _pool
    workers = _workers()
    if workers == 1 or len(tiles) == 1:
        yield from map(fn, tiles)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deformcp")
        pool = _pool
    # One BLAS thread per tile thread: with BLAS's own pool on top, the cores are
    # oversubscribed and its spinning workers starve the tiles (fwd+bwd 1.6x slower).
    with _blas_threads(1):
        pending: Deque = deque()
        for tile in tiles:
            pending.append(pool.submit(fn, tile))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@functools.lru_cache(maxsize=None)
def _blas_controller() -> ThreadpoolController:
    # Built once: finding the loaded BLAS libraries walks the process's shared objects.
    return ThreadpoolController()


def _blas_threads(n: int):
    """Context manager limiting the BLAS libraries NumPy and SciPy use to ``n`` threads."""
    return _blas_controller().limit(limits=n, user_api="blas")


def forward(geom: ConvGeometry, x, offset, mask, weight, bias) -> np.ndarray:
    """Deformable convolution on NumPy arrays; see :func:`deformcp.deform_conv2d`."""
    call = _Call(geom, x.dtype, weight)
    out = np.empty(geom.out_shape, dtype=x.dtype)
    bias_c = None if bias is None else bias.astype(call.cdt, copy=False).reshape(
        geom.groups, geom.out_channels_per_group, 1)
    direct = call.cdt == out.dtype

    def run(tile: Tile) -> None:
        cols = call.per_group(call.columns(call.channels_last(x, tile), call.plans(tile, offset, mask), tile), tile)
        # (groups, Cout/g, K*C/g) @ (images, groups, K*C/g, pixels) -> (images, groups, Cout/g, pixels):
        # BLAS reads the transposed columns in place and writes NCHW directly.
        target = _tile_view(out, tile, geom.groups)
        y = np.matmul(call.wmat, cols.transpose(1, 0, 3, 2), out=target if direct else None)
        if bias_c is not None:
            y += bias_c
        if not direct:
            target[...] = y

    for _ in _map_tiles(run, call.tiles(backward=False)):
        pass
    return out


def im2col(geom: ConvGeometry, x, offset, mask) -> np.ndarray:
    """Deformable im2col on NumPy arrays; see :func:`deformcp.deform_im2col`."""
    call = _Call(geom, x.dtype, None)
    k = geom.kernel_points
    out = np.empty((geom.batch, geom.in_channels, k, geom.out_h, geom.out_w), dtype=x.dtype)

    def run(tile: Tile) -> None:
        cols = call.columns(call.channels_last(x, tile), call.plans(tile, offset, mask), tile)
        cols = cols.reshape(tile.images, tile.out_rows, geom.out_w, k, geom.in_channels)
        out[tile.batch, :, :, tile.rows] = cols.transpose(0, 4, 3, 1, 2)

    for _ in _map_tiles(run, call.tiles(backward=False)):
        pass
    return out.reshape(geom.columns_shape)


def backward(geom: ConvGeometry, grad_out, x, offset, mask, weight, wrt: frozenset) -> dict:
    """The gradients named in ``wrt`` on NumPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    Returns a dict from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    """
    call = _Call(geom, x.dtype, weight)
    cdt = call.cdt
    k, cg = geom.kernel_points, geom.channels_per_offset_group
    need_cols_grad = bool(wrt & {"x", "offset", "mask"})
    grads = {}
    if "offset" in wrt:
        grads["offset"] = np.empty(geom.offset_shape, dtype=x.dtype)
    if "mask" in wrt and mask is not None:
        grads["mask"] = np.empty(geom.mask_shape, dtype=x.dtype)
    if "bias" in wrt:
        grads["bias"] = grad_out.astype(cdt, copy=False).sum(axis=(0, 2, 3)).astype(x.dtype)
    if not (need_cols_grad or "weight" in wrt):
        return grads
    grad_out_c = np.ascontiguousarray(grad_out, dtype=cdt)  # _tile_view needs a reshapeable layout

    def run(tile: Tile):
        # (images, groups, Cout/g, pixels), a view of grad_out
        go = _tile_view(grad_out_c, tile, geom.groups)
        xl = call.channels_last(x, tile)
        plans = call.plans(tile, offset, mask, coordinate_index=bool(wrt & {"offset", "mask"}))
        gw = gx = None
        if "weight" in wrt:
            cols = call.per_group(call.columns(xl, plans, tile), tile)
            gw = np.matmul(go, cols.transpose(1, 0, 2, 3)).sum(axis=0)
            del cols
        if not need_cols_grad:
            return tile, gx, gw
        # (images, groups, pixels, Cout/g) @ (groups, Cout/g, K*C/g) -> gradient columns (pixels, K, C)
        grad_cols = call.from_groups(np.matmul(go.transpose(0, 1, 3, 2), call.wmat))
        npix = grad_cols.shape[0]
        if "x" in wrt:
            gx = np.empty_like(xl)
        for g, plan in enumerate(plans):
            gcols = grad_cols[:, :, g * cg:(g + 1) * cg].reshape(npix * k, cg)
            if geom.offset_groups > 1:
                gcols = np.ascontiguousarray(gcols)
            if gx is not None:
                gx[g] = plan.operator.T @ gcols
            if wrt & {"offset", "mask"}:
                _coordinate_gradients(geom, tile, plan, xl[g], gcols, g, grads)
        return tile, gx, gw

    grad_x = np.zeros(geom.x_shape, dtype=cdt) if "x" in wrt else None
    grad_w = np.zeros_like(call.wmat) if "weight" in wrt else None
    pixels = call.pixels
    for tile, gx, gw in _map_tiles(run, call.tiles(backward=True)):
        if gw is not None:
            grad_w += gw
        if gx is not None:
            part = gx.reshape(geom.offset_groups, tile.images, pixels + 1, cg)[:, :, :pixels]
            grad_x[tile.batch] += part.transpose(1, 0, 3, 2).reshape(
                tile.images, geom.in_channels, geom.height, geom.width)
    if grad_x is not None:
        grads["x"] = grad_x.astype(x.dtype, copy=False)
    if grad_w is not None:
        grads["weight"] = (grad_w.reshape(geom.out_channels, geom.kernel_h, geom.kernel_w, geom.channels_per_group)
                           .transpose(0, 3, 1, 2).astype(x.dtype))
    return grads


@np.errstate(invalid="ignore")
def _coordinate_gradients(geom: ConvGeometry, tile: Tile, plan: SamplingPlan, xg: np.ndarray,
                          gcols: np.ndarray, group: int, grads: dict) -> None:
    """Gradients of offset and mask for one offset group of one tile, written into ``grads``.

    ``s[q] = sum_c grad_column[c] * value[c, corner q]`` over the group's channels; the
    coordinate derivative uses every corner inside the image with no early exit (so it
    is non-zero exactly on the lines ``py = -1`` and ``px = -1``), as torchvision does.
    """
    k = geom.kernel_points
    n = gcols.shape[0]
    s = np.empty((n, 4), dtype=gcols.dtype)
    # Blocks small enough that the gathered corners are still in cache when they are reduced.
    block = max(1, _CORNER_BLOCK_BYTES // (4 * xg.shape[1] * xg.itemsize))
    for start in range(0, n, block):
        rows_ = slice(start, min(start + block, n))
        np.einsum("nqc,nc->nq", xg[plan.coordinate_index[rows_]], gcols[rows_], out=s[rows_])
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
        # An early-exit sample's value is 0 whatever its corners hold (s may read a NaN there).
        d_mask[plan.outside] = 0
        grads["mask"][tile.batch, group * k:(group + 1) * k, rows] = d_mask.reshape(shape).transpose(0, 3, 1, 2)

