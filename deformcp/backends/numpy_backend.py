"""CPU backend: deformable convolution with NumPy and SciPy.

This is both the CPU implementation and the oracle the CUDA kernels are tested
against, so it follows ``docs/semantics.md`` to the letter.

How it works
------------
Bilinear sampling is linear in the input, so for one offset group the deformable
im2col is a sparse matrix ``S`` with four entries per row applied to the
channels-last input ``X`` (:mod:`.numpy_sampling`)::

    columns  = S @ X              # forward
    grad_X  += S.T @ grad_columns # the exact transpose, no scatter loops

Each convolution group is then one BLAS matrix product.

The output is cut twice.  *Tiles* (ranges of images, or bands of rows of one
image when there are fewer images than workers) are the unit of parallel work and
of the workspace limit (:mod:`deformcp.workspace`): one per worker thread at a
time, each reading a channels-last copy of its images (the bands of one image share
one) and, in the backward pass, with its own ``grad_X``.
Each tile is then walked in *chunks* of a few thousand output pixels, which a
thread takes through every stage in turn (sampling plan, sparse product, BLAS
products, coordinate gradients) while its arrays are still in cache; the chunks
reuse one set of scratch buffers.  On one core this made the forward pass of
``B=1, C=32, 200x320`` 1.5x faster than whole tiles at once (87 -> 56 ms).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Iterator, List, Optional

import numpy as np
from threadpoolctl import ThreadpoolController

from ..geometry import ConvGeometry
from ..workspace import Tile, get_workspace_limit, plan_tiles
from .numpy_sampling import SamplingPlan, padded_grid, sampling_plan

__all__ = ["forward", "backward", "im2col"]

# A chunk holds at most this many samples (output pixels x kernel points x offset
# groups) ...  The sampling plan makes about twenty passes over arrays of this length;
# at 2**15 samples they stay in the core's cache (measured: 2**14 to 2**15 fastest,
# whole 64000-pixel images 1.5x slower).
_CHUNK_SAMPLES = 1 << 15
# ... and at most this many bytes of columns, which BLAS then reads while they are in cache.
_CHUNK_COLUMN_BYTES = 16 << 20
_CORNER_BLOCK_BYTES = 1 << 20
# Indices and row pointers are int32 up to this value (a module constant so that tests can
# lower it and run the int64 path); SciPy's kernels do not check bounds.
_INT32_INDEX_MAX = np.iinfo(np.int32).max
# (rows, columns) of the destination copied at a time by a transposing copy.
_TRANSPOSE_BLOCK = (2048, 16)


class _Call:
    """State shared by the tiles of one call: geometry, dtypes, the weight as per-group matrices."""

    def __init__(self, geom: ConvGeometry, cdt: np.dtype, weight: Optional[np.ndarray]):
        self.geom = geom
        self.cdt = cdt
        grid_rows, grid_cols = padded_grid(geom)
        self.grid_pixels = grid_rows * grid_cols  # per image in the channels-last copy
        # scipy's sparse kernels are fastest with 32-bit indices; 64-bit only when a count needs it.
        self.index_dtype = np.int32
        self.chunk_rows = 1
        self._band_images: dict = {}  # first image -> its channels-last copy, for bands of rows
        if weight is not None:
            # weight[o, c, i, j] -> per group (C_out/g, K*C/g), columns ordered (k, c) like the columns
            self.wmat = (weight.astype(self.cdt, copy=False).transpose(0, 2, 3, 1)
                         .reshape(geom.groups, geom.out_channels_per_group,
                                  geom.kernel_points * geom.channels_per_group))

    def scratch_bytes(self, backward: bool) -> tuple:
        """Scratch bytes per output pixel of a chunk, and per image of a tile."""
        geom, s = self.geom, self.cdt.itemsize
        k, c = geom.kernel_points, geom.in_channels
        # Per chunk pixel: the plan's indices, weights, fractions and their temporaries; the
        # columns and a per-group copy of them; the forward's product.  Backward: gradient
        # columns and a per-group copy.
        per_pixel = k * geom.offset_groups * (8 * 8 + 8 * s) + 2 * k * c * s + geom.out_channels * s
        # Per tile image: the channels-last copy; backward: its gradient.
        per_image = self.grid_pixels * c * s
        if backward:
            per_pixel += 2 * k * c * s
            per_image *= 2
        return per_pixel, per_image

    def tiles(self, backward: bool) -> List[Tile]:
        """Tiles under the workspace limit shared among the worker threads, at least one per worker.

        Also sets :attr:`chunk_rows` (the output rows of one image a chunk holds at most) and
        :attr:`index_dtype` (int64 where a tile's or a chunk's counts would overflow int32).
        The chunk's scratch comes out of its tile's share of the limit and shrinks to fit it.
        """
        geom, s = self.geom, self.cdt.itemsize
        k, w = geom.kernel_points, geom.out_w
        samples = k * geom.offset_groups
        per_pixel, per_image = self.scratch_bytes(backward)
        workers = _workers()
        limit = max(1, get_workspace_limit() // workers)
        cache_rows = min(_CHUNK_SAMPLES // (samples * w), _CHUNK_COLUMN_BYTES // max(1, k * geom.in_channels * s * w))
        self.chunk_rows = max(1, min(cache_rows, (limit - per_image) // (per_pixel * w)))
        chunk_bytes = self.chunk_rows * w * per_pixel
        # A band of rows needs its whole image's copy (and gradient) like the image itself, so
        # bands save no memory here: a tile is never planned under less than one image (a limit
        # below that is exceeded by that one copy), and with no cost per output pixel,
        # plan_tiles cuts images into bands only to give every worker a tile.
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, 0, per_image,
                           limit=max(limit - chunk_bytes, per_image + geom.out_h), min_tiles=workers)
        if any(t.images * self.grid_pixels > _INT32_INDEX_MAX for t in tiles) or \
                self.chunk_rows * w * samples * 4 > _INT32_INDEX_MAX:
            self.index_dtype = np.int64
        return tiles

    def chunks(self, tile: Tile) -> List[Tile]:
        """The tile cut into chunks of at most :attr:`chunk_rows` output rows' worth of pixels.

        Whole images where :attr:`chunk_rows` covers several; otherwise bands of rows.
        """
        out_h = self.geom.out_h
        if tile.out_rows == out_h and self.chunk_rows >= out_h:
            per = min(tile.images, self.chunk_rows // out_h)
            return [Tile(b, min(b + per, tile.batch_stop), 0, out_h)
                    for b in range(tile.batch_start, tile.batch_stop, per)]
        rows = self.chunk_rows
        return [Tile(b, b + 1, r, min(r + rows, tile.row_stop))
                for b in range(tile.batch_start, tile.batch_stop) for r in range(tile.row_start, tile.row_stop, rows)]

    def scratch(self, per_pixel_values: int, chunks: List[Tile]) -> np.ndarray:
        """A flat buffer for ``per_pixel_values`` values per pixel of any of ``chunks``."""
        pixels = max(c.images * c.out_rows for c in chunks) * self.geom.out_w
        return np.empty(pixels * per_pixel_values, dtype=self.cdt)

    def channels_last(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        """The tile's images channels-last on their zero-bordered grids, ``(G, images * grid pixels, C/G)``.

        A tile of whole images makes its own copy.  Bands of rows of one image share one,
        made by :meth:`prepare_bands` before the tiles start.
        """
        if tile.out_rows == self.geom.out_h:
            out = self._grid(tile.images)
            self._copy_rows(x, out, tile.batch, slice(0, self.geom.height))
            return out.reshape(self.geom.offset_groups, -1, self.geom.channels_per_offset_group)
        return self._band_images[tile.batch_start]

    def prepare_bands(self, x: np.ndarray, tiles: List[Tile]) -> None:
        """The channels-last copies of the images that ``tiles`` cut into bands, made by all the workers.

        Bands exist only where there are fewer images than workers, and each worker's share
        of the limit holds one image's copy, so these copies together stay within the limit.
        Made here, in pieces of rows on the worker threads, rather than by the first band to
        ask while the image's other bands wait for it.
        """
        geom = self.geom
        images = sorted({t.batch_start for t in tiles if t.out_rows < geom.out_h})
        if not images:
            return
        grids = {b: self._grid(1) for b in images}
        rows = -(-geom.height // _workers())
        pieces = [Tile(b, b + 1, r, min(r + rows, geom.height)) for b in images for r in range(0, geom.height, rows)]

        def copy(piece: Tile) -> None:
            self._copy_rows(x, grids[piece.batch_start], piece.batch, piece.rows)

        for _ in _map_tiles(copy, pieces):
            pass
        self._band_images = {b: grid.reshape(geom.offset_groups, -1, geom.channels_per_offset_group)
                             for b, grid in grids.items()}

    def _grid(self, images: int) -> np.ndarray:
        """An uninitialised ``(G, images, H + 2, W + 2, C/G)`` array with its border zeroed."""
        geom = self.geom
        out = np.empty((geom.offset_groups, images, *padded_grid(geom), geom.channels_per_offset_group),
                       dtype=self.cdt)
        for border in (out[:, :, 0], out[:, :, -1], out[:, :, :, 0], out[:, :, :, -1]):
            border[...] = 0
        return out

    def _copy_rows(self, x: np.ndarray, grid: np.ndarray, batch: slice, rows: slice) -> None:
        """Input rows ``rows`` of images ``batch`` of ``x`` into their place on ``grid``."""
        geom = self.geom
        g, cg = geom.offset_groups, geom.channels_per_offset_group
        images = batch.stop - batch.start
        source = x[batch, :, rows].reshape(images, g, cg, rows.stop - rows.start, geom.width)
        _blocked_copy(grid[:, :, rows.start + 1:rows.stop + 1, 1:-1], source.transpose(1, 0, 3, 4, 2))

    def image_view(self, stacked: np.ndarray, tile: Tile) -> np.ndarray:
        """Inverse of :meth:`channels_last` for a tile: ``(images, offset groups, C/offset groups, H, W)``,
        a view without the border."""
        geom = self.geom
        grid = stacked.reshape(geom.offset_groups, tile.images, *padded_grid(geom), geom.channels_per_offset_group)
        return grid[:, :, 1:-1, 1:-1].transpose(1, 0, 4, 2, 3)

    def plans(self, tile: Tile, chunk: Tile, offset: np.ndarray, mask: Optional[np.ndarray],
              coordinate_corner: bool = False) -> List[SamplingPlan]:
        """The sampling plan of every offset group for ``chunk``, indexing the channels-last copy of ``tile``."""
        off = offset[chunk.batch, :, chunk.rows]
        msk = None if mask is None else mask[chunk.batch, :, chunk.rows]
        return [sampling_plan(self.geom, off, msk, g, row_start=chunk.row_start,
                              first_image=chunk.batch_start - tile.batch_start,
                              input_rows=tile.images * self.grid_pixels, dtype=self.cdt,
                              index_dtype=self.index_dtype, coordinate_corner=coordinate_corner)
                for g in range(self.geom.offset_groups)]

    def columns(self, xl: np.ndarray, plans: List[SamplingPlan], scratch: np.ndarray) -> np.ndarray:
        """Deformable im2col of a chunk as ``(pixels, K, C)`` in ``scratch``, pixels ordered (image, row, column)."""
        geom = self.geom
        k, cg = geom.kernel_points, geom.channels_per_offset_group
        n = plans[0].index.shape[0]
        cols = scratch[:n * geom.in_channels].reshape(n // k, k, geom.in_channels)
        if geom.offset_groups == 1:
            plans[0].gather(xl[0], cols.reshape(n, cg))
            return cols
        for g, plan in enumerate(plans):
            cols[:, :, g * cg:(g + 1) * cg] = plan.gather(xl[g], np.empty((n, cg), dtype=self.cdt)).reshape(-1, k, cg)
        return cols

    def per_group(self, cols: np.ndarray, chunk: Tile) -> np.ndarray:
        """``(pixels, K, C)`` -> ``(groups, images, pixels per image, K*C/groups)``, :attr:`wmat`'s columns."""
        geom = self.geom
        shape = (geom.groups, chunk.images, chunk.out_rows * geom.out_w, geom.kernel_points * geom.channels_per_group)
        if geom.groups == 1:
            return cols.reshape(shape)
        split = cols.reshape(-1, geom.kernel_points, geom.groups, geom.channels_per_group).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(split).reshape(shape)

    def gradient_columns(self, go: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """``grad_out^T @ weight`` per group as ``(pixels, K, C)``, in ``scratch`` where the layout allows.

        ``go`` is ``(images, groups, Cout/g, pixels per image)``.
        """
        geom = self.geom
        k, cc = geom.kernel_points, geom.channels_per_group
        images, pixels = go.shape[0], go.shape[3]
        if geom.groups == 1:
            out = scratch[:images * pixels * k * cc].reshape(images, 1, pixels, k * cc)
            np.matmul(go.transpose(0, 1, 3, 2), self.wmat, out=out)
            return out.reshape(-1, k, geom.in_channels)
        grouped = np.matmul(go.transpose(0, 1, 3, 2), self.wmat)
        split = grouped.reshape(images, geom.groups, pixels, k, cc).transpose(0, 2, 3, 1, 4)
        return np.ascontiguousarray(split).reshape(-1, k, geom.in_channels)


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


def _quiet(fn: Callable) -> Callable:
    """``fn`` under a NumPy error state that neither warns nor raises on floating-point conditions.

    Non-finite inputs are defined behaviour (docs/semantics.md), not numerical accidents:
    NaN and infinity propagate as torchvision's do, silently, whatever error state the
    caller has set.  NumPy's error state is per thread, so each worker sets it around its tile.
    """
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return quiet


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
    fn = _quiet(fn)
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


@_quiet
def forward(geom: ConvGeometry, cdt: np.dtype, x, offset, mask, weight, bias) -> np.ndarray:
    """Deformable convolution on NumPy arrays; see :func:`deformcp.deform_conv2d`.

    ``cdt`` is the compute dtype (:func:`deformcp.dtypes.compute_dtype` of the inputs' dtype);
    the result has ``x``'s dtype.  The other two functions take the same leading arguments.
    """
    call = _Call(geom, cdt, weight)
    out = np.empty(geom.out_shape, dtype=x.dtype)
    groups, cout = geom.groups, geom.out_channels_per_group
    bias_c = None if bias is None else bias.astype(call.cdt, copy=False).reshape(groups, 1, 1, cout)
    # (groups, 1, K*C/g, Cout/g): the same weight for every image of a chunk
    weight_t = call.wmat.transpose(0, 2, 1)[:, None]
    tiles = call.tiles(backward=False)
    call.prepare_bands(x, tiles)

    def run(tile: Tile) -> None:
        xl = call.channels_last(x, tile)
        chunks = call.chunks(tile)
        scratch = call.scratch(geom.kernel_points * geom.in_channels, chunks)
        result = call.scratch(geom.out_channels, chunks)
        for chunk in chunks:
            cols = call.per_group(call.columns(xl, call.plans(tile, chunk, offset, mask), scratch), chunk)
            # Pixels as the rows of the product: (groups, images, pixels, K*C/g) @ (groups, 1, K*C/g, Cout/g).
            # With C_out as the rows instead, OpenBLAS ran at 56 GFLOP/s rather than 88 for C_out=32;
            # the transposed copy into NCHW costs less than that (forward 13-19% faster at C = 32-64).
            y = result[:cols.size // cols.shape[-1] * cout].reshape(*cols.shape[:3], cout)
            np.matmul(cols, weight_t, out=y)
            if bias_c is not None:
                y += bias_c
            _tile_view(out, chunk, groups)[...] = y.transpose(1, 0, 3, 2)

    for _ in _map_tiles(run, tiles):
        pass
    return out


def _blocked_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a transposing copy, in blocks of the last two axes.

    NumPy strides over the whole of both axes at once; in blocks whose rows stay in cache
    a (4096, 256) float32 transpose took 1.2 ms instead of 3.5.
    """
    rows, cols = dst.shape[-2:]
    for r in range(0, rows, _TRANSPOSE_BLOCK[0]):
        for c in range(0, cols, _TRANSPOSE_BLOCK[1]):
            block = (Ellipsis, slice(r, r + _TRANSPOSE_BLOCK[0]), slice(c, c + _TRANSPOSE_BLOCK[1]))
            dst[block] = src[block]


@_quiet
def im2col(geom: ConvGeometry, cdt: np.dtype, x, offset, mask) -> np.ndarray:
    """Deformable im2col on NumPy arrays; see :func:`deformcp.deform_im2col`."""
    call = _Call(geom, cdt, None)
    k = geom.kernel_points
    out = np.empty((geom.batch, geom.in_channels, k, geom.out_h, geom.out_w), dtype=x.dtype)
    tiles = call.tiles(backward=False)
    call.prepare_bands(x, tiles)

    def run(tile: Tile) -> None:
        xl = call.channels_last(x, tile)
        chunks = call.chunks(tile)
        scratch = call.scratch(k * geom.in_channels, chunks)
        for chunk in chunks:
            cols = call.columns(xl, call.plans(tile, chunk, offset, mask), scratch)
            cols = cols.reshape(chunk.images, chunk.out_rows, geom.out_w, k, geom.in_channels)
            out[chunk.batch, :, :, chunk.rows] = cols.transpose(0, 4, 3, 1, 2)

    for _ in _map_tiles(run, tiles):
        pass
    return out.reshape(geom.columns_shape)


@_quiet
def backward(geom: ConvGeometry, cdt: np.dtype, grad_out, x, offset, mask, weight, wrt: frozenset) -> dict:
    """The gradients named in ``wrt`` on NumPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    Returns a dict from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    """
    call = _Call(geom, cdt, weight)
    k, cg = geom.kernel_points, geom.channels_per_offset_group
    need_cols_grad = bool(wrt & {"x", "offset", "mask"})
    coordinates = bool(wrt & {"offset", "mask"})
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
    tiles = call.tiles(backward=True)
    call.prepare_bands(x, tiles)
    # Tiles of whole images write their grad_x directly from the worker.  Bands of rows of one
    # image add up their channels-last grad_x in tile order (so the sum does not depend on
    # thread timing), and the image's sum is copied into NCHW once.
    whole_images = all(t.out_rows == geom.out_h for t in tiles)
    grad_x = np.empty(geom.x_shape, dtype=x.dtype) if "x" in wrt else None

    def nchw(array: np.ndarray, tile: Tile) -> np.ndarray:
        """``array[tile.batch]`` as ``(images, offset groups, C/offset groups, H, W)``, a view."""
        return array[tile.batch].reshape(tile.images, geom.offset_groups, cg, geom.height, geom.width)

    def run(tile: Tile):
        xl = call.channels_last(x, tile)
        gx = np.zeros_like(xl) if "x" in wrt else None
        gw = np.zeros_like(call.wmat) if "weight" in wrt else None
        chunks = call.chunks(tile)
        scratch = call.scratch(k * geom.in_channels, chunks)
        for chunk in chunks:
            go = _tile_view(grad_out_c, chunk, geom.groups)  # (images, groups, Cout/g, pixels), a view
            plans = call.plans(tile, chunk, offset, mask, coordinate_corner=coordinates)
            if gw is not None:
                cols = call.per_group(call.columns(xl, plans, scratch), chunk)
                gw += _weight_gradient(go, cols)
                del cols  # a view of the scratch, which the gradient columns overwrite next
            if not need_cols_grad:
                continue
            grad_cols = call.gradient_columns(go, scratch)
            npix = grad_cols.shape[0]
            for g, plan in enumerate(plans):
                gcols = grad_cols[:, :, g * cg:(g + 1) * cg].reshape(npix * k, cg)
                if geom.offset_groups > 1:
                    gcols = np.ascontiguousarray(gcols)
                if gx is not None:
                    plan.scatter_add(gcols, gx[g])
                if coordinates:
                    _coordinate_gradients(geom, chunk, plan, xl[g], gcols, g, grads)
        if gx is not None and whole_images:
            # No other tile touches these images: the worker writes them, in parallel.
            nchw(grad_x, tile)[...] = call.image_view(gx, tile)
            gx = None
        return tile, gx, gw

    grad_w = np.zeros_like(call.wmat) if "weight" in wrt else None
    band_sum, band_tile = None, None  # the running sum of the current image's bands
    for tile, gx, gw in _map_tiles(run, tiles):
        if gw is not None:
            grad_w += gw
        if gx is None:
            continue
        if band_tile is not None and band_tile.batch_start == tile.batch_start:
            band_sum += gx
            continue
        if band_tile is not None:
            nchw(grad_x, band_tile)[...] = call.image_view(band_sum, band_tile)
        band_sum, band_tile = gx, tile
    if band_tile is not None:
        nchw(grad_x, band_tile)[...] = call.image_view(band_sum, band_tile)
    if grad_x is not None:
        grads["x"] = grad_x
    if grad_w is not None:
        grads["weight"] = (grad_w.reshape(geom.out_channels, geom.kernel_h, geom.kernel_w, geom.channels_per_group)
                           .transpose(0, 3, 1, 2).astype(x.dtype))
    return grads


def _weight_gradient(go: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``sum over images of go @ cols`` per group: ``(groups, Cout/g, K*C/g)``.

    ``go`` is ``(images, groups, Cout/g, pixels)``, ``cols`` ``(groups, images, pixels, K*C/g)``.
    One product over all the chunk's pixels, so that BLAS does the sum over images rather
    than a temporary weight-sized matrix per image (which the workspace limit does not bound).
    """
    groups, images, pixels, kc = cols.shape
    if images == 1:
        return np.matmul(go[0], cols[:, 0])
    go_g = np.ascontiguousarray(go.transpose(1, 2, 0, 3)).reshape(groups, go.shape[2], images * pixels)
    return np.matmul(go_g, cols.reshape(groups, images * pixels, kc))


def _coordinate_gradients(geom: ConvGeometry, chunk: Tile, plan: SamplingPlan, xg: np.ndarray,
                          gcols: np.ndarray, group: int, grads: dict) -> None:
    """Gradients of offset and mask for one offset group of one chunk, written into ``grads``.

    ``s[q] = sum_c grad_column[c] * value[c, corner q]`` over the group's channels; the
    coordinate derivative uses every corner inside the image with no early exit (so it
    is non-zero exactly on the lines ``py = -1`` and ``px = -1``), as torchvision does.
    """
    k = geom.kernel_points
    n, c = gcols.shape
    # A sample's corners are two pairs of neighbours on the grid: row r of `pairs` is
    # pixels r and r + 1, so each pair is one gather of 2C contiguous values (a read-only view).
    if not xg.flags.c_contiguous:
        raise ValueError("the channels-last input must be C-contiguous")
    pairs = np.lib.stride_tricks.as_strided(xg, shape=(xg.shape[0] - 1, 2 * c), strides=(xg.strides[0], xg.itemsize),
                                            writeable=False)
    pair_steps = np.array([0, padded_grid(geom)[1]], dtype=plan.coordinate_corner.dtype)
    s = np.empty((n, 4), dtype=gcols.dtype)
    # Blocks small enough that the gathered corners are still in cache when they are reduced.
    block = max(1, _CORNER_BLOCK_BYTES // (4 * c * xg.itemsize))
    for start in range(0, n, block):
        rows_ = slice(start, min(start + block, n))
        corners = pairs[plan.coordinate_corner[rows_, None] + pair_steps].reshape(-1, 4, c)
        np.einsum("nqc,nc->nq", corners, gcols[rows_], out=s[rows_])
    s = (s[:, 0], s[:, 1], s[:, 2], s[:, 3])
    shape = (chunk.images, chunk.out_rows, geom.out_w, k)
    rows = chunk.rows
    if "offset" in grads:
        fy, fx = plan.frac_y, plan.frac_x
        d_py = (1 - fx) * (s[2] - s[0]) + fx * (s[3] - s[1])
        d_px = (1 - fy) * (s[1] - s[0]) + fy * (s[3] - s[2])
        if plan.mask is not None:
            d_py *= plan.mask
            d_px *= plan.mask
        both = np.stack([d_py.reshape(shape), d_px.reshape(shape)], axis=-1)  # (b, r, c, K, 2)
        grads["offset"][chunk.batch, group * 2 * k:(group + 1) * 2 * k, rows] = (
            both.transpose(0, 3, 4, 1, 2).reshape(chunk.images, 2 * k, chunk.out_rows, geom.out_w))
    if "mask" in grads:
        w = plan.bilinear
        d_mask = w[:, 0] * s[0] + w[:, 1] * s[1] + w[:, 2] * s[2] + w[:, 3] * s[3]
        # An early-exit sample's value is 0 whatever its corners hold (s may read a NaN there).
        d_mask[plan.outside] = 0
        grads["mask"][chunk.batch, group * k:(group + 1) * k, rows] = d_mask.reshape(shape).transpose(0, 3, 1, 2)
