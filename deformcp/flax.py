"""Flax NNX layer: :class:`DeformConv2dPack`, a deformable convolution that predicts its own offsets and mask.

It is :class:`deformcp.torch.DeformConv2dPack` (mmcv's ``ModulatedDeformConv2dPack``
and ``DeformConv2dPack``, DCNv2's ``DCN``) written the Flax way: channels last (NHWC,
as :class:`flax.nnx.Conv`), Flax's argument names (``in_features``, ``strides``,
``kernel_dilation``, ``feature_group_count``, ``use_bias``, ``rngs``) and parameter
layout (``kernel`` of shape ``(kh, kw, in_features/groups, out_features)``).  What
the PyTorch layer fixes, it fixes alike: the predictor ``conv_offset`` (an
:class:`flax.nnx.Conv`, zero at the start) puts the ``2*G*kh*kw`` offsets first and
the mask logits after them, and the mask is ``mask_scale * sigmoid(logits)``.  The
convolution itself is :func:`deformcp.jax.deform_conv2d`, so the layer works under
``nnx.jit``, ``nnx.grad``, ``vmap`` and with the batch sharded over devices.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from deformcp.flax import DeformConv2dPack
>>> layer = DeformConv2dPack(4, 8, 3, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 16, 16, 4))).shape
(2, 16, 16, 8)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.nnx.nn.linear import canonicalize_padding

from . import jax as deformcp_jax
from .geometry import normalize_count, normalize_pair, normalize_padding

__all__ = ["DeformConv2dPack"]

# Padding Flax's convolutions take that a deformable convolution can honour: zeros outside
# the image.  'CIRCULAR', 'REFLECT' and 'CAUSAL' pad with image values, which samples at
# fractional positions between the border and the outside could not reproduce.
_PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID")


class DeformConv2dPack(nnx.Module):
    """A deformable convolution (DCNv2, or DCNv1) that predicts its own offsets and mask, channels last.

    A plain convolution ``conv_offset`` (an :class:`flax.nnx.Conv` with the layer's
    kernel size, strides, padding and dilation) reads the input and predicts
    ``3*G*kh*kw`` channels (``2*G*kh*kw`` when not modulated): the offsets, in
    deformcp's (and torchvision's, mmcv's) order, then the mask logits.  The mask is
    ``mask_scale * sigmoid(logits)``.  ``conv_offset`` starts at zero, as in mmcv and
    DCNv2, so a fresh layer samples the regular grid.

    Parameters
    ----------
    in_features, out_features : int
        Channels in and out.
    kernel_size : int or (int, int)
    strides, kernel_dilation : int or (int, int)
    padding : str, int, or a sequence of two ints or two ``(low, high)`` pairs
        As :class:`flax.nnx.Conv`: ``'SAME'`` (the default), ``'SAME_LOWER'``,
        ``'VALID'``, or explicit zero padding per spatial axis.  Padding with image
        values (``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``) is refused: samples
        outside the image read zeros.
    feature_group_count : int
        Convolution groups; must divide both channel counts.
    offset_groups : int
        ``G``, the number of offset (and mask) groups (mmcv's ``deform_groups``);
        must divide ``in_features``.
    use_bias : bool
        Whether the convolution has a bias (``conv_offset`` always has one).
    modulated : bool
        DCNv2 (a predicted mask) when True, DCNv1 when False.
    mask_scale : float
        The mask is ``mask_scale * sigmoid(logits)``.  1 is mmcv's and DCNv2's
        convention (a fresh layer is then half a plain convolution); 2 makes a fresh
        layer exactly a plain convolution with ``kernel`` and ``bias``.
    dtype : dtype, optional
        The dtype of the computation; by default promoted from the input and the
        parameters, as :class:`flax.nnx.Conv` does.
    param_dtype : dtype
        The dtype the parameters are created in.
    kernel_init, bias_init
        Initialisers of ``kernel`` and ``bias`` (Flax's convolution defaults:
        LeCun normal, zeros).
    rngs : flax.nnx.Rngs

    Attributes
    ----------
    kernel : nnx.Param, shape (kh, kw, in_features/feature_group_count, out_features)
    bias : nnx.Param, shape (out_features,), or None
    conv_offset : flax.nnx.Conv
        The predictor of offsets and mask logits.

    Raises
    ------
    TypeError, ValueError
        For a count that is not a positive int, groups that do not divide the
        channels, a padding the layer cannot honour, or a ``mask_scale`` that is not
        a positive finite number; the message names the argument.

    Notes
    -----
    A PyTorch checkpoint of :class:`deformcp.torch.DeformConv2dPack` (or mmcv's
    layer) converts by transposing each convolution weight from ``(out, in, kh, kw)``
    to ``(kh, kw, in, out)``: ``kernel = weight.transpose(2, 3, 1, 0)``, and the
    same for ``conv_offset``; biases are unchanged.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from deformcp.flax import DeformConv2dPack
    >>> layer = DeformConv2dPack(4, 8, (3, 3), strides=2, offset_groups=2, rngs=nnx.Rngs(0))
    >>> offset, mask = layer.predict(jnp.ones((1, 16, 16, 4)))
    >>> offset.shape, mask.shape
    ((1, 8, 8, 36), (1, 8, 8, 18))
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Union[int, Sequence[int]],
                 strides: Union[int, Sequence[int]] = 1, *, padding="SAME",
                 kernel_dilation: Union[int, Sequence[int]] = 1, feature_group_count: int = 1,
                 offset_groups: int = 1, use_bias: bool = True, modulated: bool = True, mask_scale: float = 1.0,
                 dtype=None, param_dtype=jnp.float32,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        in_features, out_features, groups, offset_groups = (
            normalize_count(v, n) for v, n in ((in_features, "in_features"), (out_features, "out_features"),
                                               (feature_group_count, "feature_group_count"),
                                               (offset_groups, "offset_groups")))
        if in_features % groups or out_features % groups:
            raise ValueError(f"feature_group_count ({groups}) must divide in_features ({in_features}) "
                             f"and out_features ({out_features})")
        if in_features % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must divide in_features ({in_features})")
        if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not (
                math.isfinite(mask_scale) and mask_scale > 0):
            raise ValueError(f"mask_scale must be a positive finite number, got {mask_scale!r}")
        self.kernel_size = normalize_pair(kernel_size, "kernel_size")
        self.strides = normalize_pair(strides, "strides")
        self.kernel_dilation = normalize_pair(kernel_dilation, "kernel_dilation")
        self.padding = _flax_padding(padding)
        self.in_features, self.out_features = in_features, out_features
        self.feature_group_count, self.offset_groups = groups, offset_groups
        self.use_bias, self.modulated, self.mask_scale = bool(use_bias), bool(modulated), float(mask_scale)
        self.dtype, self.param_dtype = dtype, param_dtype

        kh, kw = self.kernel_size
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features // groups, out_features),
                                            param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else nnx.data(None)
        points = offset_groups * kh * kw
        self.conv_offset = nnx.Conv(in_features, (3 if modulated else 2) * points, self.kernel_size, self.strides,
                                    padding=self.padding, kernel_dilation=self.kernel_dilation, use_bias=True,
                                    dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.zeros_init(),
                                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def predict(self, inputs: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
        """The offsets and (when ``modulated``) the mask the layer uses for ``inputs``, channels last.

        Parameters
        ----------
        inputs : jax.Array, shape (B, H, W, in_features)

        Returns
        -------
        offset : jax.Array, shape (B, H_out, W_out, 2*G*kh*kw)
            Channel ``2*k`` is the row offset and ``2*k + 1`` the column offset of
            kernel point ``k`` (of all groups in turn), as in deformcp and mmcv.
        mask : jax.Array, shape (B, H_out, W_out, G*kh*kw), or None
            ``mask_scale * sigmoid(logits)``; None when not ``modulated``.
        """
        self._check_inputs(inputs)
        # Under Explicit mesh axes a convolution of sharded operands must be told its output's
        # sharding: the batch's, which is all deform_conv2d accepts to be split there.
        spec = jax.typeof(inputs).sharding.spec
        explicit = jax.sharding.AxisType.Explicit in jax.typeof(inputs).sharding.mesh.axis_types
        predicted = self.conv_offset(inputs, out_sharding=jax.sharding.PartitionSpec(spec[0]) if explicit else None)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, logits = predicted[..., :n_offset], predicted[..., n_offset:]
        if not self.modulated:
            return offset, None
        mask = jax.nn.sigmoid(logits)
        return offset, mask if self.mask_scale == 1.0 else mask * self.mask_scale

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Deformable convolution of ``inputs`` with the offsets and mask the layer predicts from them.

        Parameters
        ----------
        inputs : jax.Array, shape (B, H, W, in_features)

        Returns
        -------
        jax.Array, shape (B, H_out, W_out, out_features)
            Of the computation dtype (``dtype``, or promoted from the input and
            parameters).
        """
        offset, mask = self.predict(inputs)
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, bias, offset, mask = flax_dtypes.promote_dtype((inputs, kernel, bias, offset, mask),
                                                                       dtype=self.dtype)
        (top, bottom), (left, right) = self._pads(inputs.shape[1:3])
        nchw = lambda a: None if a is None else jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
        out = deformcp_jax.deform_conv2d(nchw(inputs), nchw(offset), nchw(mask), jnp.transpose(kernel, (3, 2, 0, 1)),
                                         bias, stride=self.strides, padding=(top, left, bottom, right),
                                         dilation=self.kernel_dilation)
        return jnp.transpose(out, (0, 2, 3, 1))

    def _check_inputs(self, inputs) -> None:
        if inputs.ndim != 4 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have shape (B, H, W, in_features={self.in_features}) (channels last, "
                             f"as flax.nnx.Conv), got {tuple(inputs.shape)}")

    def _pads(self, spatial: Tuple[int, int]):
        """``((top, bottom), (left, right))`` for an input of ``spatial`` size, as ``conv_offset`` pads it."""
        if isinstance(self.padding, str):
            dilated = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
            return jax.lax.padtype_to_pads(spatial, dilated, self.strides, self.padding)
        return self.padding


def _flax_padding(padding):
    """Flax's padding, canonical (a name, or ``((top, bottom), (left, right))``), checked for what the layer honours."""
    if isinstance(padding, str):
        if padding.upper() not in _PADDING_NAMES:
            raise ValueError(f"padding must be one of {', '.join(map(repr, _PADDING_NAMES))}, an int or per-axis "
                             f"(low, high) pairs, got {padding!r}: samples outside the image read zeros, so "
                             f"padding with image values cannot be honoured")
        return padding.upper()
    try:
        (top, bottom), (left, right) = canonicalize_padding(padding, 2)
    except (TypeError, ValueError):
        raise ValueError(f"padding must be one of {', '.join(map(repr, _PADDING_NAMES))}, an int or per-axis "
                         f"(low, high) pairs, got {padding!r}") from None
    top, left, bottom, right = normalize_padding((top, left, bottom, right))
    return ((top, bottom), (left, right))
