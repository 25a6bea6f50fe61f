"""deformcp.flax.DeformConv2dPack: values and gradients against the float64 loop oracle, jit, vmap,
training, PyTorch's layer with the same weights, and its argument checks.

The oracle builds the layer from deformcp.testing alone: the offset predictor is a plain
convolution, which is the loop oracle's deformable convolution with zero offsets and no mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax", reason="flax is not installed (pip install 'deformcp[flax]')")
from flax import nnx  # noqa: E402

from deformcp import testing  # noqa: E402
from deformcp.flax import DeformConv2dPack  # noqa: E402

CPU = jax.devices("cpu")[0]

# (constructor arguments, input (H, W)): each stresses one feature of the layer.
CASES = {
    "basic": (dict(), (6, 5)),
    "strides2_same": (dict(strides=2), (7, 6)),
    "same_lower_dilated": (dict(kernel_dilation=(2, 1), padding="SAME_LOWER"), (6, 7)),
    "valid": (dict(padding="VALID"), (6, 6)),
    "explicit_pairs": (dict(kernel_size=(3, 2), padding=((0, 2), (1, 0))), (5, 6)),
    "groups_offset_groups": (dict(out_features=6, feature_group_count=2, offset_groups=2), (5, 5)),
    "unmodulated_no_bias": (dict(modulated=False, use_bias=False, padding=1), (5, 6)),
    "mask_scale2": (dict(mask_scale=2.0), (5, 5)),
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _layer(rng, dtype=jnp.float64, **kwargs):
    """A layer of 4 input channels with every parameter drawn at random (conv_offset too, so the
    sampling is deformed and the mask is not uniform)."""
    arguments = dict(in_features=4, out_features=4, kernel_size=3)
    arguments.update(kwargs)
    layer = DeformConv2dPack(**arguments, param_dtype=dtype, rngs=nnx.Rngs(0))
    drawn = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.4, p.shape), dtype), nnx.state(layer, nnx.Param))
    nnx.update(layer, drawn)
    return layer


def _nchw(a):
    return np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _oihw(kernel):
    return np.transpose(np.asarray(kernel, np.float64), (3, 2, 0, 1))


def _reference_padding(layer, height, width):
    """(top, left, bottom, right) from the definition of Flax's (and lax's) padding names."""
    if not isinstance(layer.padding, str):
        (top, bottom), (left, right) = layer.padding
        return top, left, bottom, right
    pads = []
    for size, k, s, d in zip((height, width), layer.kernel_size, layer.strides, layer.kernel_dilation):
        out = size if layer.padding != "VALID" else size - d * (k - 1)
        out = math.ceil(out / s)
        total = 0 if layer.padding == "VALID" else max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        low = total // 2 if layer.padding == "SAME" else total - total // 2
        pads.append((low, total - low))
    (top, bottom), (left, right) = pads
    return top, left, bottom, right


def _reference(layer, inputs, grad_out=None):
    """The layer's output (NHWC, float64) and, given ``grad_out``, the gradients of ``sum(out * grad_out)``
    with respect to the input and every parameter (Flax layouts), from the loop oracle."""
    x = _nchw(inputs)
    conv = dict(stride=layer.strides, padding=_reference_padding(layer, *inputs.shape[1:3]),
                dilation=layer.kernel_dilation)
    w_off, b_off = _oihw(layer.conv_offset.kernel[...]), np.asarray(layer.conv_offset.bias[...], np.float64)
    n_offset = 2 * layer.offset_groups * w_off.shape[2] * w_off.shape[3]
    # The predictor: a plain convolution is the deformable one with zero offsets and no mask.
    zero = np.zeros((x.shape[0], n_offset) + _out_size(x.shape[2:], w_off.shape[2:], conv))
    logits = testing.loop_deform_conv2d(x, zero, None, w_off, b_off, **conv)
    offset = logits[:, :n_offset]
    sigmoid = 1 / (1 + np.exp(-logits[:, n_offset:]))
    mask = layer.mask_scale * sigmoid if layer.modulated else None
    weight = _oihw(layer.kernel[...])
    bias = None if layer.bias is None else np.asarray(layer.bias[...], np.float64)
    out = testing.loop_deform_conv2d(x, offset, mask, weight, bias, **conv)
    if grad_out is None:
        return _nhwc(out), None
    g = testing.loop_deform_conv2d_backward(_nchw(grad_out), x, offset, mask, weight, bias, **conv)
    g_logits = g["offset"] if mask is None else np.concatenate(
        [g["offset"], g["mask"] * layer.mask_scale * sigmoid * (1 - sigmoid)], axis=1)
    g_pred = testing.loop_deform_conv2d_backward(g_logits, x, zero, None, w_off, b_off, **conv)
    grads = {"inputs": _nhwc(g["x"] + g_pred["x"]), "kernel": np.transpose(g["weight"], (2, 3, 1, 0)),
             "conv_offset.kernel": np.transpose(g_pred["weight"], (2, 3, 1, 0)), "conv_offset.bias": g_pred["bias"]}
    if bias is not None:
        grads["bias"] = g["bias"]
    return _nhwc(out), grads


def _out_size(size, kernel, conv):
    """A convolution's output (H, W), by its definition."""
    top, left, bottom, right = conv["padding"]
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, k, s, d, lo, hi in
                 zip(size, kernel, conv["stride"], conv["dilation"], (top, left), (bottom, right)))


def _gradients(layer, inputs, grad_out):
    """The gradients of ``sum(layer(inputs) * grad_out)`` with respect to the input and every parameter."""
    def loss(model, x):
        return jnp.sum(model(x) * grad_out)

    g_model, g_inputs = nnx.grad(loss, argnums=(0, 1))(layer, inputs)
    grads = {"inputs": g_inputs}
    for path, value in nnx.to_flat_state(nnx.state(g_model, nnx.Param)):
        grads[".".join(map(str, path))] = value[...]
    return grads


@pytest.mark.parametrize("kwargs, size", [pytest.param(*c, id=n) for n, c in CASES.items()])
def test_float64_values_and_gradients_against_reference(kwargs, size, rng, x64):
    layer = _layer(rng, **kwargs)
    inputs = jax.device_put(jnp.asarray(rng.standard_normal((2, *size, 4))), CPU)
    out = layer(inputs)
    grad_out = rng.standard_normal(out.shape)
    expected, expected_grads = _reference(layer, inputs, grad_out)
    assert out.dtype == jnp.float64 and out.shape == expected.shape
    testing.assert_within_tolerance(np.asarray(out), expected, "float64", "forward")
    grads = _gradients(layer, inputs, jnp.asarray(grad_out))
    assert sorted(grads) == sorted(expected_grads)
    for name, value in expected_grads.items():
        testing.assert_within_tolerance(np.asarray(grads[name]), value, "float64", f"gradient of {name}")


def test_predict_gives_channels_last_offsets_and_mask(rng, x64):
    layer = _layer(rng, strides=2, offset_groups=2)
    offset, mask = layer.predict(jnp.asarray(rng.standard_normal((2, 7, 6, 4))))
    assert offset.shape == (2, 4, 3, 36) and mask.shape == (2, 4, 3, 18)
    assert float(mask.min()) > 0 and float(mask.max()) < 1
    unmodulated = _layer(rng, modulated=False)
    offset, mask = unmodulated.predict(jnp.asarray(rng.standard_normal((1, 5, 5, 4))))
    assert offset.shape == (1, 5, 5, 18) and mask is None


def test_fresh_layer_is_half_a_convolution_or_one_with_mask_scale_2(rng, x64):
    inputs = jnp.asarray(rng.standard_normal((2, 6, 5, 4)))
    for mask_scale, factor in ((1.0, 0.5), (2.0, 1.0)):
        layer = DeformConv2dPack(4, 6, 3, strides=2, mask_scale=mask_scale, param_dtype=jnp.float64,
                                 rngs=nnx.Rngs(0))
        layer.bias[...] = jnp.asarray(rng.standard_normal(6))
        conv = nnx.Conv(4, 6, (3, 3), strides=2, use_bias=False, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
        conv.kernel[...] = layer.kernel[...]
        expected = factor * np.asarray(conv(inputs)) + np.asarray(layer.bias[...])
        testing.assert_within_tolerance(np.asarray(layer(inputs)), expected, "float64", f"mask_scale={mask_scale}")


def test_matches_the_pytorch_layer_with_the_same_weights(rng, x64):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from deformcp.torch import DeformConv2dPack as TorchPack

    layer = _layer(rng, out_features=6, strides=2, padding=1, kernel_dilation=(1, 2), feature_group_count=2,
                   offset_groups=2)
    pack = TorchPack(4, 6, 3, stride=2, padding=(1, 1), dilation=(1, 2), groups=2, offset_groups=2,
                     dtype=torch.float64)
    # The documented conversion: (kh, kw, in, out) kernels are (out, in, kh, kw) weights transposed.
    state = {"weight": _oihw(layer.kernel[...]), "bias": layer.bias[...],
             "conv_offset.weight": _oihw(layer.conv_offset.kernel[...]),
             "conv_offset.bias": layer.conv_offset.bias[...]}
    pack.load_state_dict({k: torch.from_numpy(np.array(v, np.float64)) for k, v in state.items()}, strict=True)
    inputs = rng.standard_normal((2, 9, 8, 4))
    expected = pack(torch.from_numpy(_nchw(inputs))).detach().numpy()
    testing.assert_within_tolerance(_nchw(layer(jnp.asarray(inputs))), expected, "float64", "against torch")


def test_jit_vmap_and_bfloat16(rng):
    layer = _layer(rng, dtype=jnp.float32, strides=2)
    inputs = jnp.asarray(rng.standard_normal((3, 2, 7, 6, 4)), jnp.float32)
    eager = np.stack([np.asarray(layer(x)) for x in inputs])
    testing.assert_within_tolerance(np.asarray(nnx.jit(lambda m, x: m(x))(layer, inputs[0])), eager[0], "float32",
                                    "jit")
    testing.assert_within_tolerance(np.asarray(jax.vmap(layer)(inputs)), eager, "float32", "vmap")
    half = DeformConv2dPack(4, 4, 3, strides=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(half, nnx.state(layer, nnx.Param))
    out = half(inputs[0])
    assert out.dtype == jnp.bfloat16 and half.kernel[...].dtype == jnp.float32
    expected, _ = _reference(half, np.asarray(inputs[0].astype(jnp.bfloat16)))
    testing.assert_within_tolerance(np.asarray(out, np.float64), expected, "bfloat16", "bfloat16")


def test_training_learns_offsets(rng):
    optax = pytest.importorskip("optax", reason="optax is not installed (flax brings it)")
    teacher = _layer(rng, dtype=jnp.float32)
    inputs = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
    target = teacher(inputs)
    student = DeformConv2dPack(4, 4, 3, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(student, optax.adam(0.02), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(inputs) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(student, optimizer)) for _ in range(15)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    # The predictor, zero at the start, was trained too: the sampling moved off the grid.
    assert float(jnp.abs(student.conv_offset.kernel[...]).max()) > 0


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(in_features=0), ValueError, "^in_features must be a positive int, got 0"),
    (dict(out_features=2.0), TypeError, "^out_features must be a positive int, got float"),
    (dict(offset_groups=True), TypeError, "^offset_groups must be a positive int, got bool"),
    (dict(feature_group_count=3), ValueError, r"^feature_group_count \(3\) must divide in_features \(4\)"),
    (dict(offset_groups=3), ValueError, r"^offset_groups \(3\) must divide in_features \(4\)"),
    (dict(mask_scale=0.0), ValueError, "^mask_scale must be a positive finite number"),
    (dict(mask_scale=float("nan")), ValueError, "^mask_scale must be a positive finite number"),
    (dict(padding="CIRCULAR"), ValueError, "^padding must be one of 'SAME'.*got 'CIRCULAR'"),
    (dict(padding=(1, 2, 3)), ValueError, r"^padding must be one of 'SAME'.*got \(1, 2, 3\)"),
    (dict(padding=-1), ValueError, "^padding must be non-negative"),
    (dict(strides=0), ValueError, "^strides must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "^kernel_size must be an int or a tuple of 2 ints"),
])
def test_bad_arguments_are_refused_naming_them(kwargs, error, message):
    arguments = dict(in_features=4, out_features=4, kernel_size=3, rngs=nnx.Rngs(0))
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        DeformConv2dPack(**arguments)


def test_channels_first_input_is_refused():
    layer = DeformConv2dPack(4, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^inputs must have shape \(B, H, W, in_features=4\).*got \(2, 4, 8, 8\)"):
        layer(jnp.ones((2, 4, 8, 8)))
