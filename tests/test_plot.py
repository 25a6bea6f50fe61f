"""deformcp.plot.sampling_locations draws the positions the semantics define, and refuses bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import deformcp

matplotlib = pytest.importorskip("matplotlib", reason="deformcp.plot needs matplotlib (the [plot] extra)")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import ndimage  # noqa: E402

from deformcp.plot import sampling_locations  # noqa: E402


@pytest.fixture
def ax():
    figure, axes = plt.subplots()
    yield axes
    plt.close(figure)


def _drawn(ax, label):
    """The (x, y) offsets of the collection with this label, as an (n, 2) float array."""
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, f"expected one collection labelled {label!r}, got {len(found)}"
    return np.asarray(found[0].get_offsets(), dtype=np.float64)


def _expected_positions(offset, b, g, oy, ox, kh, kw, stride, pad_top_left, dilation):
    """Written from docs/semantics.md section 5 with plain loops: ([(px, py)] samples, [(x, y)] grid)."""
    K = kh * kw
    samples, grid = [], []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            gy = oy * stride[0] - pad_top_left[0] + i * dilation[0]
            gx = ox * stride[1] - pad_top_left[1] + j * dilation[1]
            dy = float(offset[b, g * 2 * K + 2 * k, oy, ox])
            dx = float(offset[b, g * 2 * K + 2 * k + 1, oy, ox])
            grid.append((gx, gy))
            samples.append((gx + dx, gy + dy))
    return np.array(samples), np.array(grid, dtype=np.float64)


def test_plotted_positions_follow_the_semantics(rng, ax):
    # A geometry where every term of the formula differs along the two axes.
    kh, kw, stride, padding, dilation = 3, 2, (2, 1), (1, 0, 2, 1), (2, 3)
    H, W, B, G = 9, 11, 2, 2
    H_out = (H + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    offset = rng.normal(0, 1.5, (B, 2 * G * kh * kw, H_out, W_out)).astype(np.float32)
    pixels = [(0, 0), (H_out - 1, W_out - 1), (2, 3)]

    sampling_locations(offset, pixels, (kh, kw), input_size=(H, W), stride=stride, padding=padding,
                       dilation=dilation, batch_index=1, offset_group=1, ax=ax)

    for oy, ox in pixels:
        samples, grid = _expected_positions(offset, 1, 1, oy, ox, kh, kw, stride, padding[:2], dilation)
        np.testing.assert_allclose(_drawn(ax, f"samples of ({oy}, {ox})"), samples, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(_drawn(ax, f"kernel grid of ({oy}, {ox})"), grid)


def test_plotted_positions_are_where_deform_im2col_samples(rng, ax):
    # Bilinear interpolation of the image at the drawn positions (SciPy's, order 1) gives
    # deformcp's columns: the drawing shows where the library really reads.
    H, W, kh, kw = 12, 10, 3, 3
    image = rng.standard_normal((H, W))
    offset = rng.uniform(-1.5, 1.5, (1, 2 * kh * kw, H, W))
    pixels = [(4, 4), (6, 5), (7, 3)]  # with padding 1 and |offset| < 1.5, strictly inside the image
    sampling_locations(offset, pixels, 3, image=image, padding=1, ax=ax)
    columns = deformcp.deform_im2col(image[None, None], offset, None, 3, padding=1)[0]
    for oy, ox in pixels:
        px, py = _drawn(ax, f"samples of ({oy}, {ox})").T
        assert (py > 0).all() and (py < H - 1).all() and (px > 0).all() and (px < W - 1).all()
        interpolated = ndimage.map_coordinates(image, [py, px], order=1)
        np.testing.assert_allclose(interpolated, columns[:, oy * W + ox], rtol=1e-10, atol=1e-12)


def test_image_pixels_sit_at_their_coordinates(rng, ax):
    image = rng.random((5, 7))
    sampling_locations(np.zeros((1, 18, 5, 7)), (0, 0), 3, image=image, padding=1, ax=ax)
    (drawn,) = ax.images
    # Pixel (r, c) is centred on x = c, y = r, rows downwards.
    assert drawn.get_extent() == [-0.5, 6.5, 4.5, -0.5]
    np.testing.assert_array_equal(drawn.get_array(), image)


def test_dot_area_follows_the_mask(rng, ax):
    offset = rng.standard_normal((1, 2 * 2 * 9, 6, 6))
    mask = rng.random((1, 2 * 9, 6, 6))
    sampling_locations(offset, [(1, 2)], 3, input_size=(6, 6), padding=1, mask=mask, offset_group=1, ax=ax)
    (samples,) = [c for c in ax.collections if c.get_label() == "samples of (1, 2)"]
    sizes = samples.get_sizes()
    np.testing.assert_allclose(sizes / sizes[0], mask[0, 9:18, 1, 2] / mask[0, 9, 1, 2], rtol=1e-12)


def test_accepts_a_tensor_that_requires_grad(ax):
    torch = pytest.importorskip("torch")
    offset = torch.full((1, 18, 4, 4), 0.25, requires_grad=True)
    sampling_locations(offset, (1, 1), 3, input_size=(4, 4), padding=1, ax=ax)
    np.testing.assert_allclose(_drawn(ax, "samples of (1, 1)")[0], (0.25, 0.25))


def test_draws_on_the_current_axes_by_default(ax):
    plt.sca(ax)
    assert sampling_locations(np.zeros((1, 8, 3, 3)), (2, 2), 2, input_size=(4, 4)) is ax


@pytest.mark.parametrize("call, error, words", [
    (dict(pixels=[(5, 0)]), ValueError, "pixels"),
    (dict(pixels=[(0, -1)]), ValueError, "pixels"),
    (dict(pixels=[(0.5, 1.0)]), TypeError, "pixels"),
    (dict(pixels=[1, 2, 3]), ValueError, "pixels"),
    (dict(input_size=(6, 5)), ValueError, "offset must have shape"),  # an offset field for another input
    (dict(padding=0), ValueError, "offset must have shape"),
    (dict(kernel_size=2), ValueError, "offset.shape[1]"),
    (dict(input_size=None), ValueError, "input_size"),
    (dict(image=np.zeros((4, 4))), ValueError, "input_size"),
    (dict(image=np.zeros((3, 5, 5))), ValueError, "image"),
    (dict(offset=[[0.0]]), TypeError, "offset"),
    (dict(mask=np.ones((1, 9, 5, 4))), ValueError, "mask"),
    (dict(batch_index=1), ValueError, "batch_index"),
    (dict(offset_group=1), ValueError, "offset_group"),
    (dict(offset_group=True), TypeError, "offset_group"),
])
def test_bad_arguments_are_refused_naming_them(ax, call, error, words):
    arguments = dict(offset=np.zeros((1, 18, 5, 5)), pixels=[(0, 0)], kernel_size=3, input_size=(5, 5),
                     padding=1, ax=ax)
    arguments.update(call)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        sampling_locations(**arguments)
    assert not ax.collections  # refused before drawing anything


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"deformcp\[plot\]"):
        sampling_locations(np.zeros((1, 18, 5, 5)), (0, 0), 3, input_size=(5, 5), padding=1)
