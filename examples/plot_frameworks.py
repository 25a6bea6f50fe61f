"""
NumPy, PyTorch and JAX side by side
===================================

One deformable convolution, computed three ways on the same inputs: with the plain
functions on NumPy arrays, with :mod:`deformcp.torch` (an operator with autograd), and
with :mod:`deformcp.jax` (a ``custom_vjp``, under ``jit``). All three run the same CPU
backend, so they give the same numbers; what differs is how the gradients are asked for.
"""

# %%
# The inputs
# ----------
# A batch of two 16x16 images with 4 channels, a 3x3 kernel with 6 output channels, one
# offset group, and a modulation mask (DCNv2). Offsets are drawn with a spread of one
# pixel, so samples fall between pixels and a few outside the image.
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch

import deformcp
import deformcp.jax
import deformcp.testing
import deformcp.torch
from deformcp.testing import relative_error

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
offset = rng.standard_normal((2, 2 * 9, 16, 16), dtype=np.float32)
mask = rng.random((2, 9, 16, 16), dtype=np.float32)
weight = rng.standard_normal((6, 4, 3, 3), dtype=np.float32) / 6
grad_out = rng.standard_normal((2, 6, 16, 16), dtype=np.float32)  # dL/dy of a loss L = sum(y * grad_out)

# %%
# NumPy: the plain functions
# --------------------------
# :func:`deformcp.deform_conv2d` takes NumPy arrays (or any DLPack array) and returns the
# caller's array type. Its gradients come from a separate call,
# :func:`deformcp.deform_conv2d_backward`, given the gradient of the output.
y_numpy = deformcp.deform_conv2d(x, offset, mask, weight, padding=1)
grads_numpy = deformcp.deform_conv2d_backward(grad_out, x, offset, mask, weight, padding=1)
print(type(y_numpy).__name__, y_numpy.shape)

# %%
# PyTorch: autograd
# -----------------
# :func:`deformcp.torch.deform_conv2d` records the operation for autograd; the gradients
# land in ``.grad``. It takes ``torchvision.ops.deform_conv2d``'s arguments, in its order:
# the mask comes last, as a keyword.
xt, offset_t, mask_t, weight_t = (torch.from_numpy(a).requires_grad_() for a in (x, offset, mask, weight))
y_torch = deformcp.torch.deform_conv2d(xt, offset_t, weight_t, padding=(1, 1), mask=mask_t)
(y_torch * torch.from_numpy(grad_out)).sum().backward()
print(type(y_torch).__name__, tuple(y_torch.shape))

# %%
# JAX: ``jit`` and ``grad``
# -------------------------
# :func:`deformcp.jax.deform_conv2d` takes the arguments of :func:`deformcp.deform_conv2d`;
# it is differentiable and traceable, and ``jax.grad`` asks only for the gradients it needs.


@jax.jit
def loss(x, offset, mask, weight):
    y = deformcp.jax.deform_conv2d(x, offset, mask, weight, padding=1)
    return jnp.sum(y * grad_out), y


(_, y_jax), grads_jax = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, offset, mask, weight)
print(type(y_jax).__name__, y_jax.shape)

# %%
# The same numbers
# ----------------
# The results and each gradient, compared with NumPy's by relative error,
# ``||a - b|| / ||b||`` (:func:`deformcp.testing.relative_error`):
names = ["y", "grad_x", "grad_offset", "grad_mask", "grad_weight"]
numpy_side = [y_numpy, grads_numpy.grad_x, grads_numpy.grad_offset, grads_numpy.grad_mask, grads_numpy.grad_weight]
torch_side = [y_torch.detach(), xt.grad, offset_t.grad, mask_t.grad, weight_t.grad]
jax_side = [y_jax, *grads_jax]
print(f"{'':12} {'PyTorch':>10} {'JAX':>10}")
for name, a, t, j in zip(names, numpy_side, torch_side, jax_side):
    print(f"{name:12} {relative_error(t.numpy(), a):10.1e} {relative_error(np.asarray(j), a):10.1e}")

# %%
# And how far float32 is from the exact result: deformcp's float64 loop reference
# (:func:`deformcp.testing.loop_deform_conv2d`, slow by design) against NumPy's output,
# within the float32 tolerance the test suite holds every backend to.
exact = deformcp.testing.loop_deform_conv2d(x, offset, mask, weight, padding=1)
print(f"float32 vs float64: {relative_error(y_numpy, exact):.1e} "
      f"(tolerance {deformcp.testing.TOLERANCE['float32']:g})")

# %%
# One output channel of the first image, from each side:
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
for ax, (label, y) in zip(axes, [("NumPy", y_numpy), ("PyTorch", y_torch.detach().numpy()),
                                 ("JAX", np.asarray(y_jax))]):
    ax.imshow(y[0, 0], cmap="RdBu_r", vmin=-2, vmax=2)
    ax.set_title(f"{label}: y[0, 0]")
    ax.axis("off")
plt.show()
