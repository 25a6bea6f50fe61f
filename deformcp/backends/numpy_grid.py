"""The input as the CPU backend's sampling plans read it: channels-last, each image on a zero-bordered grid.

The images are stacked as the rows of one matrix, offset group after offset group:
``(offset groups * images * grid pixels, C / offset groups)``, the ``X`` of
:mod:`.numpy_sampling`'s ``S @ X``, whose rows of group ``g`` hold channels
``g * C/G`` to ``(g + 1) * C/G``.  Each image sits on a grid one pixel larger than the image on every side,
``(H + 2) x (W + 2)`` (:func:`padded_grid`), whose border is zero: every corner a
sample can read then lies on the grid, the ones outside the image on the border, so
the sampling plan needs no test per corner (see :mod:`.numpy_sampling` for the
indices).  In memory the copy is one C-contiguous array
``(offset groups, images, H + 2, W + 2, C / offset groups)``; :func:`stacked` gives the
matrices, :func:`image_view` the way back to NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..geometry import ConvGeometry

__all__ = ["InputRows", "copy_rows", "copy_to_nchw", "empty_grids", "grid_pixels", "image_view", "padded_grid", "stacked"]

# (rows, columns) of the destination copied at a time by a transposing copy.
_TRANSPOSE_BLOCK = (2048, 16)
# Bytes of the channels-last source copied at a time into NCHW.
_NCHW_BLOCK_BYTES = 256 << 10


@dataclass(frozen=True)
class InputRows:
    """Input rows ``start:stop`` of image ``image``: a piece of one image's copy onto its grid."""

    image: int
    start: int
    stop: int

    @property
    def batch(self) -> slice:
        return slice(self.image, self.image + 1)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def padded_grid(geom: ConvGeometry) -> Tuple[int, int]:
    """Rows and columns of the grid each image is stored on: ``(H + 2, W + 2)``, a zero border around it."""
    return geom.height + 2, geom.width + 2


def grid_pixels(geom: ConvGeometry) -> int:
    """Pixels of one image's grid: the rows of the stacked matrix per image."""
    rows, cols = padded_grid(geom)
    return rows * cols


def empty_grids(geom: ConvGeometry, dtype, images: int) -> np.ndarray:
    """An uninitialised ``(G, images, H + 2, W + 2, C/G)`` array with its border zeroed."""
    out = np.empty((geom.offset_groups, images, *padded_grid(geom), geom.channels_per_offset_group), dtype=dtype)
    for border in (out[:, :, 0], out[:, :, -1], out[:, :, :, 0], out[:, :, :, -1]):
        border[...] = 0
    return out


def copy_rows(geom: ConvGeometry, x: np.ndarray, grids: np.ndarray, batch: slice, rows: slice) -> None:
    """Input rows ``rows`` of images ``batch`` of the NCHW ``x`` into their place on ``grids``.

    ``grids`` is an :func:`empty_grids` array with one grid per image of ``batch``.
    """
    g, cg = geom.offset_groups, geom.channels_per_offset_group
    images = batch.stop - batch.start
    source = x[batch, :, rows].reshape(images, g, cg, rows.stop - rows.start, geom.width)
    _blocked_copy(grids[:, :, rows.start + 1:rows.stop + 1, 1:-1], source.transpose(1, 0, 3, 4, 2))


def stacked(grids: np.ndarray) -> np.ndarray:
    """``(G, images, H + 2, W + 2, C/G)`` grids as the stacked matrix ``(G * images * grid pixels, C/G)``, a view."""
    return grids.reshape(-1, grids.shape[-1])


def image_view(geom: ConvGeometry, matrices: np.ndarray, images: int) -> np.ndarray:
    """Inverse of :func:`stacked` without the border: ``(images, G, C/G, H, W)``, a view."""
    grids = matrices.reshape(geom.offset_groups, images, *padded_grid(geom), geom.channels_per_offset_group)
    return grids[:, :, 1:-1, 1:-1].transpose(1, 0, 4, 2, 3)


def copy_to_nchw(geom: ConvGeometry, matrices: np.ndarray, images: int, out: np.ndarray) -> None:
    """``out[...] = image_view(geom, matrices, images)``, ``out`` being ``images`` NCHW images.

    Copied a few rows at a time, all channels at once: a block of the channels-last source
    then stays in cache while its channels are spread over the output's planes, which took
    half the time of one assignment for 256 channels (benchmarks/NOTES.md).
    """
    source = image_view(geom, matrices, images)
    target = out.view()
    target.shape = source.shape  # raises rather than copying, where a reshape would write into a lost copy
    rows = max(1, _NCHW_BLOCK_BYTES // (padded_grid(geom)[1] * geom.in_channels * matrices.itemsize))
    for start in range(0, geom.height, rows):
        target[..., start:start + rows, :] = source[..., start:start + rows, :]


def _blocked_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a transposing copy, in blocks of the last two axes.

    NumPy strides over the whole of both axes at once; blocks whose rows stay in cache
    are faster (``benchmarks/NOTES.md``).
    """
    rows, cols = dst.shape[-2:]
    for r in range(0, rows, _TRANSPOSE_BLOCK[0]):
        for c in range(0, cols, _TRANSPOSE_BLOCK[1]):
            block = (Ellipsis, slice(r, r + _TRANSPOSE_BLOCK[0]), slice(c, c + _TRANSPOSE_BLOCK[1]))
            dst[block] = src[block]
