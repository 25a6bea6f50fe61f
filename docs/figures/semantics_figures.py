"""The figures of docs/figures/index.md, drawn at build time by matplotlib's plot directive.

Each function draws one figure on a new matplotlib figure.  The channel numbers are
those of docs/semantics.md section 4; the curves of :func:`minus_one_line` are computed
by deformcp itself, so the figure shows what the library does, not what we meant.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

import deformcp

GROUP_COLORS = ("tab:blue", "tab:orange")


def offset_channel_layout(kernel=(3, 3), offset_groups=2):
    """Which offset and mask channel belongs to which kernel point of which offset group."""
    kh, kw = kernel
    K = kh * kw
    figure = plt.figure(figsize=(10, 5.6))
    grid = figure.add_gridspec(2, offset_groups, height_ratios=(3.2, 1.3), hspace=0.35, top=0.84)
    for g in range(offset_groups):
        ax = figure.add_subplot(grid[0, g])
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, facecolor=GROUP_COLORS[g], alpha=0.15,
                                       edgecolor=GROUP_COLORS[g]))
                dy = g * 2 * K + 2 * k
                ax.text(j, i - 0.25, f"k = {k}", ha="center", va="center", fontsize=10, weight="bold")
                ax.text(j, i + 0.03, f"dy {dy}, dx {dy + 1}", ha="center", va="center", fontsize=9)
                ax.text(j, i + 0.28, f"mask {g * K + k}", ha="center", va="center", fontsize=9.5, color="0.35")
        ax.set_xlim(-0.55, kw - 0.45)
        ax.set_ylim(kh - 0.45, -0.55)
        ax.set_aspect("equal")
        ax.set_xticks(range(kw), [f"j={j}" for j in range(kw)])
        ax.set_yticks(range(kh), [f"i={i}" for i in range(kh)])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(f"offset group g = {g}\n(input channels {g}·C/G to {g + 1}·C/G − 1)", fontsize=10)

    strip = figure.add_subplot(grid[1, :])
    channels = 2 * offset_groups * K
    for c in range(channels):
        g, within = divmod(c, 2 * K)
        k, axis = divmod(within, 2)
        strip.add_patch(Rectangle((c, 0), 1, 1, facecolor=GROUP_COLORS[g], alpha=0.35 if axis == 0 else 0.7,
                                  edgecolor="white"))
        strip.text(c + 0.5, 0.5, ("dy" if axis == 0 else "dx"), ha="center", va="center", fontsize=6.5,
                   rotation=90)
        if axis == 0:
            strip.text(c + 1, -0.25, f"k={k}", ha="center", va="top", fontsize=7)
    strip.set_xlim(0, channels)
    strip.set_ylim(-0.9, 1)
    strip.set_xticks(np.arange(0, channels + 1, 2 * K // 3 if K % 3 == 0 else 2))
    strip.set_yticks([])
    strip.set_xlabel(f"offset channel (shape [B, 2·G·kh·kw = {channels}, H_out, W_out]): "
                     "channel g·2K + 2k is dy, g·2K + 2k + 1 is dx")
    for side in ("left", "right", "top"):
        strip.spines[side].set_visible(False)
    figure.suptitle(f"Offset and mask channel numbers of each kernel point (i, j), k = i·kw + j, of a {kh}x{kw} "
                    f"kernel (K = {K}) with G = {offset_groups} offset groups", fontsize=11)
    return figure


def bilinear_cell(ly=0.35, lx=0.6):
    """The four corners of a sample's cell and their weights, each the area of the opposite rectangle."""
    figure, ax = plt.subplots(figsize=(5.2, 4.6))
    corners = {"v1 = (y0, x0)": (0, 0), "v2 = (y0, x0+1)": (0, 1), "v3 = (y0+1, x0)": (1, 0),
               "v4 = (y0+1, x0+1)": (1, 1)}
    weights = {"v1 = (y0, x0)": (1 - ly) * (1 - lx), "v2 = (y0, x0+1)": (1 - ly) * lx,
               "v3 = (y0+1, x0)": ly * (1 - lx), "v4 = (y0+1, x0+1)": ly * lx}
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for (name, (cy, cx)), color in zip(corners.items(), colors):
        # The rectangle between the sample and the opposite corner has the corner's weight as its area.
        y_lo, y_hi = sorted((ly, 1 - cy))
        x_lo, x_hi = sorted((lx, 1 - cx))
        ax.add_patch(Rectangle((x_lo, y_lo), x_hi - x_lo, y_hi - y_lo, facecolor=color, alpha=0.25))
        ax.text((x_lo + x_hi) / 2, (y_lo + y_hi) / 2, f"{weights[name]:.3f}", ha="center", va="center",
                color=color, fontsize=10, weight="bold")
        ax.plot(cx, cy, "o", color=color, markersize=9)
        ax.annotate(name, (cx, cy), xytext=(cx + (0.08 if cx else -0.08), cy + (0.1 if cy else -0.1)),
                    ha="left" if cx else "right", va="top" if cy else "bottom", fontsize=9, color=color)
    ax.plot(lx, ly, "k*", markersize=13)
    ax.annotate("(py, px)", (lx, ly), xytext=(lx + 0.05, ly - 0.05), fontsize=10)
    ax.annotate("", (lx, 0), (0, 0), arrowprops=dict(arrowstyle="<->", color="0.3"))
    ax.text(lx / 2, -0.03, f"lx = {lx}", ha="center", va="bottom", fontsize=9)
    ax.annotate("", (0, ly), (0, 0), arrowprops=dict(arrowstyle="<->", color="0.3"))
    ax.text(-0.03, ly / 2, f"ly = {ly}", ha="right", va="center", fontsize=9, rotation=90)
    ax.set_xlim(-0.5, 1.55)
    ax.set_ylim(1.35, -0.35)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("value = Σ weight · corner; a corner outside the image reads 0", fontsize=10)
    return figure


def _samples_along_a_column(rows, positions):
    """deformcp's value and d value / d py at each vertical position, on an image of ``rows``.

    The image has len(rows) rows, each constant along its width, and one column per
    position; a 1x1 kernel of weight 1 with offset (dy, 0) at output column n samples
    at (positions[n], n), so the output is the sampled value and grad_offset (with a
    gradient of ones) is its derivative along py.
    """
    n, H = len(positions), len(rows)
    x = np.repeat(np.asarray(rows, np.float64)[:, None], n, axis=1)[None, None]
    offset = np.zeros((1, 2, H, n))
    offset[0, 0, 0] = positions  # output row 0 only; the other rows keep zero offsets
    weight = np.ones((1, 1, 1, 1))
    y = deformcp.deform_conv2d(x, offset, None, weight)[0, 0, 0]
    grads = deformcp.deform_conv2d_backward(np.ones((1, 1, H, n)), x, offset, None, weight, wrt=("offset",))
    return y, grads.grad_offset[0, 0, 0]


def minus_one_line(rows=(1.0, 0.6)):
    """The early exit at py <= -1 and py >= H, and the coordinate gradient on the -1 line."""
    H = len(rows)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw=dict(width_ratios=(1, 1.5)))

    # Left: pixel centres around the image, with padding 1 and zero offsets.
    columns = np.arange(3)
    left.axhspan(-2.6, -1, color="tab:red", alpha=0.1)
    left.axhspan(H, H + 1.6, color="tab:red", alpha=0.1)
    for r in range(-2, H + 1):
        inside = 0 <= r < H
        left.plot(columns, [r] * len(columns), "s", markersize=16, color="0.55" if inside else "white",
                  markeredgecolor="0.55")
        left.text(3.0, r, f"row {r}" if inside else f"row {r}: outside, zero", va="center", fontsize=8.5)
    for line in (-1, H):
        left.axhline(line, color="tab:red", linewidth=1.5)
    left.text(-0.6, -2.45, "py <= -1: early exit, the sample is 0", fontsize=8.5, color="tab:red", va="top")
    left.text(-0.6, H + 1.45, f"py >= H = {H}: early exit", fontsize=8.5, color="tab:red", va="bottom")
    left.plot(columns, [-1] * len(columns), "o", color="tab:purple", markersize=8)
    left.annotate("top kernel row of output row 0\n(padding 1, zero offsets): py = -1",
                  (2, -1), xytext=(2.3, -0.5), fontsize=8.5, color="tab:purple", va="center",
                  arrowprops=dict(arrowstyle="->", color="tab:purple"))
    left.set_xlim(-0.7, 5.6)
    left.set_ylim(H + 1.6, -2.6)
    left.set_yticks(np.arange(-2, H + 2))
    left.set_ylabel("py")
    left.set_xlabel("px")
    left.set_xticks(columns)
    left.set_title(f"Pixel centres of an image of H = {H} rows", fontsize=10)

    # Right: value(py) and its derivative as deformcp computes them, at integer px.
    smooth = np.linspace(-2.5, H + 0.5, 301)
    integers = np.arange(-2, H + 1, dtype=np.float64)
    value, slope = _samples_along_a_column(rows, smooth)
    at_integers, slope_at_integers = _samples_along_a_column(rows, integers)
    right.plot(smooth, value, color="tab:blue", label="value(py)")
    right.plot(smooth, slope, color="tab:green", linewidth=1, label="d value / d py (deformcp)")
    right.plot(integers, at_integers, "o", color="tab:blue")
    right.plot(integers, slope_at_integers, "s", color="tab:green", markerfacecolor="none",
               label="at integer py: the right derivative")
    minus_one = int(np.flatnonzero(integers == -1)[0])
    right.annotate(f"py = -1: value {at_integers[minus_one]:g} (early exit),\n"
                   f"gradient {slope_at_integers[minus_one]:g} = x[0] - 0 (torchvision's rule;\n"
                   "mmcv and the original DCNv2 give 0)",
                   (-1, slope_at_integers[minus_one]), xytext=(-2.45, 0.45), fontsize=8.5,
                   arrowprops=dict(arrowstyle="->"))
    for line in (-1, H):
        right.axvline(line, color="tab:red", linewidth=1, linestyle="--")
    right.axhline(0, color="0.6", linewidth=0.8)
    right.set_xlabel("py (px an integer)")
    right.set_title(f"The sample and its derivative; image rows {', '.join(f'{v:g}' for v in rows)}", fontsize=10)
    right.legend(fontsize=8, loc="upper right")
    return figure

