"""How the CPU backend cuts one call's work: tiles for the worker threads, chunks for the cache.

The output is cut twice.  *Tiles* (ranges of images, or bands of rows of one image
when there are fewer images than workers) are the unit of parallel work and of the
workspace limit (:mod:`deformcp.workspace`): one per worker thread at a time, each
reading a channels-last copy of its images (:mod:`.numpy_grid`; the bands of one
image share one) and, in the backward pass, with its own ``grad_X``.  Each tile is
then walked in *chunks* of a few thousand output pixels, which a thread takes
through every stage in turn (sampling plan, sparse product, BLAS products,
coordinate gradients) while its arrays are still in cache; the chunks reuse one
set of scratch buffers.  :class:`Tiling` makes both cuts for one call and holds
what its tiles share.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..geometry import ConvGeometry
from ..workspace import Tile, get_workspace_limit, plan_tiles
from . import numpy_grid
from .cpu_threads import TileWorkers
from .numpy_grid import InputRows
from .numpy_products import forward_column_bytes
from .numpy_sampling import SamplingPlan, sampling_plan

__all__ = ["Tiling", "scratch_bytes"]

# A chunk holds at most this many samples (output pixels x kernel points x offset
# groups) ...  The sampling plan makes about twenty passes over arrays of this length,
# which stay in the core's cache at this size (the sizes measured are in benchmarks/NOTES.md).
_CHUNK_SAMPLES = 1 << 15
# ... and at most this many bytes of columns, which BLAS then reads while they are in cache.
# The forward pass's columns are the largest part of its memory, so its chunks are smaller,
# as small as its products allow without losing speed (numpy_products.forward_column_bytes);
# the backward pass keeps these: its weight gradient is a product whose inner dimension is
# the chunk's pixels, and each chunk adds a weight-sized partial sum.
_CHUNK_COLUMN_BYTES = 16 << 20
# Indices and row pointers are int32 up to this value (a module constant so that tests can
# lower it and run the int64 path); SciPy's kernels do not check bounds.
_INT32_INDEX_MAX = np.iinfo(np.int32).max


def scratch_bytes(geom: ConvGeometry, cdt: np.dtype, backward: bool) -> Tuple[int, int]:
    """Scratch bytes per output pixel of a chunk, and per image of a tile, in compute dtype ``cdt``."""
    s = np.dtype(cdt).itemsize
    k, c = geom.kernel_points, geom.in_channels
    # Per chunk pixel: the plan's indices, weights, fractions and their temporaries; the
    # columns and a per-group copy of them; the forward's product.  Backward: gradient
    # columns and a per-group copy.
    per_pixel = k * geom.offset_groups * (8 * 8 + 8 * s) + 2 * k * c * s + geom.out_channels * s
    # Per tile image: the channels-last copy; backward: its gradient.
    per_image = numpy_grid.grid_pixels(geom) * c * s
    if backward:
        per_pixel += 2 * k * c * s
        per_image *= 2
    return per_pixel, per_image


def _even_share(total: int, most: int) -> int:
    """The size of the fewest parts of at most ``most`` that ``total`` splits into, as even as they go."""
    parts = -(-total // max(1, most))
    return -(-total // max(1, parts))


class Tiling:
    """One call's tiles and their chunks under the workspace limit, and what the tiles share.

    Attributes
    ----------
    tiles : list of Tile
        At least one per worker where the shape allows, in batch-major, row-minor order.
    chunk_rows : int
        The output rows of one image a chunk holds at most.
    index_dtype : type
        ``np.int32``, or ``np.int64`` where a tile's or a chunk's counts would overflow int32
        (SciPy's sparse kernels are fastest with 32-bit indices).
    """

    def __init__(self, geom: ConvGeometry, cdt: np.dtype, workers: TileWorkers, backward: bool):
        self.geom = geom
        self.cdt = np.dtype(cdt)
        self.workers = workers
        self.grid_pixels = numpy_grid.grid_pixels(geom)  # per image in the channels-last copy
        self._band_images: dict = {}  # first image -> its channels-last copy, for bands of rows
        self.tiles = self._plan(backward)

    def _plan(self, backward: bool) -> List[Tile]:
        """The tiles; sets :attr:`chunk_rows` and :attr:`index_dtype`.

        The workspace limit is shared among the worker threads; the chunk's scratch comes
        out of its tile's share and shrinks to fit it.
        """
        geom, s = self.geom, self.cdt.itemsize
        k, w = geom.kernel_points, geom.out_w
        samples = k * geom.offset_groups
        per_pixel, per_image = scratch_bytes(geom, self.cdt, backward)
        workers = self.workers.count
        limit = max(1, get_workspace_limit() // workers)
        column_bytes = _CHUNK_COLUMN_BYTES
        if not backward:
            column_bytes = min(column_bytes, forward_column_bytes(geom, s))
        cache_rows = min(_CHUNK_SAMPLES // (samples * w), column_bytes // max(1, k * geom.in_channels * s * w))
        self.chunk_rows = max(1, min(cache_rows, (limit - per_image) // (per_pixel * w)))
        chunk_bytes = self.chunk_rows * w * per_pixel
        # A band of rows needs its whole image's copy (and gradient) like the image itself, so
        # bands save no memory here: a tile is never planned under less than one image (a limit
        # below that is exceeded by that one copy), and with no cost per output pixel,
        # plan_tiles cuts images into bands only to give every worker a tile.
        tiles = plan_tiles(geom.batch, geom.out_h, geom.out_w, 0, per_image,
                           limit=max(limit - chunk_bytes, per_image + geom.out_h), min_tiles=workers)
        # The plan's rows index every offset group's copy of the tile's images, stacked.
        too_large = (any(geom.offset_groups * t.images * self.grid_pixels > _INT32_INDEX_MAX for t in tiles)
                     or self.chunk_rows * w * samples * 4 > _INT32_INDEX_MAX)
        self.index_dtype = np.int64 if too_large else np.int32
        return tiles

    @property
    def whole_images(self) -> bool:
        """Whether every tile holds whole images (no image is cut into bands of rows)."""
        return all(t.out_rows == self.geom.out_h for t in self.tiles)

    def chunks(self, tile: Tile) -> List[Tile]:
        """The tile cut into chunks of at most :attr:`chunk_rows` output rows' worth of pixels.

        Whole images where :attr:`chunk_rows` covers several; otherwise bands of rows.  The
        chunks of a tile (of an image) are as even as the rows allow, rather than full ones
        and a short last one whose small products would run below BLAS's speed.
        """
        out_h = self.geom.out_h
        if tile.out_rows == out_h and self.chunk_rows >= out_h:
            per = _even_share(tile.images, self.chunk_rows // out_h)
            return [Tile(b, min(b + per, tile.batch_stop), 0, out_h)
                    for b in range(tile.batch_start, tile.batch_stop, per)]
        rows = _even_share(tile.out_rows, self.chunk_rows)
        return [Tile(b, b + 1, r, min(r + rows, tile.row_stop))
                for b in range(tile.batch_start, tile.batch_stop) for r in range(tile.row_start, tile.row_stop, rows)]

    def scratch(self, per_pixel_values: int, chunks: List[Tile]) -> np.ndarray:
        """A flat buffer for ``per_pixel_values`` values per pixel of any of ``chunks``."""
        pixels = max(c.images * c.out_rows for c in chunks) * self.geom.out_w
        return np.empty(pixels * per_pixel_values, dtype=self.cdt)

    def copy_band_images(self, x: np.ndarray) -> None:
        """The channels-last copies of the images the tiles cut into bands, made by all the workers.

        Bands exist only where there are fewer images than workers, and each worker's share
        of the limit holds one image's copy, so these copies together stay within the limit.
        Made here, in pieces of rows on the worker threads, before the tiles start, rather
        than by the first band to ask while the image's other bands wait for it.
        """
        geom = self.geom
        images = sorted({t.batch_start for t in self.tiles if t.out_rows < geom.out_h})
        if not images:
            return
        grids = {b: numpy_grid.empty_grids(geom, self.cdt, 1) for b in images}
        rows = -(-geom.height // self.workers.count)
        pieces = [InputRows(b, r, min(r + rows, geom.height)) for b in images for r in range(0, geom.height, rows)]

        def copy(piece: InputRows) -> None:
            numpy_grid.copy_rows(geom, x, grids[piece.image], piece.batch, piece.rows)

        for _ in self.workers.map(copy, pieces):
            pass
        self._band_images = {b: numpy_grid.stacked(grid) for b, grid in grids.items()}

    def channels_last(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        """The tile's images channels-last on their zero-bordered grids, ``(G * images * grid pixels, C/G)``.

        A tile of whole images makes its own copy.  Bands of rows of one image share one,
        made by :meth:`copy_band_images` before the tiles start.
        """
        if tile.out_rows == self.geom.out_h:
            grids = numpy_grid.empty_grids(self.geom, self.cdt, tile.images)
            numpy_grid.copy_rows(self.geom, x, grids, tile.batch, slice(0, self.geom.height))
            return numpy_grid.stacked(grids)
        return self._band_images[tile.batch_start]

    def sampling_plan(self, tile: Tile, chunk: Tile, offset: np.ndarray, mask: Optional[np.ndarray],
                      coordinate_corner: bool = False) -> SamplingPlan:
        """The sampling plan of every offset group for ``chunk``, indexing the channels-last copy of ``tile``."""
        off = offset[chunk.batch, :, chunk.rows]
        msk = None if mask is None else mask[chunk.batch, :, chunk.rows]
        return sampling_plan(self.geom, off, msk, row_start=chunk.row_start,
                             first_image=chunk.batch_start - tile.batch_start,
                             group_rows=tile.images * self.grid_pixels, dtype=self.cdt,
                             index_dtype=self.index_dtype, coordinate_corner=coordinate_corner)
