"""The workspace limit, and the tiling of a convolution into pieces that respect it.

Deformable convolution materialises a column matrix of ``C*kh*kw`` values per
output pixel, which for large inputs would not fit in memory.  Every backend
therefore processes the output in *tiles*: ranges of the batch, and, when one
image alone is too large, bands of output rows.  Each backend states how many
bytes of scratch space one output pixel and one input image need; this module
picks the largest tiles whose scratch space stays under the limit.

The limit is 256 MiB on the CPU unless the environment variable
``DEFORMCP_WORKSPACE_BYTES`` or :func:`set_workspace_limit` says otherwise.  On a GPU,
where a wide product is much faster than several narrow ones, the default is instead
1/16 of the device's memory, clamped to [256 MiB, 4 GiB] (:func:`device_workspace_limit`);
a limit that was set applies to every device.  It bounds the scratch space, not the
inputs and outputs themselves.  The smallest tile is one output row of one image, so a
limit below that row's need is exceeded rather than failing.
"""

from __future__ import annotations

import contextlib
import operator
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "DEVICE_WORKSPACE_FRACTION",
    "MAX_DEVICE_WORKSPACE_BYTES",
    "Tile",
    "device_workspace_limit",
    "get_workspace_limit",
    "set_workspace_limit",
    "workspace_limit",
    "plan_tiles",
]

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
# The GPU default: this fraction of the device's memory, within
# [DEFAULT_WORKSPACE_BYTES, MAX_DEVICE_WORKSPACE_BYTES].
DEVICE_WORKSPACE_FRACTION = 1 / 16
MAX_DEVICE_WORKSPACE_BYTES = 4 * 2**30


def _checked_limit(nbytes, source: str) -> int:
    """``nbytes`` as a positive int; a str (or a bool, or a float) is refused, not parsed."""
    try:
        if isinstance(nbytes, bool):
            raise TypeError
        value = operator.index(nbytes)
    except TypeError:
        raise TypeError(f"{source} must be an integer number of bytes, got {type(nbytes).__name__} "
                        f"{nbytes!r}") from None
    if value < 1:
        raise ValueError(f"{source} must be a positive number of bytes, got {value}")
    return value


def _limit_from_environment(variable: str = "DEFORMCP_WORKSPACE_BYTES") -> Optional[int]:
    """The limit the environment sets, or None (the defaults apply)."""
    text = os.environ.get(variable)
    if text is None:
        return None
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"{variable} must be an integer number of bytes, got {text!r}") from None
    return _checked_limit(value, variable)


# The limit that was set (environment or set_workspace_limit), or None for the defaults.
_limit: Optional[int] = _limit_from_environment()


def get_workspace_limit() -> int:
    """Return the scratch-space limit in bytes that the CPU backend tiles its work under.

    The limit that was set, else :data:`DEFAULT_WORKSPACE_BYTES`.  The GPU's is
    :func:`device_workspace_limit`.
    """
    return DEFAULT_WORKSPACE_BYTES if _limit is None else _limit


def device_workspace_limit(device_memory: int) -> int:
    """The scratch-space limit in bytes on a GPU with ``device_memory`` bytes of memory.

    The limit that was set (``DEFORMCP_WORKSPACE_BYTES`` or :func:`set_workspace_limit`)
    if any; else ``device_memory * DEVICE_WORKSPACE_FRACTION`` within
    ``[DEFAULT_WORKSPACE_BYTES, MAX_DEVICE_WORKSPACE_BYTES]`` (1 GiB on a 16 GiB card,
    4 GiB from 64 GiB up).

    Parameters
    ----------
    device_memory : int
        The device's total memory in bytes.

    Returns
    -------
    int
    """
    if _limit is not None:
        return _limit
    return min(max(int(device_memory * DEVICE_WORKSPACE_FRACTION), DEFAULT_WORKSPACE_BYTES),
               MAX_DEVICE_WORKSPACE_BYTES)


def set_workspace_limit(nbytes: int) -> int:
    """Set the scratch-space limit in bytes, for every backend; return the previous (CPU) limit.

    Parameters
    ----------
    nbytes : int
        A positive number of bytes.  Once set, it replaces the GPU's device-sized default too.

    Returns
    -------
    int
        The limit :func:`get_workspace_limit` returned before the call.

    Raises
    ------
    TypeError
        If ``nbytes`` is not an integer (a str, a float or a bool).
    ValueError
        If ``nbytes`` is below 1.
    """
    global _limit
    previous, _limit = get_workspace_limit(), _checked_limit(nbytes, "nbytes")
    return previous


@contextlib.contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Context manager that sets the workspace limit and restores the previous setting on exit.

    Restored exactly: where no limit had been set, the defaults (the GPU's device-sized one
    included) apply again.

    Parameters
    ----------
    nbytes : int
        As for :func:`set_workspace_limit`.
    """
    global _limit
    saved = _limit
    set_workspace_limit(nbytes)
    try:
        yield
    finally:
        _limit = saved


@dataclass(frozen=True)
class Tile:
    """A piece of the output: images ``batch_start:batch_stop``, output rows ``row_start:row_stop``."""

    batch_start: int
    batch_stop: int
    row_start: int
    row_stop: int

    @property
    def batch(self) -> slice:
        return slice(self.batch_start, self.batch_stop)

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def images(self) -> int:
        return self.batch_stop - self.batch_start

    @property
    def out_rows(self) -> int:
        return self.row_stop - self.row_start


def plan_tiles(batch: int, out_h: int, out_w: int, bytes_per_pixel: int, bytes_per_image: int,
               limit: int | None = None, min_tiles: int = 1) -> List[Tile]:
    """Split ``batch`` images of ``out_h x out_w`` output pixels into tiles under the workspace limit.

    Parameters
    ----------
    batch, out_h, out_w : int
        The output's batch size and spatial size.
    bytes_per_pixel : int
        Scratch bytes one output pixel of one image needs.
    bytes_per_image : int
        Scratch bytes one input image needs whatever the number of its output rows in the tile
        (a channels-last copy of it, for example).
    limit : int, optional
        Bytes one tile may use; defaults to :func:`get_workspace_limit`.
    min_tiles : int, optional
        Split further, where the shape allows, so that there are at least this many tiles
        (one per worker thread): first by images, then by bands of rows.

    Returns
    -------
    list of Tile
        Groups of whole images where a whole image fits, otherwise bands of rows of
        single images; in batch-major, row-minor order, covering every output row once.
    """
    limit = get_workspace_limit() if limit is None else limit
    image_bytes = bytes_per_image + bytes_per_pixel * out_h * out_w
    if image_bytes <= limit and batch >= min_tiles:
        per_tile = max(1, min(limit // max(image_bytes, 1), batch // min_tiles))
        return [Tile(b, min(b + per_tile, batch), 0, out_h) for b in range(0, batch, per_tile)]
    row_bytes = bytes_per_pixel * out_w
    rows = max(1, (limit - bytes_per_image) // max(row_bytes, 1)) if limit > bytes_per_image else 1
    bands_wanted = -(-min_tiles // max(batch, 1))
    rows = max(1, min(rows, out_h // bands_wanted))
    return [Tile(b, b + 1, r, min(r + rows, out_h)) for b in range(batch) for r in range(0, out_h, rows)]
