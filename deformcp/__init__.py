"""deformcp: deformable convolution (DCNv1 and DCNv2) for NumPy, CuPy, PyTorch and JAX.

The public API:

deform_conv2d
    The forward pass.
deform_conv2d_backward
    Its five gradients, as a :class:`Gradients` named tuple.
deform_im2col
    The sampled column matrix, a building block for other DCN variants.
get_workspace_limit, set_workspace_limit, workspace_limit
    The scratch-space limit every backend tiles its work under.
deformcp.torch, deformcp.jax
    Framework adapters with autograd (import them explicitly); see docs/torch.md, docs/jax.md.
deformcp.flax
    ``DeformConv2dPack`` as a Flax NNX layer, on deformcp.jax; see docs/jax.md.
deformcp.testing
    The float64 loop oracle, ``relative_error`` and the per-dtype tolerances, after ``numpy.testing``.
deformcp.plot
    ``sampling_locations``: where a deformable convolution samples, drawn with matplotlib.

Inputs may be NumPy or CuPy arrays, or any DLPack array (PyTorch, JAX, ...);
results come back as ``x``'s array type on ``x``'s device (docs/interop.md).
"""

from .api import Gradients, deform_conv2d, deform_conv2d_backward, deform_im2col
from .workspace import get_workspace_limit, set_workspace_limit, workspace_limit

__version__ = "0.1.0"

__all__ = [
    "Gradients",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_im2col",
    "get_workspace_limit",
    "set_workspace_limit",
    "workspace_limit",
    "__version__",
]
