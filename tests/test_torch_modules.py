"""The PyTorch layers: torchvision's DeformConv2d, and DeformConv2dPack with mmcv's and DCNv2's checkpoints.

torchvision and mmcv do not install beside this torch, so their checkpoints are built here from
their documented key names and shapes, and the expected outputs from their documented
arithmetic in plain torch ops and deformcp.testing's float64 loop oracle:

* torchvision ``DeformConv2d``: ``weight`` (C_out, C/groups, kh, kw), ``bias`` (C_out,);
  ``forward(input, offset, mask)`` is ``deform_conv2d`` with them.
* mmcv ``ModulatedDeformConv2dPack``: ``conv_offset`` is ``nn.Conv2d(C, 3*G*kh*kw, k, stride,
  padding, dilation)``; ``o1, o2, mask = chunk(conv_offset(x), 3, dim=1)``,
  ``offset = cat((o1, o2), 1)``, ``mask = sigmoid(mask)``.
* mmcv ``DeformConv2dPack``: ``conv_offset`` with ``2*G*kh*kw`` channels is the offset; no
  mask, no bias.
* DCNv2 ``DCN``: mmcv's modulated arithmetic, its predictor named ``conv_offset_mask``.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deformcp.torch as dt
from deformcp import testing
from problems import assert_within_tolerance


def _oracle(x, offset, mask, weight, bias, stride, padding, dilation):
    """deformcp.testing's float64 loop oracle on tensors."""
    array = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    return testing.loop_deform_conv2d(array(x), array(offset), array(mask), array(weight), array(bias),
                                      stride=stride, padding=padding, dilation=dilation)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _random_state(generator, shapes: dict, scale: dict = None) -> dict:
    scale = scale or {}
    return {key: torch.randn(shape, dtype=torch.float64, generator=generator) * scale.get(key, 1.0)
            for key, shape in shapes.items()}


# ------------------------------------------------------------------- torchvision's DeformConv2d


def test_constructor_is_torchvisions_plus_device_and_dtype():
    parameters = [(p.name, p.default) for p in inspect.signature(dt.DeformConv2d).parameters.values()]
    empty = inspect.Parameter.empty
    assert parameters == [("in_channels", empty), ("out_channels", empty), ("kernel_size", empty), ("stride", 1),
                          ("padding", 0), ("dilation", 1), ("groups", 1), ("bias", True), ("device", None),
                          ("dtype", None)]
    forward = [(p.name, p.default) for p in inspect.signature(dt.DeformConv2d.forward).parameters.values()]
    assert forward == [("self", empty), ("input", empty), ("offset", empty), ("mask", None)]
    layer = dt.DeformConv2d(4, 6, 3, 2, 1, 1, 2, False)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) == ((3, 3), (2, 2), (1, 1),
                                                                                             (1, 1), 2)
    assert layer.bias is None


@pytest.mark.parametrize("groups, bias", [(1, True), (2, False)])
def test_initialisation_is_torchvisions(groups, bias):
    """torchvision initialises as nn.Conv2d: kaiming_uniform_(a=sqrt(5)), bias uniform in +-1/sqrt(fan_in)."""
    torch.manual_seed(7)
    layer = dt.DeformConv2d(4, 6, (3, 2), groups=groups, bias=bias)
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(4, 6, (3, 2), groups=groups, bias=bias)
    assert torch.equal(layer.weight, conv.weight)
    assert (layer.bias is None) == (conv.bias is None)
    if bias:
        assert torch.equal(layer.bias, conv.bias)


@pytest.mark.parametrize("config", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2,
         bias=False),
], ids=["basic", "groups_stride_dilation_no_bias"])
@pytest.mark.parametrize("offset_groups, with_mask", [(1, True), (2, False)], ids=["mask", "no_mask_2_offset_groups"])
def test_torchvision_checkpoint_loads_strictly_and_matches(config, offset_groups, with_mask):
    generator = torch.Generator().manual_seed(3)
    c, o, g = config["in_channels"], config["out_channels"], config.get("groups", 1)
    kh, kw = _pair(config["kernel_size"])
    shapes = {"weight": (o, c // g, kh, kw)}
    if config.get("bias", True):
        shapes["bias"] = (o,)
    checkpoint = _random_state(generator, shapes)
    layer = dt.DeformConv2d(**config, dtype=torch.float64)
    assert set(layer.state_dict()) == set(checkpoint)
    layer.load_state_dict(checkpoint, strict=True)

    stride, padding, dilation = (_pair(config.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    x = torch.randn(2, c, 7, 6, dtype=torch.float64, generator=generator)
    out_h = (7 + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (6 + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    offset = 2 * torch.randn(2, 2 * offset_groups * kh * kw, out_h, out_w, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, offset_groups * kh * kw, out_h, out_w, dtype=torch.float64, generator=generator) \
        if with_mask else None
    expected = _oracle(x, offset, mask, checkpoint["weight"], checkpoint.get("bias"), stride, padding, dilation)
    assert_within_tolerance(layer(x, offset, mask).detach().numpy(), expected, "float64", "torchvision checkpoint")


def test_asymmetric_padding_module(rng):
    layer = dt.DeformConv2d(2, 3, 3, padding=(0, 1, 2, 1), dtype=torch.float64)
    assert layer.padding == (0, 1, 2, 1)
    x = torch.from_numpy(rng.standard_normal((2, 2, 5, 6)))
    offset = torch.from_numpy(rng.normal(0, 2, (2, 18, 5, 6)))
    expected = _oracle(x, offset, None, layer.weight, layer.bias, (1, 1), (0, 1, 2, 1), (1, 1))
    assert_within_tolerance(layer(x, offset).detach().numpy(), expected, "float64")


# --------------------------------------------------------------------------- DeformConv2dPack


def _mmcv_expected(x, state, stride, padding, dilation, modulated, predictor="conv_offset"):
    """mmcv's (and DCNv2's) Pack forward, from its documented arithmetic."""
    predicted = F.conv2d(x, state[f"{predictor}.weight"], state[f"{predictor}.bias"], stride, padding, dilation)
    if modulated:
        o1, o2, mask = torch.chunk(predicted, 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
    else:
        offset, mask = predicted, None
    return _oracle(x, offset, mask, state["weight"], state.get("bias"), stride, padding, dilation)


def _pack_state(generator, c, o, kernel, groups, offset_groups, modulated, bias, predictor="conv_offset"):
    kh, kw = kernel
    predicted = (3 if modulated else 2) * offset_groups * kh * kw
    shapes = {"weight": (o, c // groups, kh, kw), f"{predictor}.weight": (predicted, c, kh, kw),
              f"{predictor}.bias": (predicted,)}
    if bias:
        shapes["bias"] = (o,)
    # A predictor of moderate weights: offsets of a pixel or two, masks spread over (0, 1).
    return _random_state(generator, shapes, {f"{predictor}.weight": 0.3, f"{predictor}.bias": 1.0})


MMCV_CONFIGS = {
    "modulated": dict(kernel=(3, 3), stride=1, padding=1, dilation=1, groups=1, offset_groups=1),
    "modulated_groups_offset_groups": dict(kernel=(3, 3), stride=1, padding=1, dilation=1, groups=2, offset_groups=2),
    "modulated_stride_dilation": dict(kernel=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=1,
                                      offset_groups=2),
}


@pytest.mark.parametrize("config", MMCV_CONFIGS.values(), ids=MMCV_CONFIGS.keys())
def test_mmcv_modulated_checkpoint_loads_strictly_and_matches(config):
    generator = torch.Generator().manual_seed(11)
    state = _pack_state(generator, 4, 6, config["kernel"], config["groups"], config["offset_groups"], True, True)
    layer = dt.DeformConv2dPack(4, 6, config["kernel"], config["stride"], config["padding"], config["dilation"],
                                config["groups"], config["offset_groups"], dtype=torch.float64)
    assert set(layer.state_dict()) == set(state)
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, generator=generator)
    stride, padding, dilation = (_pair(config[k]) for k in ("stride", "padding", "dilation"))
    expected = _mmcv_expected(x, state, stride, padding, dilation, modulated=True)
    assert_within_tolerance(layer(x).detach().numpy(), expected, "float64", "mmcv ModulatedDeformConv2dPack")


def test_mmcv_deform_conv2d_pack_checkpoint_loads_strictly_and_matches():
    """mmcv's DCNv1 Pack: 2*G*kh*kw predicted channels, no mask, and no bias (mmcv allows none)."""
    generator = torch.Generator().manual_seed(12)
    state = _pack_state(generator, 4, 6, (3, 3), 1, 2, modulated=False, bias=False)
    layer = dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2, bias=False, modulated=False,
                                dtype=torch.float64)
    assert set(layer.state_dict()) == set(state)
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=generator)
    expected = _mmcv_expected(x, state, (1, 1), (1, 1), (1, 1), modulated=False)
    assert_within_tolerance(layer(x).detach().numpy(), expected, "float64", "mmcv DeformConv2dPack")


def test_dcnv2_checkpoint_loads_strictly_and_matches():
    """DCNv2's DCN(in, out, k, stride, padding, dilation=1, deformable_groups): its predictor is conv_offset_mask."""
    generator = torch.Generator().manual_seed(13)
    state = _pack_state(generator, 4, 6, (3, 3), 1, 2, modulated=True, bias=True, predictor="conv_offset_mask")
    layer = dt.DeformConv2dPack(4, 6, 3, stride=2, padding=1, offset_groups=2, dtype=torch.float64)
    layer.load_state_dict(state, strict=True)
    assert "conv_offset_mask.weight" in state  # the caller's dict is not changed
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=generator)
    expected = _mmcv_expected(x, state, (2, 2), (1, 1), (1, 1), modulated=True, predictor="conv_offset_mask")
    assert_within_tolerance(layer(x).detach().numpy(), expected, "float64", "DCNv2 DCN")
    # Inside a model too: the rename happens under the layer's prefix.
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    model.load_state_dict({f"1.{key}": value for key, value in state.items()}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**{f"1.{key}": v for key, v in state.items()}, "1.stray.weight": state["weight"]})


def test_mask_conventions():
    """A fresh layer samples the regular grid: mmcv's mask sigmoid(0) = 1/2 halves the convolution;
    mask_scale=2 makes it exactly the convolution."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    mmcv = dt.DeformConv2dPack(4, 6, 3, padding=1, dtype=torch.float64)
    plain = torch.nn.functional.conv2d(x, mmcv.weight, None, padding=1)
    expected = 0.5 * plain + mmcv.bias[:, None, None]
    assert_within_tolerance(mmcv(x).detach().numpy(), expected.detach().numpy(), "float64", "mmcv fresh layer")
    exact = dt.DeformConv2dPack(4, 6, 3, padding=1, mask_scale=2, dtype=torch.float64)
    exact.load_state_dict(mmcv.state_dict())
    expected = F.conv2d(x, exact.weight, exact.bias, padding=1)
    assert_within_tolerance(exact(x).detach().numpy(), expected.detach().numpy(), "float64", "mask_scale=2")
    offset, mask = exact.predict(x)
    assert torch.count_nonzero(offset) == 0 and bool((mask == 1).all())


@pytest.mark.parametrize("config", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, offset_groups=2),
    dict(in_channels=3, out_channels=2, kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1),
         bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=(0, 1, 2, 1), modulated=False),
], ids=["groups_offset_groups", "stride_dilation_no_bias", "asymmetric_padding_dcnv1"])
def test_fresh_layer_with_mask_scale_2_is_an_ordinary_convolution(config):
    torch.manual_seed(0)
    layer = dt.DeformConv2dPack(**config, mask_scale=2, dtype=torch.float64)
    x = torch.randn(2, config["in_channels"], 7, 6, dtype=torch.float64)
    top, left, bottom, right = layer.padding if len(layer.padding) == 4 else layer.padding * 2
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), layer.weight, layer.bias, stride=layer.stride,
                        dilation=layer.dilation, groups=layer.groups)
    assert_within_tolerance(layer(x).detach().numpy(), expected.detach().numpy(), "float64", "fresh layer")


def test_asymmetric_padding_pack_predicts_on_the_padded_input():
    generator = torch.Generator().manual_seed(14)
    state = _pack_state(generator, 2, 3, (3, 3), 1, 1, modulated=True, bias=True)
    layer = dt.DeformConv2dPack(2, 3, 3, padding=(0, 1, 2, 1), dtype=torch.float64)
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=generator)
    predicted = F.conv2d(F.pad(x, (1, 1, 0, 2)), state["conv_offset.weight"], state["conv_offset.bias"])
    o1, o2, logits = torch.chunk(predicted, 3, dim=1)
    expected = _oracle(x, torch.cat((o1, o2), 1), torch.sigmoid(logits), state["weight"], state["bias"], (1, 1),
                       (0, 1, 2, 1), (1, 1))
    assert_within_tolerance(layer(x).detach().numpy(), expected, "float64", "asymmetric padding")


def test_pack_trains_and_its_loss_falls():
    # Learn to match a convolution whose input is shifted by half a pixel: offsets must move.
    torch.manual_seed(0)
    target_conv = torch.nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    layer = dt.DeformConv2dPack(2, 3, 3, padding=1, dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        target = target_conv(0.5 * (x + torch.roll(x, 1, dims=3)))
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses
    assert layer.conv_offset.weight.grad is not None and layer.conv_offset.weight.abs().sum() > 0


@pytest.mark.parametrize("make, message", [
    (lambda: dt.DeformConv2d(4, 6, 3, groups=4), r"groups \(4\) must divide"),
    (lambda: dt.DeformConv2d(0, 6, 3), "in_channels must be a positive int"),
    (lambda: dt.DeformConv2d(4, 6, (3, 3, 3)), "kernel_size must be an int or a tuple of 2"),
    (lambda: dt.DeformConv2d(4, 6, 3, padding=-1), "padding must be non-negative"),
    (lambda: dt.DeformConv2dPack(4, 6, 3, offset_groups=3), r"offset_groups \(3\) must divide"),
    (lambda: dt.DeformConv2dPack(4, 6, 3, mask_scale=0), "mask_scale must be a positive finite number"),
])
def test_bad_configuration_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: dt.DeformConv2d(4.0, 6, 3), "in_channels must be a positive int, got float 4.0"),
    (lambda: dt.DeformConv2d(4, 6, 3, groups=True), "groups must be a positive int, got bool"),
    (lambda: dt.DeformConv2dPack(4, 6, 3, offset_groups="2"), "offset_groups must be a positive int, got str"),
])
def test_non_integer_counts_are_a_type_error(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("cls", [dt.DeformConv2d, dt.DeformConv2dPack])
def test_numpy_integer_counts_are_accepted(cls, rng):
    # The plain API accepts any integer (operator.index); the layers take the same.
    layer = cls(np.int64(4), np.int32(6), np.int64(3), padding=np.int64(1), groups=np.int64(2))
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, layer.groups))
    reference = cls(4, 6, 3, padding=1, groups=2)
    reference.load_state_dict(layer.state_dict())
    x = torch.from_numpy(rng.standard_normal((1, 4, 5, 5)).astype(np.float32))
    offset = torch.from_numpy(rng.standard_normal((1, 18, 5, 5)).astype(np.float32))
    args = (x,) if cls is dt.DeformConv2dPack else (x, offset)
    torch.testing.assert_close(layer(*args), reference(*args), rtol=0, atol=0)


# --------------------------------------------------------------------------- device and dtype


@pytest.mark.parametrize("cls", [dt.DeformConv2d, dt.DeformConv2dPack])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_as_conv2d(cls, dtype):
    layer = cls(4, 6, 3, padding=1, dtype=dtype)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    on_meta = cls(4, 6, 3, padding=1, device="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert len(list(on_meta.parameters())) == len(list(layer.parameters()))


# --------------------------------------------------------------- half precision and autocast


def _randomised_pack(dtype=torch.float64):
    torch.manual_seed(5)
    layer = dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2, dtype=dtype)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.2)
        layer.conv_offset.bias.normal_(0, 1)
    return layer


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_pack_forward_and_backward(dtype, name):
    """The half layer's operator against the float64 oracle on the same (rounded) intermediates.

    The predictor is torch's own nn.Conv2d in the half type; what follows it is deformcp's
    operator, whose bound for the half types is TOLERANCE given its inputs.
    """
    layer = _randomised_pack().to(dtype)
    x = torch.randn(2, 4, 7, 6).to(dtype).requires_grad_()
    offset, mask = layer.predict(x)
    out = layer(x)
    assert out.dtype == dtype
    expected = _oracle(x, offset, mask, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
    assert_within_tolerance(out.float().detach().numpy(), expected, name, "forward")
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    array = lambda t: t.detach().double().numpy()  # noqa: E731
    expected = testing.loop_deform_conv2d_backward(array(grad), array(x), array(offset), array(mask),
                                                   array(layer.weight), array(layer.bias), padding=1)
    assert_within_tolerance(layer.weight.grad.float().numpy(), expected["weight"], name, "grad_weight")
    assert_within_tolerance(layer.bias.grad.float().numpy(), expected["bias"], name, "grad_bias")
    for p in (x.grad, layer.conv_offset.weight.grad, layer.conv_offset.bias.grad):
        assert p.dtype == dtype and bool(torch.isfinite(p).all()) and bool(p.abs().sum() > 0)


def test_pack_under_cpu_autocast_trains():
    """Under autocast the predictor is torch's bfloat16 convolution; the operator then gets every input in
    bfloat16, and its result and gradients are the float64 oracle's on those inputs."""
    layer = _randomised_pack(torch.float32)
    x = torch.randn(2, 4, 7, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        offset, mask = layer.predict(x)
        out = layer(x)
        loss = out.float().square().mean()
    loss.backward()
    assert offset.dtype == mask.dtype == out.dtype == torch.bfloat16
    assert {p.grad.dtype for p in layer.parameters()} == {torch.float32}
    rounded = [t.detach().to(torch.bfloat16) for t in (x, offset, mask, layer.weight, layer.bias)]
    expected = _oracle(*rounded, (1, 1), (1, 1), (1, 1))
    assert_within_tolerance(out.float().detach().numpy(), expected, "bfloat16", "forward")
    # d(mean of squares) / d(out), rounded to bfloat16 as autograd rounds it
    grad_out = (2 * out.detach().float() / out.numel()).to(torch.bfloat16)
    array = lambda t: t.double().numpy()  # noqa: E731
    expected = testing.loop_deform_conv2d_backward(array(grad_out), *(array(t) for t in rounded), padding=1)
    assert_within_tolerance(layer.weight.grad.numpy(), expected["weight"], "bfloat16", "grad_weight")
    assert_within_tolerance(layer.bias.grad.numpy(), expected["bias"], "bfloat16", "grad_bias")
    assert bool(torch.isfinite(layer.conv_offset.weight.grad).all()) and layer.conv_offset.weight.grad.abs().sum() > 0


# ---------------------------------------------------------- channels_last, TorchScript, export


def test_channels_last_module():
    layer = _randomised_pack()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    out = layer(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_within_tolerance(out.detach().numpy(), layer(x).detach().numpy(), "float64", "channels_last")


def test_torchscript_modules_script_save_and_load():
    pack = _randomised_pack()
    plain = dt.DeformConv2d(4, 6, 3, padding=(0, 1, 2, 1), dtype=torch.float64)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    offset = torch.randn(2, 18, 7, 6, dtype=torch.float64)
    for layer, args in ((pack, (x,)), (plain, (x, offset)), (plain, (x, offset, torch.rand(2, 9, 7, 6,
                                                                                             dtype=torch.float64)))):
        scripted = torch.jit.script(layer)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        for module in (scripted, torch.jit.load(buffer)):
            torch.testing.assert_close(module(*args), layer(*args), rtol=0, atol=0)


def test_compile_and_export_the_pack():
    layer = _randomised_pack()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    expected = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert_within_tolerance(compiled(x).detach().numpy(), expected.detach().numpy(), "float64", "compiled")
    program = torch.export.export(layer, (x,))
    assert_within_tolerance(program.module()(x).detach().numpy(), expected.detach().numpy(), "float64", "exported")


def test_pack_state_dict_round_trip():
    layer = _randomised_pack()
    again = dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2, dtype=torch.float64)
    again.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
