"""Testing helpers, after :mod:`numpy.testing`: the float64 loop oracle, one relative error, one tolerance table.

The oracle (:func:`loop_im2col`, :func:`loop_deform_conv2d`,
:func:`loop_deform_conv2d_backward`) is written straight from ``docs/semantics.md``
with explicit Python loops and shares no code with the backends, so that it can check
them: the test suite, ``python -m deformcp`` and the benchmarks' agreement checks
compare against it or with :func:`relative_error` under :data:`TOLERANCE`.  The
oracle is slow by design: use it on small problems only.  Where a sum has several
products, they are grouped as torchvision's CPU kernel groups them, so that the
oracle also says where NaN and Inf land (docs/semantics.md, section 11).  Its arguments are NumPy
arrays and the geometry keywords of :func:`deformcp.deform_conv2d`; its results are
float64.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TOLERANCE", "assert_within_tolerance", "loop_deform_conv2d", "loop_deform_conv2d_backward",
           "loop_im2col", "relative_error"]

#: The relative error (:func:`relative_error`) each dtype's results may have against a
#: float64 computation of the same inputs.  The half types are computed in float32 and
#: rounded once, so their bound is a few units of their last place.
TOLERANCE = {"float64": 1e-12, "float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def relative_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||``, computed in float64.

    The one rule for what does not compare: a shape mismatch, or a NaN or an infinity
    in either array, gives ``inf``, so that a non-finite value never passes a tolerance
    unnoticed (tests of non-finite patterns compare them explicitly).  Where
    ``expected`` is all zeros the absolute error is returned.

    Parameters
    ----------
    actual, expected : array_like

    Returns
    -------
    float
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        return float("inf")
    scale = np.linalg.norm(expected)
    difference = np.linalg.norm(actual - expected)
    return float(difference / scale) if scale > 0 else float(difference)


def assert_within_tolerance(actual, expected, dtype="float64", what: str = "result") -> None:
    """Assert that ``relative_error(actual, expected) <= TOLERANCE[dtype]``.

    Parameters
    ----------
    actual, expected : array_like
    dtype : str or dtype
        The dtype whose tolerance applies (``actual``'s dtype, usually).
    what : str
        Named in the failure message.

    Raises
    ------
    AssertionError
        With the shapes when they differ, otherwise with the error and the tolerance.
    """
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    tolerance = TOLERANCE[name]
    actual_shape, expected_shape = np.shape(actual), np.shape(expected)
    assert actual_shape == expected_shape, f"{what}: shape {actual_shape}, expected {expected_shape}"
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g} ({name})"


def _outside(y, x, h, w):
    """The early exit of bilinear sampling: nothing is read outside (-1, H) x (-1, W)."""
    return y <= -1 or y >= h or x <= -1 or x >= w


def _bilinear(img, h, w, y, x):
    """Zero-padded bilinear sample of one channel, with the early exit outside (-1, H) x (-1, W)."""
    if _outside(y, x, h, w):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < h and 0 <= xx < w:
            total += wt * img[yy, xx]
    return total


def _corner_values(img, h, w, y, x):
    y0, x0 = math.floor(y), math.floor(x)
    vals = []
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        vals.append(img[yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0)
    return vals, y - y0, x - x0


def _pad4(padding):
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[1], padding[0], padding[1])
    return tuple(padding)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _positions(x_shape, offset, kh, kw, stride, padding, dilation):
    """Yield (b, g, i, j, k, oy, ox, py, px) for every sample."""
    B = x_shape[0]
    G = offset.shape[1] // (2 * kh * kw)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pl, _, _ = _pad4(padding)
    Ho, Wo = offset.shape[2], offset.shape[3]
    for b in range(B):
        for g in range(G):
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(Ho):
                        for ox in range(Wo):
                            dy = offset[b, g * 2 * kh * kw + 2 * k, oy, ox]
                            dx = offset[b, g * 2 * kh * kw + 2 * k + 1, oy, ox]
                            py = oy * sh - pt + i * dh + dy
                            px = ox * sw - pl + j * dw + dx
                            yield b, g, i, j, k, oy, ox, py, px


@np.errstate(all="ignore")  # NaN and Inf are defined behaviour (docs/semantics.md)
def loop_im2col(x, offset, mask, kh, kw, stride=1, padding=0, dilation=1):
    """The sampled, mask-weighted columns of :func:`deformcp.deform_im2col`, by loops, in float64.

    Parameters
    ----------
    x : array_like, shape (B, C, H, W)
    offset : ndarray, shape (B, 2*G*kh*kw, H_out, W_out)
        Its spatial shape is the output's; ``G`` is inferred from its channels.
    mask : ndarray, shape (B, G*kh*kw, H_out, W_out), or None
        None samples without modulation (a mask of ones).
    kh, kw : int
        Kernel size.
    stride, padding, dilation
        As for :func:`deformcp.deform_conv2d`.

    Returns
    -------
    ndarray, shape (B, C, kh*kw, H_out, W_out), float64
        Element ``[b, c, k, oy, ox]`` is ``mask * bilinear(x[b, c], py, px)`` for kernel
        point ``k``; reshaped to ``(B, C*kh*kw, H_out*W_out)`` it is deform_im2col's layout.
    """
    x = np.asarray(x, np.float64)
    B, C, H, W = x.shape
    G = offset.shape[1] // (2 * kh * kw)
    cg = C // G
    Ho, Wo = offset.shape[2], offset.shape[3]
    cols = np.zeros((B, C, kh * kw, Ho, Wo))
    for b, g, i, j, k, oy, ox, py, px in _positions(x.shape, offset, kh, kw, stride, padding, dilation):
        m = 1.0 if mask is None else mask[b, g * kh * kw + k, oy, ox]
        for c in range(g * cg, (g + 1) * cg):
            cols[b, c, k, oy, ox] = m * _bilinear(x[b, c], H, W, py, px)
    return cols


@np.errstate(all="ignore")  # NaN and Inf are defined behaviour (docs/semantics.md)
def loop_deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1):
    """The forward pass of :func:`deformcp.deform_conv2d`, by loops, in float64.

    Parameters
    ----------
    x, offset, mask, weight, bias
        As for :func:`deformcp.deform_conv2d`, as NumPy arrays (``mask`` and ``bias`` may be None).
    stride, padding, dilation
        As for :func:`deformcp.deform_conv2d`.

    Returns
    -------
    ndarray, shape (B, C_out, H_out, W_out), float64
    """
    x, offset, weight = (np.asarray(a, np.float64) for a in (x, offset, weight))
    mask = None if mask is None else np.asarray(mask, np.float64)
    Cout, cpg, kh, kw = weight.shape
    B, C = x.shape[:2]
    groups = C // cpg
    opg = Cout // groups
    cols = loop_im2col(x, offset, mask, kh, kw, stride, padding, dilation)
    Ho, Wo = cols.shape[3], cols.shape[4]
    y = np.zeros((B, Cout, Ho, Wo))
    for o in range(Cout):
        gi = o // opg
        for c in range(cpg):
            for k in range(kh * kw):
                y[:, o] += weight[o, c, k // kw, k % kw] * cols[:, gi * cpg + c, k]
        if bias is not None:
            y[:, o] += bias[o]
    return y


@np.errstate(all="ignore")  # NaN and Inf are defined behaviour (docs/semantics.md)
def loop_deform_conv2d_backward(grad_out, x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1):
    """The five gradients of :func:`deformcp.deform_conv2d`, by loops, in float64.

    Parameters
    ----------
    grad_out : array_like, shape (B, C_out, H_out, W_out)
        Gradient of the loss with respect to the output.
    x, offset, mask, weight, bias, stride, padding, dilation
        The arguments of :func:`loop_deform_conv2d`.

    Returns
    -------
    dict
        Keyed by input name (``"x"``, ``"offset"``, ``"mask"``, ``"weight"``, ``"bias"``),
        each gradient of its input's shape in float64; ``mask`` and ``bias`` are None when
        those inputs are.
    """
    grad_out, x, offset, weight = (np.asarray(a, np.float64) for a in (grad_out, x, offset, weight))
    mask = None if mask is None else np.asarray(mask, np.float64)
    Cout, cpg, kh, kw = weight.shape
    B, C, H, W = x.shape
    G = offset.shape[1] // (2 * kh * kw)
    cg = C // G
    groups = C // cpg
    opg = Cout // groups
    K = kh * kw
    cols = loop_im2col(x, offset, mask, kh, kw, stride, padding, dilation)
    # grad_columns[b, c, k, oy, ox] = sum_o weight[o, c', k] * grad_out[b, o]
    gcols = np.zeros_like(cols)
    gw = np.zeros_like(weight)
    for c in range(C):
        gi, cl = divmod(c, cpg)
        for o in range(gi * opg, (gi + 1) * opg):
            for k in range(K):
                gcols[:, c, k] += weight[o, cl, k // kw, k % kw] * grad_out[:, o]
                gw[o, cl, k // kw, k % kw] += np.sum(grad_out[:, o] * cols[:, c, k])
    gx = np.zeros_like(x)
    goff = np.zeros_like(offset)
    gmask = None if mask is None else np.zeros_like(mask)
    # Per sample and channel, the products are grouped as torchvision's CPU kernel groups
    # them, so that NaN and Inf reach the same outputs: (mask * coordinate weight) * gc for
    # the offset, gc * (the sample's value, 0 at the early exit) for the mask, and
    # (mask * bilinear weight) * gc into each in-image corner of non-zero weight for x.
    for b, g, i, j, k, oy, ox, py, px in _positions(x.shape, offset, kh, kw, stride, padding, dilation):
        m = 1.0 if mask is None else mask[b, g * K + k, oy, ox]
        dpy = dpx = dm = 0.0
        y0, x0 = math.floor(py), math.floor(px)
        ly, lx = py - y0, px - x0
        for c in range(g * cg, (g + 1) * cg):
            gc = gcols[b, c, k, oy, ox]
            (v1, v2, v3, v4), _, _ = _corner_values(x[b, c], H, W, py, px)
            # coordinate gradient: no early exit (torchvision's rule)
            dpy += (m * (lx * (v4 - v2) + (1 - lx) * (v3 - v1))) * gc
            dpx += (m * (ly * (v4 - v3) + (1 - ly) * (v2 - v1))) * gc
            dm += gc * _bilinear(x[b, c], H, W, py, px)
            if _outside(py, px, H, W):
                continue
            for yy, xx, wy, wx in ((y0, x0, 1 - ly, 1 - lx), (y0, x0 + 1, 1 - ly, lx),
                                   (y0 + 1, x0, ly, 1 - lx), (y0 + 1, x0 + 1, ly, lx)):
                # torchvision visits the corners within distance < 1 of the position: a
                # corner of weight factor 0 (an integer coordinate's far side) is not touched.
                if 0 <= yy < H and 0 <= xx < W and wy > 0 and wx > 0:
                    gx[b, c, yy, xx] += (m * (wy * wx)) * gc
        goff[b, g * 2 * K + 2 * k, oy, ox] = dpy
        goff[b, g * 2 * K + 2 * k + 1, oy, ox] = dpx
        if gmask is not None:
            gmask[b, g * K + k, oy, ox] = dm
    gb = None if bias is None else grad_out.sum(axis=(0, 2, 3))
    return dict(x=gx, offset=goff, mask=gmask, weight=gw, bias=gb)
