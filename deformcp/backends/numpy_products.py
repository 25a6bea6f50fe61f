"""The CPU backend's products with the weight: the output, the gradient columns, the weight gradient.

Given a chunk's columns ``(pixels, K, C)`` (the sampled input, channels ordered as the
input's), a convolution is one reduction per convolution group over its ``K * C/groups``
columns.  Two ways to run it, chosen once per call by :func:`weight_products`:

- :class:`GroupProducts`: one BLAS matrix product per group.  The right tool when a
  group has many channels: BLAS runs at the core's peak.
- :class:`DepthwiseProducts`: one channel per group (``groups == in_channels``, depthwise
  convolution, each input channel feeding ``C_out / C`` output channels).  A BLAS product
  per group would be a dot product of ``K`` numbers, and splitting the columns by group a
  transposing copy of all of them; instead each product is one ``einsum`` reduction over
  the kernel points (or the pixels) for all the channels at once, which streams through
  the columns in their own layout.

Both compute each result as a sum of the same products, only in another order; whether
such a sum is finite, NaN or infinite does not depend on the order (short of an overflow),
so NaN and infinity land where torchvision's products put them (docs/semantics.md,
section 11).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ..geometry import ConvGeometry
from ..workspace import Tile

__all__ = ["DepthwiseProducts", "GroupProducts", "forward_column_bytes", "weight_products"]

# The forward's chunk of columns, in bytes (benchmarks/NOTES.md has the sizes measured).  BLAS
# products: at least twice the weight's size, a chunk of twice as many pixels as output
# channels, for BLAS packs the weight once per product, which smaller chunks would repeat for
# fewer rows.  Depthwise products stream through the columns: smaller chunks stay in cache.
_BLAS_FORWARD_COLUMN_BYTES = 8 << 20
_DEPTHWISE_FORWARD_COLUMN_BYTES = 4 << 20


def _depthwise(geom: ConvGeometry) -> bool:
    return geom.channels_per_group == 1 and geom.groups > 1


def weight_products(geom: ConvGeometry, cdt: np.dtype, weight: np.ndarray, bias: Optional[np.ndarray] = None):
    """The products of one call: :class:`DepthwiseProducts` for one channel per group, else :class:`GroupProducts`."""
    kind = DepthwiseProducts if _depthwise(geom) else GroupProducts
    return kind(geom, cdt, weight, bias)


def forward_column_bytes(geom: ConvGeometry, itemsize: int) -> int:
    """The bytes of columns a forward chunk should hold for the products :func:`weight_products` picks."""
    if _depthwise(geom):
        return _DEPTHWISE_FORWARD_COLUMN_BYTES
    weight_bytes = geom.kernel_points * geom.channels_per_group * geom.out_channels * itemsize
    return max(_BLAS_FORWARD_COLUMN_BYTES, 2 * weight_bytes)


def tile_view(array: np.ndarray, tile: Tile, groups: int) -> np.ndarray:
    """``array[tile.batch, :, tile.rows]`` of an NCHW array as ``(images, groups, C/groups, rows*W)``, a view."""
    view = array[tile.batch, :, tile.rows]
    # Assigning .shape (unlike reshape) raises instead of silently copying.
    view.shape = (tile.images, groups, view.shape[1] // groups, tile.out_rows * array.shape[3])
    return view


class GroupProducts:
    """One BLAS product per convolution group.

    The weight is held as per-group matrices, columns ordered ``(k, c)`` like the columns:
    ``(groups, C_out/g, K*C/g)`` for the backward's products (:attr:`wmat`), transposed and
    contiguous for the forward's, where OpenBLAS runs 2-3% faster than on a transposed view.
    """

    def __init__(self, geom: ConvGeometry, cdt: np.dtype, weight: np.ndarray, bias: Optional[np.ndarray]):
        self.geom = geom
        self._weight = weight.astype(cdt, copy=False)
        self._bias = _bias_column(geom, cdt, bias)

    @functools.cached_property
    def wmat(self) -> np.ndarray:
        """The weight as per-group matrices ``(groups, C_out/g, K*C/g)``."""
        geom = self.geom
        return (self._weight.transpose(0, 2, 3, 1)
                .reshape(geom.groups, geom.out_channels_per_group, geom.kernel_points * geom.channels_per_group))

    @functools.cached_property
    def _weight_t(self) -> np.ndarray:
        """``(groups, 1, K*C/g, C_out/g)``, contiguous: the same weight for every image of a chunk."""
        geom = self.geom
        k, cc, cout = geom.kernel_points, geom.channels_per_group, geom.out_channels_per_group
        split = self._weight.reshape(geom.groups, cout, cc, k).transpose(0, 3, 2, 1)  # (groups, k, c, o)
        return np.ascontiguousarray(split).reshape(geom.groups, 1, k * cc, cout)

    def output(self, cols: np.ndarray, chunk: Tile, scratch: np.ndarray, out: np.ndarray) -> None:
        """The chunk's output from its columns ``(pixels, K, C)``, bias added, into ``out``.

        ``out`` is the chunk's part of the NCHW output as :func:`tile_view` gives it; the
        product is computed in ``scratch``.
        """
        per_group = self._per_group(cols, chunk)
        cout = self.geom.out_channels_per_group
        # Pixels as the rows of the product: (groups, images, pixels, K*C/g) @ (groups, 1, K*C/g, Cout/g).
        # OpenBLAS runs this orientation faster than C_out as the rows, by more than the
        # transposed copy into NCHW costs (benchmarks/NOTES.md).
        y = scratch[:per_group.size // per_group.shape[-1] * cout].reshape(*per_group.shape[:3], cout)
        np.matmul(per_group, self._weight_t, out=y)
        _copy_with_bias(out, y.transpose(1, 0, 3, 2), self._bias)

    def gradient_columns(self, go: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """``grad_out^T @ weight`` per group as ``(pixels, K, C)``, in ``scratch`` where the layout allows.

        ``go`` is :meth:`grad_out`'s ``(images, groups, Cout/g, pixels per image)``.
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

    def weight_gradient(self, go: np.ndarray, cols: np.ndarray, chunk: Tile, into: np.ndarray) -> None:
        """Adds ``sum over pixels of go @ cols`` per group into ``into`` (:meth:`zero_weight_gradient`).

        ``go`` is ``(images, groups, Cout/g, pixels)``, ``cols`` ``(pixels, K, C)``.
        One product over all the chunk's pixels, so that BLAS does the sum over images rather
        than a temporary weight-sized matrix per image (which the workspace limit does not bound).
        """
        per_group = self._per_group(cols, chunk)
        groups, images, pixels, kc = per_group.shape
        if images == 1:
            into += np.matmul(go[0], per_group[:, 0])
            return
        go_g = np.ascontiguousarray(go.transpose(1, 2, 0, 3)).reshape(groups, go.shape[2], images * pixels)
        into += np.matmul(go_g, per_group.reshape(groups, images * pixels, kc))

    @staticmethod
    def grad_out(go: np.ndarray) -> np.ndarray:
        """A chunk's ``grad_out`` as the other two take it: :func:`tile_view`'s ``(images, groups, Cout/g, pixels)``."""
        return go

    def zero_weight_gradient(self) -> np.ndarray:
        """A zeroed partial weight gradient, in the layout :meth:`weight_gradient` adds into."""
        return np.zeros_like(self.wmat)

    def weight_gradient_nchw(self, grad: np.ndarray) -> np.ndarray:
        """A summed :meth:`weight_gradient` as ``(C_out, C/groups, kh, kw)``, a view."""
        geom = self.geom
        return (grad.reshape(geom.out_channels, geom.kernel_h, geom.kernel_w, geom.channels_per_group)
                .transpose(0, 3, 1, 2))

    def _per_group(self, cols: np.ndarray, chunk: Tile) -> np.ndarray:
        """``(pixels, K, C)`` -> ``(groups, images, pixels per image, K*C/groups)``, the weight matrices' columns."""
        geom = self.geom
        shape = (geom.groups, chunk.images, chunk.out_rows * geom.out_w, geom.kernel_points * geom.channels_per_group)
        if geom.groups == 1:
            return cols.reshape(shape)
        split = cols.reshape(-1, geom.kernel_points, geom.groups, geom.channels_per_group).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(split).reshape(shape)


class DepthwiseProducts:
    """One input channel per group: each product one ``einsum`` over all the channels at once.

    With ``m = C_out / C`` output channels per input channel, output channel ``c * m + o``
    reads input channel ``c``; the weight is held as ``(m, K, C)``.
    """

    def __init__(self, geom: ConvGeometry, cdt: np.dtype, weight: np.ndarray, bias: Optional[np.ndarray]):
        self.geom = geom
        c, m, k = geom.in_channels, geom.out_channels_per_group, geom.kernel_points
        self.wmat = np.ascontiguousarray(weight.astype(cdt, copy=False).reshape(c, m, k).transpose(1, 2, 0))
        self._bias = _bias_column(geom, cdt, bias)

    def output(self, cols: np.ndarray, chunk: Tile, scratch: np.ndarray, out: np.ndarray) -> None:
        """As :meth:`GroupProducts.output`: ``y[p, c, o] = sum_k cols[p, k, c] * w[o, k, c]``."""
        c, m = self.geom.in_channels, self.geom.out_channels_per_group
        pixels = cols.shape[0]
        y = scratch[:pixels * c * m].reshape(pixels, c, m)
        for o in range(m):
            np.einsum("pkc,kc->pc", cols, self.wmat[o], out=y[:, :, o])
        _copy_with_bias(out, y.reshape(chunk.images, -1, c, m).transpose(0, 2, 3, 1), self._bias)

    def gradient_columns(self, go: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """As :meth:`GroupProducts.gradient_columns`: ``g[p, k, c] = sum_o go[p, c, o] * w[o, k, c]``.

        ``go`` is :meth:`grad_out`'s ``(pixels, C, m)``.
        """
        geom = self.geom
        gp = go
        out = scratch[:gp.shape[0] * geom.kernel_points * geom.in_channels].reshape(gp.shape[0], geom.kernel_points,
                                                                                   geom.in_channels)
        np.einsum("pc,kc->pkc", gp[:, :, 0], self.wmat[0], out=out)
        for o in range(1, gp.shape[2]):
            out += np.einsum("pc,kc->pkc", gp[:, :, o], self.wmat[o])
        return out

    def weight_gradient(self, go: np.ndarray, cols: np.ndarray, chunk: Tile, into: np.ndarray) -> None:
        """As :meth:`GroupProducts.weight_gradient`: ``into[o, k, c] += sum_p go[p, c, o] * cols[p, k, c]``."""
        gp = go
        for o in range(gp.shape[2]):
            into[o] += np.einsum("pkc,pc->kc", cols, gp[:, :, o])

    def zero_weight_gradient(self) -> np.ndarray:
        """A zeroed partial weight gradient, ``(m, K, C)``."""
        return np.zeros_like(self.wmat)

    def weight_gradient_nchw(self, grad: np.ndarray) -> np.ndarray:
        """A summed :meth:`weight_gradient` as ``(C_out, 1, kh, kw)``, a view."""
        geom = self.geom
        return grad.transpose(2, 0, 1).reshape(geom.out_channels, 1, geom.kernel_h, geom.kernel_w)

    @staticmethod
    def grad_out(go: np.ndarray) -> np.ndarray:
        """A chunk's ``grad_out`` as the other two take it: from :func:`tile_view`'s ``(images, C, m, pixels)``
        to ``(images * pixels, C, m)``, contiguous for the reductions."""
        return np.ascontiguousarray(go.transpose(0, 3, 1, 2)).reshape(-1, go.shape[1], go.shape[2])


def _bias_column(geom: ConvGeometry, cdt: np.dtype, bias: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The bias as ``(groups, C_out/g, 1)``, to broadcast over :func:`tile_view`'s pixels; or None."""
    if bias is None:
        return None
    return bias.astype(cdt, copy=False).reshape(geom.groups, geom.out_channels_per_group, 1)


def _copy_with_bias(out: np.ndarray, y: np.ndarray, bias: Optional[np.ndarray]) -> None:
    """``out[...] = y + bias`` in one pass where the types allow (``y`` is a transposed view)."""
    if bias is None:
        out[...] = y
    elif out.dtype == y.dtype:
        np.add(y, bias, out=out)
    else:  # float16 and bfloat16 round once, after the sum in the compute type
        np.add(y, bias, out=y)
        out[...] = y
