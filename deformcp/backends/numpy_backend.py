"""CPU backend: deformable convolution with NumPy and SciPy.

This is both the CPU implementation and the oracle the CUDA kernels are tested
against, so it follows ``docs/semantics.md`` to the letter.

How it works
------------
Bilinear sampling is linear in the input, so the deformable im2col is a sparse
matrix ``S`` with four entries per row, block-diagonal over the offset groups,
applied to the channels-last input ``X`` (:mod:`.numpy_sampling`, on the
zero-bordered grids of :mod:`.numpy_grid`)::

    columns  = S @ X              # forward
    grad_X  += S.T @ grad_columns # the exact transpose, no scatter loops

The products with the weight are BLAS products per convolution group, or
reductions over all the channels at once for one channel per group
(:mod:`.numpy_products`).

The output is cut into tiles for the worker threads and each tile into chunks that
stay in cache (:mod:`.numpy_tiling`); the tiles run on the threads of
:mod:`.cpu_threads`.  This module holds the three entry points and the numerical
steps of a chunk.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional, Tuple

import numpy as np

from ..geometry import ConvGeometry
from ..workspace import Tile
from . import numpy_grid
from .cpu_threads import quiet, tile_workers
from .numpy_products import tile_view, weight_products
from .numpy_sampling import SamplingPlan, all_finite
from .numpy_tiling import Tiling

__all__ = ["forward", "backward", "im2col"]

_CORNER_BLOCK_BYTES = 1 << 20
# Channels per offset group from which the corner sums run a dot product per row (_channel_sums).
_LONG_ROWS = 128


@quiet
def forward(geom: ConvGeometry, cdt: np.dtype, x, offset, mask, weight, bias, *,
            allow_tf32: bool = False) -> np.ndarray:
    """Deformable convolution on NumPy arrays; see :func:`deformcp.deform_conv2d`.

    ``cdt`` is the compute dtype (:func:`deformcp.dtypes.compute_dtype` of the inputs' dtype);
    the result has ``x``'s dtype.  The other two functions take the same leading arguments.
    ``allow_tf32`` is accepted for the backends' common signature and ignored: BLAS on the
    CPU computes float32 in float32.
    """
    with tile_workers() as workers:
        tiling = Tiling(geom, cdt, workers, backward=False)
        out = np.empty(geom.out_shape, dtype=x.dtype)
        products = weight_products(geom, cdt, weight, bias)
        tiling.copy_band_images(x)

        def run(tile: Tile) -> None:
            xl = tiling.channels_last(x, tile)
            chunks = tiling.chunks(tile)
            scratch = tiling.scratch(geom.kernel_points * geom.in_channels, chunks)
            result = tiling.scratch(geom.out_channels, chunks)
            for chunk in chunks:
                cols = _columns(geom, xl, tiling.sampling_plan(tile, chunk, offset, mask), scratch)
                products.output(cols, chunk, result, tile_view(out, chunk, geom.groups))

        for _ in workers.map(run, tiling.tiles):
            pass
    return out


@quiet
def im2col(geom: ConvGeometry, cdt: np.dtype, x, offset, mask) -> np.ndarray:
    """Deformable im2col on NumPy arrays; see :func:`deformcp.deform_im2col`."""
    with tile_workers() as workers:
        tiling = Tiling(geom, cdt, workers, backward=False)
        k = geom.kernel_points
        out = np.empty((geom.batch, geom.in_channels, k, geom.out_h, geom.out_w), dtype=x.dtype)
        tiling.copy_band_images(x)

        def run(tile: Tile) -> None:
            xl = tiling.channels_last(x, tile)
            chunks = tiling.chunks(tile)
            scratch = tiling.scratch(k * geom.in_channels, chunks)
            for chunk in chunks:
                cols = _columns(geom, xl, tiling.sampling_plan(tile, chunk, offset, mask), scratch)
                cols = cols.reshape(chunk.images, chunk.out_rows, geom.out_w, k, geom.in_channels)
                out[chunk.batch, :, :, chunk.rows] = cols.transpose(0, 4, 3, 1, 2)

        for _ in workers.map(run, tiling.tiles):
            pass
    return out.reshape(geom.columns_shape)


@quiet
def backward(geom: ConvGeometry, cdt: np.dtype, grad_out, x, offset, mask, weight, wrt: frozenset, *,
             deterministic: Optional[bool] = None, allow_tf32: bool = False) -> dict:
    """The gradients named in ``wrt`` on NumPy arrays; see :func:`deformcp.deform_conv2d_backward`.

    Returns a dict from input name (``x``, ``offset``, ``mask``, ``weight``, ``bias``) to its gradient.
    ``deterministic`` and ``allow_tf32`` are accepted for the backends' common signature and
    ignored: this backend is always deterministic (docs/cpu.md) and computes float32 in float32.
    """
    with tile_workers() as workers:
        grads = {}
        if "bias" in wrt:
            grads["bias"] = grad_out.astype(cdt, copy=False).sum(axis=(0, 2, 3)).astype(x.dtype)
        if wrt & {"x", "offset", "mask", "weight"}:
            tiling = Tiling(geom, cdt, workers, backward=True)
            call = _Backward(tiling, grad_out, x, offset, mask, weight, wrt)
            tiling.copy_band_images(x)
            call.add_up(workers.map(call.tile, tiling.tiles))
            grads.update(call.gradients())
    return grads


_TileGradients = Tuple[Tile, Optional[np.ndarray], Optional[np.ndarray]]


class _Backward:
    """One backward call: its inputs, the gradients it fills, and the steps of a tile and of a chunk.

    :meth:`tile` runs on the worker threads and returns the tile's partial gradients;
    :meth:`add_up` adds them up on the calling thread, in tile order.
    """

    def __init__(self, tiling: Tiling, grad_out, x, offset, mask, weight, wrt: frozenset):
        geom = tiling.geom
        self.tiling, self.geom = tiling, geom
        self.x, self.offset, self.mask = x, offset, mask
        self.products = weight_products(geom, tiling.cdt, weight)
        self.grad_out = np.ascontiguousarray(grad_out, dtype=tiling.cdt)  # tile_view needs a reshapeable layout
        self.columns_gradient = bool(wrt & {"x", "offset", "mask"})
        self.coordinates = bool(wrt & {"offset", "mask"})
        # Whether the coordinate gradients may take their fast order of sums (see _coordinate_gradients).
        self.x_finite = all_finite(x) if self.coordinates else True
        # Tiles of whole images write their grad_x directly from the worker.  Bands of rows of one
        # image add up their channels-last grad_x in tile order, and the image's sum is copied into
        # NCHW once (:meth:`add_up`).
        self.whole_images = tiling.whole_images
        self.grad_x = np.empty(geom.x_shape, dtype=x.dtype) if "x" in wrt else None
        self.grad_w = self.products.zero_weight_gradient() if "weight" in wrt else None
        self.coordinate_grads = {}  # the offset and mask gradients, written by the chunks
        if "offset" in wrt:
            self.coordinate_grads["offset"] = np.empty(geom.offset_shape, dtype=x.dtype)
        if "mask" in wrt and mask is not None:
            self.coordinate_grads["mask"] = np.empty(geom.mask_shape, dtype=x.dtype)

    def tile(self, tile: Tile) -> _TileGradients:
        """Runs the tile's chunks: ``(tile, its grad_x or None once written, its grad_weight or None)``."""
        geom, tiling = self.geom, self.tiling
        xl = tiling.channels_last(self.x, tile)
        gx = np.zeros_like(xl) if self.grad_x is not None else None
        gw = self.products.zero_weight_gradient() if self.grad_w is not None else None
        chunks = tiling.chunks(tile)
        scratch = tiling.scratch(geom.kernel_points * geom.in_channels, chunks)
        for chunk in chunks:
            self._chunk(tile, chunk, xl, scratch, gx, gw)
        if gx is not None and self.whole_images:
            # No other tile touches these images: the worker writes them, in parallel.
            self._write_grad_x(tile, gx)
            gx = None
        return tile, gx, gw

    def _chunk(self, tile: Tile, chunk: Tile, xl: np.ndarray, scratch: np.ndarray, gx: Optional[np.ndarray],
               gw: Optional[np.ndarray]) -> None:
        """One chunk's share of every gradient: added into ``gx`` and ``gw``, written into the coordinate ones."""
        geom = self.geom
        go = self.products.grad_out(tile_view(self.grad_out, chunk, geom.groups))
        plan = self.tiling.sampling_plan(tile, chunk, self.offset, self.mask, coordinate_corner=self.coordinates)
        if gw is not None:
            cols = _columns(geom, xl, plan, scratch)
            self.products.weight_gradient(go, cols, chunk, gw)
            del cols  # a view of the scratch, which the gradient columns overwrite next
        if not self.columns_gradient:
            return
        # (samples of every offset group, C/G): the sampling plan's rows, block-diagonal over the groups.
        gcols = self.products.gradient_columns(go, scratch).reshape(-1, geom.channels_per_offset_group)
        # With every value finite, the order of products cannot matter; otherwise 0 * Inf
        # terms must fall where torchvision's order puts them (docs/semantics.md, section 11).
        finite = all_finite(gcols) and plan.mask_is_finite()
        if gx is not None:
            plan.scatter_add(gcols, gx, near_only=not finite)
        if self.coordinates:
            _coordinate_gradients(geom, chunk, plan, xl, gcols, self.coordinate_grads, fast=finite and self.x_finite)

    def add_up(self, results: Iterable[_TileGradients]) -> None:
        """Adds the tiles' partial gradients, in tile order so that the sums do not depend on thread timing.

        ``grad_weight`` over all the tiles; ``grad_x`` over the bands of each image, channels-last,
        the sum copied into NCHW once per image.
        """
        for _, image_tiles in itertools.groupby(results, key=lambda result: result[0].batch_start):
            first, band_sum = None, None
            for tile, gx, gw in image_tiles:
                if gw is not None:
                    self.grad_w += gw
                if gx is None:
                    continue
                if band_sum is None:
                    first, band_sum = tile, gx
                else:
                    band_sum += gx
            if band_sum is not None:
                self._write_grad_x(first, band_sum)

    def _write_grad_x(self, tile: Tile, gx: np.ndarray) -> None:
        """The channels-last ``gx`` of the tile's images into their place in the NCHW ``grad_x``."""
        numpy_grid.copy_to_nchw(self.geom, gx, tile.images, self.grad_x[tile.batch])

    def gradients(self) -> dict:
        """The gradients, by input name, once :meth:`add_up` has run."""
        grads = dict(self.coordinate_grads)
        if self.grad_x is not None:
            grads["x"] = self.grad_x
        if self.grad_w is not None:
            grads["weight"] = self.products.weight_gradient_nchw(self.grad_w).astype(self.x.dtype)
        return grads


# --- the numerical steps of a chunk ------------------------------------------------------------

def _columns(geom: ConvGeometry, xl: np.ndarray, plan: SamplingPlan, scratch: np.ndarray) -> np.ndarray:
    """Deformable im2col of a chunk as ``(pixels, K, C)`` in ``scratch``, pixels ordered (image, row, column).

    ``xl`` is the tile's channels-last copy, ``(offset groups * rows, C/offset groups)``; the
    plan's rows, ordered (pixel, kernel point, offset group), fill the columns in place.
    """
    n = plan.index.shape[0]
    cols = scratch[:n * geom.channels_per_offset_group].reshape(-1, geom.kernel_points, geom.in_channels)
    plan.gather(xl, cols.reshape(n, geom.channels_per_offset_group))
    return cols


def _coordinate_gradients(geom: ConvGeometry, chunk: Tile, plan: SamplingPlan, xl: np.ndarray,
                          gcols: np.ndarray, grads: dict, fast: bool) -> None:
    """Gradients of offset and mask for one chunk, every offset group, written into ``grads``.

    ``xl`` is the tile's channels-last copy and ``gcols`` the column gradient, both with the
    offset groups stacked as the plan's rows expect (:func:`_columns`).

    The coordinate derivative uses every corner inside the image with no early exit (so it
    is non-zero exactly on the lines ``py = -1`` and ``px = -1``), as torchvision does.
    Per sample, with ``v[c, q]`` the value of corner ``q`` in channel ``c`` and ``g[c]`` the
    column gradient, torchvision sums over the channels::

        d/dy    = sum_c (mask * ((1 - fx) (v2 - v0) + fx (v3 - v1))) * g
        d/dmask = sum_c g * value,   value = sum_q w_q v_q, 0 at the early exit

    With finite values the sums over channels can be taken first,
    ``s[q] = sum_c g[c] v[c, q]``, and the corner weights applied to four numbers instead
    of ``4 C``: the ``fast`` order, which the caller asks for when the input, the column
    gradient and the mask are finite.  Otherwise ``0 * Inf`` lands on different terms in
    the two orders, so torchvision's order runs, and NaN and Inf reach what they reach there.
    """
    k, groups = geom.kernel_points, geom.offset_groups
    n, c = gcols.shape
    # A sample's corners are two pairs of neighbours on the grid: row r of `pairs` is
    # pixels r and r + 1, so each pair is one gather of 2C contiguous values (a read-only view).
    if not xl.flags.c_contiguous:
        raise ValueError("the channels-last input must be C-contiguous")
    pairs = np.lib.stride_tricks.as_strided(xl, shape=(xl.shape[0] - 1, 2 * c), strides=(xl.strides[0], xl.itemsize),
                                            writeable=False)
    pair_steps = np.array([0, numpy_grid.padded_grid(geom)[1]], dtype=plan.coordinate_corner.dtype)
    sums = _corner_sums if fast else _torchvision_order_sums
    d_py, d_px, d_mask = (np.empty(n, dtype=gcols.dtype) for _ in range(3))
    # Blocks small enough that the gathered corners are still in cache when they are reduced.
    block = max(1, _CORNER_BLOCK_BYTES // (4 * c * xl.itemsize))
    for start in range(0, n, block):
        rows_ = slice(start, min(start + block, n))
        corners = pairs[plan.coordinate_corner[rows_, None] + pair_steps].reshape(-1, 4, c)
        sums(plan, rows_, corners, gcols[rows_], d_py[rows_], d_px[rows_], d_mask[rows_])
    shape = (chunk.images, chunk.out_rows, geom.out_w, k, groups)  # the plan's order
    rows = chunk.rows
    if "offset" in grads:
        both = np.stack([d_py.reshape(shape), d_px.reshape(shape)], axis=-1)  # (b, r, c, K, G, 2)
        # offset[b, g*2K + 2k + {0: dy, 1: dx}, r, c]
        grads["offset"][chunk.batch, :, rows] = (
            both.transpose(0, 4, 3, 5, 1, 2).reshape(chunk.images, groups * 2 * k, chunk.out_rows, geom.out_w))
    if "mask" in grads:
        grads["mask"][chunk.batch, :, rows] = (d_mask.reshape(shape).transpose(0, 4, 3, 1, 2)
                                               .reshape(chunk.images, groups * k, chunk.out_rows, geom.out_w))


def _corner_sums(plan: SamplingPlan, rows: slice, corners: np.ndarray, g: np.ndarray,
                 d_py: np.ndarray, d_px: np.ndarray, d_mask: np.ndarray) -> None:
    """The coordinate gradients of a block of samples, channels summed first (finite values only)."""
    s = _channel_sums(corners, g)
    fy, fx = plan.frac_y[rows], plan.frac_x[rows]
    np.add((1 - fx) * (s[2] - s[0]), fx * (s[3] - s[1]), out=d_py)
    np.add((1 - fy) * (s[1] - s[0]), fy * (s[3] - s[2]), out=d_px)
    if plan.mask is not None:
        d_py *= plan.mask[rows]
        d_px *= plan.mask[rows]
    w = plan.bilinear[rows]  # 0 at the early exit, where s may have read a NaN on a -1 line:
    np.copyto(d_mask, w[:, 0] * s[0] + w[:, 1] * s[1] + w[:, 2] * s[2] + w[:, 3] * s[3])
    d_mask[plan.outside[rows]] = 0  # an early-exit sample's value is 0 whatever its corners hold


def _channel_sums(corners: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``s[q, n] = sum_c corners[n, q, c] * g[n, c]``, shape ``(4, N)`` (a view).

    ``einsum`` for short rows; from ``_LONG_ROWS`` channels a dot product per row, which
    NumPy's ``vecdot`` (2.0 and later; ``matmul`` before) runs faster (benchmarks/NOTES.md).
    """
    if corners.shape[2] < _LONG_ROWS:
        return np.einsum("nqc,nc->qn", corners, g)
    if hasattr(np, "vecdot"):
        return np.vecdot(corners, g[:, None, :]).T
    return np.matmul(corners, g[:, :, None])[:, :, 0].T


def _torchvision_order_sums(plan: SamplingPlan, rows: slice, corners: np.ndarray, g: np.ndarray,
                            d_py: np.ndarray, d_px: np.ndarray, d_mask: np.ndarray) -> None:
    """The coordinate gradients of a block of samples, each channel's products grouped as torchvision's."""
    v = [corners[:, q] for q in range(4)]  # (samples, channels) each
    fy, fx = plan.frac_y[rows, None], plan.frac_x[rows, None]
    m = 1 if plan.mask is None else plan.mask[rows, None]
    np.einsum("nc,nc->n", m * (fx * (v[3] - v[1]) + (1 - fx) * (v[2] - v[0])), g, out=d_py)
    np.einsum("nc,nc->n", m * (fy * (v[3] - v[2]) + (1 - fy) * (v[1] - v[0])), g, out=d_px)
    w = plan.bilinear[rows]
    value = w[:, 0, None] * v[0] + w[:, 1, None] * v[1] + w[:, 2, None] * v[2] + w[:, 3, None] * v[3]
    value[plan.outside[rows]] = 0
    np.einsum("nc,nc->n", g, value, out=d_mask)
