"""Pictures of a deformable convolution: where its kernel points sample the input.

Needs matplotlib (``pip install "deformcp[plot]"``), imported only when a function
here draws.
"""

from __future__ import annotations

import numpy as np

from . import interop
from .geometry import IntPair, Padding, im2col_geometry, normalize_pair

__all__ = ["sampling_locations"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('deformcp.plot needs matplotlib: pip install "deformcp[plot]"') from error
    return plt


def _host(array):
    """A float64 NumPy copy of an array that :func:`deformcp.interop.native` produced (NumPy or CuPy)."""
    if array is None:
        return None
    return np.array(array.get() if hasattr(array, "get") else array, dtype=np.float64)


def _output_pixels(pixels, out_h: int, out_w: int) -> np.ndarray:
    """``pixels`` as an ``(n, 2)`` int array of ``(oy, ox)``, each inside the output."""
    table = np.asarray(pixels)
    if table.ndim == 1 and table.shape == (2,):
        table = table[None]
    if table.ndim != 2 or table.shape[1] != 2 or table.shape[0] == 0:
        raise ValueError(f"pixels must be one (oy, ox) pair or a sequence of them, got shape {table.shape}")
    if table.dtype.kind not in "iu":
        raise TypeError(f"pixels must be integers (output rows and columns), got dtype {table.dtype}")
    outside = ~((table[:, 0] >= 0) & (table[:, 0] < out_h) & (table[:, 1] >= 0) & (table[:, 1] < out_w))
    if outside.any():
        raise ValueError(f"pixels must lie in the output, rows 0..{out_h - 1} and columns 0..{out_w - 1}, "
                         f"got {[tuple(int(v) for v in p) for p in table[outside]]}")
    return table.astype(np.int64)


def _check_index(value, count: int, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < count:
        raise ValueError(f"{name} must be in 0..{count - 1} ({count} {what}), got {value}")
    return int(value)


def sampling_locations(offset, pixels, kernel_size: IntPair, *, input_size=None, image=None, stride: IntPair = 1,
                       padding: Padding = 0, dilation: IntPair = 1, mask=None, batch_index: int = 0,
                       offset_group: int = 0, ax=None):
    """Draw where the kernel points of chosen output pixels sample the input.

    Kernel point ``(i, j)`` of output pixel ``(oy, ox)`` samples the input at

    ``py = oy*stride_h - pad_top + i*dilation_h + dy``,
    ``px = ox*stride_w - pad_left + j*dilation_w + dx``

    (``docs/semantics.md``, section 5), with ``(dy, dx)`` read from ``offset``.  For each
    output pixel this draws the kernel's regular grid (the positions without offsets,
    hollow squares), a line from each grid point to where it samples, and the
    sampling positions themselves (dots), in one colour per output pixel, over the
    image when one is given.  Pixel ``(r, c)`` of the input is drawn at ``x = c,
    y = r``, rows downwards, as :func:`matplotlib.pyplot.imshow` draws an image.

    Parameters
    ----------
    offset : array, shape (B, 2*G*kh*kw, H_out, W_out)
        The offsets, as passed to :func:`deformcp.deform_conv2d`: NumPy, CuPy, or any
        DLPack array (a PyTorch tensor that requires grad is fine).
    pixels : (int, int) or sequence of (int, int)
        The output pixels ``(oy, ox)`` to draw.
    kernel_size : int or (int, int)
        ``(kh, kw)``.
    input_size : (int, int), optional
        The input's ``(H, W)``; taken from ``image`` when that is given.
    image : array, shape (H, W) or (H, W, 3 or 4), optional
        Drawn underneath (grey levels, or RGB(A) as :func:`~matplotlib.pyplot.imshow`
        takes them), typically a channel of the convolution's input.
    stride, padding, dilation
        As for :func:`deformcp.deform_conv2d`; ``padding`` may be
        ``(top, left, bottom, right)``.
    mask : array, shape (B, G*kh*kw, H_out, W_out), optional
        The modulation (DCNv2): each dot's area is proportional to its mask value.
    batch_index : int
        The image of the batch whose offsets are drawn.
    offset_group : int
        The offset group whose offsets are drawn.
    ax : matplotlib.axes.Axes, optional
        Where to draw; the current axes by default.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.  For each output pixel, in the order given, it holds two
        collections, labelled ``"kernel grid of (oy, ox)"`` and ``"samples of (oy, ox)"``,
        whose offsets are the ``(x, y) = (px, py)`` positions of kernel points
        ``k = i*kw + j`` in order.

    Raises
    ------
    ValueError
        If the offset's (or mask's) shape does not fit the geometry and the input size,
        if ``pixels`` lie outside the output, if neither ``input_size`` nor ``image`` is
        given or they disagree, or if ``batch_index`` or ``offset_group`` is out of range.
    TypeError
        If ``offset`` or ``mask`` is not an array, or an index is not an int.
    ImportError
        If matplotlib is not installed.

    Examples
    --------
    Zero offsets, except that every kernel point of the only offset group moves half a
    pixel down:

    >>> import numpy as np
    >>> from deformcp.plot import sampling_locations
    >>> offset = np.zeros((1, 18, 8, 8))
    >>> offset[:, 0::2] = 0.5                      # the dy channels
    >>> ax = sampling_locations(offset, [(2, 3)], 3, input_size=(8, 8), padding=1)
    >>> [collection.get_label() for collection in ax.collections]
    ['kernel grid of (2, 3)', 'samples of (2, 3)']
    >>> np.asarray(ax.collections[1].get_offsets())[:3]   # (px, py) of kernel points (0, 0), (0, 1), (0, 2)
    array([[2. , 1.5],
           [3. , 1.5],
           [4. , 1.5]])
    """
    kh, kw = normalize_pair(kernel_size, "kernel_size")
    with interop.native(offset=offset, mask=mask) as call:
        offsets, masks = _host(call.arrays["offset"]), _host(call.arrays["mask"])
    if offsets.ndim != 4:
        raise ValueError(f"offset must be 4-D [B, 2*offset_groups*kh*kw, H_out, W_out], got shape {offsets.shape}")
    if image is not None:
        image = np.asarray(image)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"image must have shape (H, W) or (H, W, 3 or 4), got {image.shape}")
        if input_size is not None and tuple(input_size) != image.shape[:2]:
            raise ValueError(f"input_size {tuple(input_size)} disagrees with the image's (H, W) {image.shape[:2]}")
        input_size = image.shape[:2]
    if input_size is None:
        raise ValueError("input_size (H, W) is needed when no image is given")
    height, width = normalize_pair(input_size, "input_size")

    # The offsets define the offset groups; one channel per group is the smallest input they fit.
    groups = max(offsets.shape[1] // (2 * kh * kw), 1)
    geom = im2col_geometry((offsets.shape[0], groups, height, width), offsets.shape,
                           None if masks is None else masks.shape, (kh, kw),
                           stride=stride, padding=padding, dilation=dilation)
    batch_index = _check_index(batch_index, geom.batch, "batch_index", "images in the batch")
    offset_group = _check_index(offset_group, geom.offset_groups, "offset_group", "offset groups")
    table = _output_pixels(pixels, geom.out_h, geom.out_w)
    plt = _pyplot()
    ax = plt.gca() if ax is None else ax

    if image is not None:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    else:
        ax.add_patch(plt.Rectangle((-0.5, -0.5), width, height, fill=False, edgecolor="0.5", linewidth=1))
        ax.set_aspect("equal")
        if not ax.yaxis_inverted():
            ax.invert_yaxis()

    points = geom.kernel_points
    i, j = np.divmod(np.arange(points), kw)
    dy_channels = offset_group * 2 * points + 2 * np.arange(points)
    colors = plt.get_cmap("tab10")
    top, left = geom.padding[:2]
    for n, (oy, ox) in enumerate(table):
        grid_y = oy * geom.stride[0] - top + i * geom.dilation[0]
        grid_x = ox * geom.stride[1] - left + j * geom.dilation[1]
        py = grid_y + offsets[batch_index, dy_channels, oy, ox]
        px = grid_x + offsets[batch_index, dy_channels + 1, oy, ox]
        color = colors(n % colors.N)
        sizes = 30.0 if masks is None else 30.0 * masks[batch_index, offset_group * points + np.arange(points), oy, ox]
        ax.scatter(grid_x, grid_y, s=30, marker="s", facecolors="none", edgecolors=[color], linewidths=1,
                   label=f"kernel grid of ({oy}, {ox})")
        for x0, y0, x1, y1 in zip(grid_x, grid_y, px, py):
            ax.plot([x0, x1], [y0, y1], color=color, linewidth=0.8)
        ax.scatter(px, py, s=sizes, color=[color], edgecolors="white", linewidths=0.5, zorder=3,
                   label=f"samples of ({oy}, {ox})")
    return ax
