"""The PyTorch adapter: custom operators (opcheck, gradcheck, torch.compile) and the DeformConv2d module."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deformcp.torch as dt
from deformcp import api
from problems import EXAMPLE_SPECS, INPUT_NAMES, Spec, assert_within_tolerance, assert_gradients_match, make_problem, \
    nudge_offsets
from deformcp import testing

SPECS = {name: EXAMPLE_SPECS[name] for name in ("basic", "groups2_offset_groups2", "stride2", "asymmetric_padding",
                                                 "dilation", "no_mask_no_bias")}
SPEC_PARAMS = [pytest.param(s, id=n) for n, s in SPECS.items()]


def _tensors(problem, dtype=torch.float64, requires_grad=False):
    return [None if a is None else torch.from_numpy(a).to(dtype).requires_grad_(requires_grad)
            for a in problem.inputs]


def _op_args(tensors, spec):
    pad = spec.padding if len(spec.padding) == 4 else (*spec.padding, *spec.padding)
    return (*tensors, list(spec.stride), list(pad), list(spec.dilation))


# ----------------------------------------------------------------------------------- operators


@pytest.mark.parametrize("spec", [SPECS["basic"], SPECS["no_mask_no_bias"]], ids=["basic", "no_mask_no_bias"])
def test_opcheck_forward(spec, rng):
    args = _op_args(_tensors(make_problem(spec, rng), requires_grad=True), spec)
    torch.library.opcheck(torch.ops.deformcp.deform_conv2d.default, args)


@pytest.mark.parametrize("wanted", [[True] * 5, [False, True, False, True, False]], ids=["all", "offset_weight"])
def test_opcheck_backward(wanted, rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    args = (torch.from_numpy(problem.grad_out), *_op_args(_tensors(problem), spec), wanted)
    torch.library.opcheck(torch.ops.deformcp.deform_conv2d_backward.default, args)


def test_gradcheck_float64(rng):
    # Tiny, and with offsets away from integer coordinates, where the output is smooth in them.
    spec = Spec(batch=1, in_channels=2, out_channels=2, height=4, width=3, kernel=(2, 2), padding=(1, 0, 0, 1),
                stride=(1, 2), offset_groups=2)
    problem = make_problem(spec, rng)
    problem.offset = nudge_offsets(problem.offset)
    tensors = _tensors(problem, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: dt.deform_conv2d(*t, **spec.kwargs), tensors)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradients_against_reference(spec, dtype, rng):
    problem = make_problem(spec, rng)
    tensors = _tensors(problem, dtype, requires_grad=True)
    out = dt.deform_conv2d(*tensors, **spec.kwargs)
    expected_out = testing.loop_deform_conv2d(*problem.inputs, **spec.kwargs)
    dtype_name = str(dtype).removeprefix("torch.")
    assert out.dtype == dtype
    assert_within_tolerance(out.detach().numpy(), expected_out, dtype_name, "forward")
    out.backward(torch.from_numpy(problem.grad_out).to(dtype))
    actual = {n: None if t is None else t.grad.numpy() for n, t in zip(INPUT_NAMES, tensors)}
    assert_gradients_match(actual, testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **spec.kwargs),
                           dtype_name)


def test_only_the_needed_gradients_are_computed(rng, monkeypatch):
    asked = []
    original = api.deform_conv2d_backward
    monkeypatch.setattr(api, "deform_conv2d_backward", lambda *a, wrt, **k: (asked.append(set(wrt)),
                                                                             original(*a, wrt=wrt, **k))[1])
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _tensors(problem)
    weight.requires_grad_()
    offset.requires_grad_()
    dt.deform_conv2d(x, offset, mask, weight, bias, **problem.spec.kwargs).square().sum().backward()
    assert asked == [{"offset", "weight"}]
    assert x.grad is None and mask.grad is None and bias.grad is None
    assert weight.grad is not None and offset.grad is not None


def test_bad_input_is_named(rng):
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _tensors(problem)
    with pytest.raises(ValueError, match="^offset must have shape"):
        dt.deform_conv2d(x, offset[:, :, :-1], mask, weight, bias, padding=1)
    with pytest.raises(TypeError, match="all floating inputs must share one dtype.*weight=float32"):
        dt.deform_conv2d(x, offset, mask, weight.float(), bias, padding=1)
    with pytest.raises(ValueError, match="^stride must be >= 1"):
        dt.deform_conv2d(x, offset, mask, weight, bias, stride=0)


def test_torch_compile_fullgraph_forward_and_backward(rng):
    spec = SPECS["asymmetric_padding"]
    problem = make_problem(spec, rng)

    def loss(x, offset, mask, weight, bias):
        return (dt.deform_conv2d(x, offset, mask, weight, bias, **spec.kwargs).tanh() ** 2).sum()

    eager = _tensors(problem, requires_grad=True)
    compiled = _tensors(problem, requires_grad=True)
    expected = loss(*eager)
    expected.backward()
    torch._dynamo.reset()
    result = torch.compile(loss, fullgraph=True)(*compiled)
    result.backward()
    assert_within_tolerance(result.detach().numpy(), expected.detach().numpy(), "float64", "loss")
    for name, a, b in zip(INPUT_NAMES, compiled, eager):
        assert_within_tolerance(a.grad.numpy(), b.grad.numpy(), "float64", f"grad_{name}")


# -------------------------------------------------------------------------------------- module


MODULE_CONFIGS = {
    "basic": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "groups_offset_groups": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, offset_groups=2),
    "stride_dilation_no_bias": dict(in_channels=3, out_channels=2, kernel_size=(3, 2), stride=(2, 1),
                                    dilation=(1, 2), padding=(2, 1), bias=False),
    "asymmetric_padding_dcnv1": dict(in_channels=2, out_channels=3, kernel_size=3, padding=(0, 1, 2, 1),
                                     modulated=False),
}


@pytest.mark.parametrize("config", MODULE_CONFIGS.values(), ids=MODULE_CONFIGS.keys())
def test_fresh_module_is_an_ordinary_convolution(config):
    torch.manual_seed(0)
    layer = dt.DeformConv2d(**config).double()
    x = torch.randn(2, config["in_channels"], 7, 6, dtype=torch.float64)
    padding = layer.padding
    expected = F.conv2d(F.pad(x, (padding[1], padding[3], padding[0], padding[2])), layer.weight, layer.bias,
                        stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
    offset, mask = layer.predict(x)
    assert torch.count_nonzero(offset) == 0
    assert mask is None if not layer.modulated else bool((mask == 1).all())
    assert_within_tolerance(layer(x).detach().numpy(), expected.detach().numpy(), "float64", "fresh module")


def test_module_trains_and_its_loss_falls():
    # Learn to match a convolution whose input is shifted by half a pixel: offsets must move.
    torch.manual_seed(0)
    target_conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    layer = dt.DeformConv2d(2, 3, 3, padding=1).double()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        shifted = 0.5 * (x + torch.roll(x, 1, dims=3))
        target = target_conv(shifted)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses
    assert layer.offset_predictor.weight.grad is not None and layer.offset_predictor.weight.abs().sum() > 0


def test_module_takes_offset_and_mask_from_outside(rng):
    torch.manual_seed(0)
    layer = dt.DeformConv2d(4, 6, 3, padding=1).double()
    problem = make_problem(dataclasses.replace(SPECS["basic"], out_channels=6), rng)
    x, offset, mask, _, _ = _tensors(problem)
    expected = dt.deform_conv2d(x, offset, mask, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x, offset, mask), expected, rtol=0, atol=0)
    # An outside offset with no mask: a modulated layer predicts the mask (all ones while fresh).
    torch.testing.assert_close(layer(x, offset), dt.deform_conv2d(x, offset, torch.ones_like(mask), layer.weight,
                                                                 layer.bias, padding=1), rtol=0, atol=0)
    # Gradients reach an outside offset.
    offset.requires_grad_()
    layer(x, offset, mask).sum().backward()
    assert offset.grad is not None and offset.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), r"groups \(4\) must divide"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, offset_groups=3), r"offset_groups \(3\) must divide"),
    (dict(in_channels=0, out_channels=6, kernel_size=3), "in_channels must be a positive int"),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 3, 3)), "kernel_size must be an int or a tuple of 2"),
])
def test_module_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dt.DeformConv2d(**kwargs)


# ----------------------------------------------------------------------------------------- GPU


def _cuda_reason():
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        return f"CuPy is needed for CUDA tensors ({exc})"
    return None


CUDA_REASON = _cuda_reason()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
def test_cuda_opcheck_and_gradients(rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    tensors = [None if t is None else t.cuda().requires_grad_() for t in _tensors(problem)]
    torch.library.opcheck(torch.ops.deformcp.deform_conv2d.default, _op_args(tensors, spec))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = dt.deform_conv2d(*tensors, **spec.kwargs)
        out.backward(torch.from_numpy(problem.grad_out).cuda())
    torch.cuda.synchronize()
    assert out.device == tensors[0].device
    assert_within_tolerance(out.detach().cpu().numpy(), testing.loop_deform_conv2d(*problem.inputs, **spec.kwargs), "float64")
    actual = {n: t.grad.cpu().numpy() for n, t in zip(INPUT_NAMES, tensors)}
    assert_gradients_match(actual, testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **spec.kwargs))


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
def test_cuda_module_compiles_and_trains():
    torch.manual_seed(0)
    layer = dt.DeformConv2d(4, 6, 3, padding=1).cuda()
    step = torch.compile(lambda x: layer(x).square().mean(), fullgraph=True)
    x = torch.randn(2, 4, 16, 16, device="cuda")
    loss = step(x)
    loss.backward()
    assert layer.weight.grad.device.type == "cuda" and torch.isfinite(layer.weight.grad).all()
