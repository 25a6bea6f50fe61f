"""
Where does a deformable convolution look?
=========================================

An ordinary convolution reads each output pixel's inputs on a fixed grid. A deformable
convolution moves every point of that grid by its own offset, per output pixel, and
reads the image there by bilinear interpolation. This example draws those sampling
positions on a real image with :func:`deformcp.plot.sampling_locations`, for three
offset fields: none, a synthetic swirl, and one that a small model learns in a few
seconds to undo a known warp.
"""

# %%
# The image and the geometry
# --------------------------
# scikit-image ships the "camera" photograph in its wheel, so this runs offline. We work
# on a 128x128 copy, and use a 3x3 kernel with dilation 5 (padding 5 keeps the output
# the size of the input) so that the kernel's points are far enough apart to see.
import math

import matplotlib.pyplot as plt
import numpy as np
from skimage import data, filters, transform

import deformcp
from deformcp.plot import sampling_locations

image = transform.resize(data.camera(), (128, 128), anti_aliasing=True).astype(np.float32)
H, W = image.shape
KERNEL, DILATION = 3, 5
PADDING = DILATION * (KERNEL - 1) // 2
K = KERNEL * KERNEL
geometry = dict(padding=PADDING, dilation=DILATION)
pixels = [(30, 34), (64, 64), (96, 40), (100, 100)]

# %%
# Zero offsets: an ordinary (dilated) convolution
# ------------------------------------------------
# With all offsets zero, kernel point ``(i, j)`` of output pixel ``(oy, ox)`` samples at
# ``(oy - padding + i*dilation, ox - padding + j*dilation)``: the hollow squares, the
# regular grid. Offsets have shape ``[B, 2*K, H_out, W_out]``, a ``(dy, dx)`` pair per
# kernel point.
zero = np.zeros((1, 2 * K, H, W), np.float32)
fig, ax = plt.subplots(figsize=(5, 5))
sampling_locations(zero, pixels, KERNEL, image=image, ax=ax, **geometry)
ax.set_title("Zero offsets: the regular grid")
plt.show()

# %%
# A synthetic offset field: a swirl
# ---------------------------------
# Each output pixel's kernel is turned about the pixel by an angle that is largest at the
# centre of the image and fades with distance, and stretched a little. The offsets are
# where each point should go minus where it is on the regular grid.
i, j = np.divmod(np.arange(K), KERNEL)
rows, cols = np.mgrid[0:H, 0:W].astype(np.float32)
# Position of each kernel point relative to its output pixel, on the regular grid.
rel_y = (i * DILATION - PADDING).astype(np.float32)[:, None, None]
rel_x = (j * DILATION - PADDING).astype(np.float32)[:, None, None]
angle = 1.2 * np.exp(-((rows - H / 2) ** 2 + (cols - W / 2) ** 2) / (2 * 28.0**2))
stretch = 1.0 + 0.4 * np.exp(-((rows - H / 2) ** 2 + (cols - W / 2) ** 2) / (2 * 28.0**2))
turned_y = stretch * (np.cos(angle) * rel_y - np.sin(angle) * rel_x)
turned_x = stretch * (np.sin(angle) * rel_y + np.cos(angle) * rel_x)
swirl = np.empty((1, 2 * K, H, W), np.float32)
swirl[0, 0::2] = turned_y - rel_y  # channel 2k: dy of kernel point k
swirl[0, 1::2] = turned_x - rel_x  # channel 2k+1: dx of kernel point k

# The same offsets drive a deformable convolution: here a 3x3 box filter, which blurs
# along the swirl.
box = np.full((1, 1, KERNEL, KERNEL), 1 / K, np.float32)
swirled = deformcp.deform_conv2d(image[None, None], swirl, None, box, **geometry)[0, 0]

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
sampling_locations(swirl, pixels, KERNEL, image=image, ax=left, **geometry)
left.set_title("A swirl: where the kernel points sample")
right.imshow(swirled, cmap="gray")
right.set_title("deform_conv2d with a box filter and these offsets")
plt.show()

# %%
# Learned offsets: undoing a known warp
# -------------------------------------
# Now a field that comes out of training. We rotate the image by 12 degrees and shift it,
# then ask a small model to find, for every output pixel and kernel point, where to read
# the *warped* image so that a fixed set of filters gives what they give on the
# original. The right answer is known: the inverse warp.
#
# The warp itself is a deformable convolution too: a 1x1 kernel of weight 1 with
# offsets ``d`` is bilinear resampling, ``warped(p) = image(p + d(p))``.
THETA, SHIFT = math.radians(12), (3.0, -2.0)
centre = np.array([(H - 1) / 2, (W - 1) / 2], np.float32)


def rotate(y, x, theta):
    """Rotate the points (y, x) by theta about the centre."""
    cy, cx = centre
    return (math.cos(theta) * (y - cy) - math.sin(theta) * (x - cx) + cy,
            math.sin(theta) * (y - cy) + math.cos(theta) * (x - cx) + cx)


source_y, source_x = rotate(rows, cols, THETA)
warp = np.stack([source_y + SHIFT[0] - rows, source_x + SHIFT[1] - cols])[None].astype(np.float32)
warped = deformcp.deform_conv2d(image[None, None], warp, None, np.ones((1, 1, 1, 1), np.float32))

# %%
# The model is a deformable convolution whose offsets come from six numbers: an affine
# map ``A``, ``t`` of the regular grid, a spatial transformer in miniature. It starts at
# the identity (zero offsets). Its four 3x3 filters are random and fixed: only where they
# look is learned. The loss compares its output on the warped image with the same
# filters' ordinary convolution of the original; both images are blurred a little, which
# widens the basin the bilinear gradient can see.
import torch
import torch.nn.functional as F

import deformcp.torch

torch.manual_seed(0)
filter_bank = torch.randn(4, 1, KERNEL, KERNEL)
blurred = torch.from_numpy(filters.gaussian(image, sigma=1.5).astype(np.float32))[None, None]
blurred_warped = torch.from_numpy(filters.gaussian(warped[0, 0], sigma=1.5).astype(np.float32))[None, None]
target = F.conv2d(blurred, filter_bank, padding=PADDING, dilation=DILATION)

# Regular grid positions of every kernel point at every output pixel: [K, 2, H, W].
grid = torch.from_numpy(np.stack([rows + rel_y, cols + rel_x], axis=1))
middle = torch.from_numpy(centre).view(1, 2, 1, 1)
scale = H / 2  # A and t act on coordinates of order 1


class AffineOffsets(torch.nn.Module):
    """Offsets that move every grid point p to middle + scale * (A (p - middle) / scale + t)."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.eye(2))
        self.t = torch.nn.Parameter(torch.zeros(2))

    def forward(self):
        moved = torch.einsum("ab,kbhw->kahw", self.A, (grid - middle) / scale) + self.t.view(1, 2, 1, 1)
        return (middle + scale * moved - grid).reshape(1, 2 * K, H, W)  # (dy, dx) per kernel point


model = AffineOffsets()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
inner = slice(20, -20)  # the warp brings zeros in at the borders: compare the inside
losses = []
for step in range(80):
    output = deformcp.torch.deform_conv2d(blurred_warped, model(), filter_bank, padding=(PADDING, PADDING),
                                          dilation=(DILATION, DILATION))
    loss = F.mse_loss(output[..., inner, inner], target[..., inner, inner])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"loss {losses[0]:.4f} -> {losses[-1]:.6f} in {len(losses)} steps")

# %%
# The learned map should be the inverse rotation, ``A = R(-12°)``, and the shift back:
with torch.no_grad():
    learned = model().numpy()
print("learned A:\n", model.A.detach().numpy().round(3))
print("inverse rotation:\n", np.array([[math.cos(THETA), math.sin(THETA)],
                                        [-math.sin(THETA), math.cos(THETA)]]).round(3))

# %%
# Where the learned offsets look, on the warped image: the kernels turn with the image.
# The crosses are the exact answer, the inverse warp of each regular grid point. The
# centre kernel point's samples alone, :func:`deformcp.deform_im2col`'s column for
# ``k = 4``, are the image unwarped.
exact_y, exact_x = rotate(rows[None] + rel_y - SHIFT[0], cols[None] + rel_x - SHIFT[1], -THETA)
unwarped = deformcp.deform_im2col(warped, learned, None, KERNEL, **geometry)[0, K // 2].reshape(H, W)

fig, axes = plt.subplots(1, 3, figsize=(14, 5))
axes[0].imshow(image, cmap="gray")
axes[0].set_title("original")
sampling_locations(learned, pixels, KERNEL, image=warped[0, 0], ax=axes[1], **geometry)
for oy, ox in pixels:
    axes[1].scatter(exact_x[:, oy, ox], exact_y[:, oy, ox], marker="+", color="black", s=30, linewidths=0.8, zorder=4)
axes[1].set_title("warped input, learned sampling positions\n(+: the exact inverse warp)")
axes[2].imshow(unwarped, cmap="gray")
axes[2].set_title("samples of the centre kernel point")
plt.show()

# %%
# How far the learned positions are from the exact ones, over the inside of the image:
error = np.hypot(learned[0, 0::2] + rows + rel_y - exact_y, learned[0, 1::2] + cols + rel_x - exact_x)
print(f"median distance to the exact position: {np.median(error[:, inner, inner]):.2f} px, "
      f"95th percentile {np.percentile(error[:, inner, inner], 95):.2f} px")
