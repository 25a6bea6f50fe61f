"""The PyTorch operator and its functional form: torchvision's call, opcheck, gradients, torch.compile,
torch.export, TorchScript, channels_last, autocast and vmap.

The modules are tested in test_torch_modules.py, ONNX export in test_torch_onnx.py, DDP in
test_torch_distributed.py.
"""

from __future__ import annotations

import inspect
import io
import pathlib
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import deformcp.torch as dt
from deformcp import api
from problems import EXAMPLE_SPECS, INPUT_NAMES, Spec, assert_within_tolerance, assert_gradients_match, make_problem, \
    nudge_offsets
from deformcp import testing

SPECS = {name: EXAMPLE_SPECS[name] for name in ("basic", "groups2_offset_groups2", "stride2", "asymmetric_padding",
                                                 "dilation", "no_mask_no_bias")}
SPEC_PARAMS = [pytest.param(s, id=n) for n, s in SPECS.items()]
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _tensors(problem, dtype=torch.float64, requires_grad=False):
    """``(x, offset, mask, weight, bias)`` as tensors (None where the problem has none)."""
    return [None if a is None else torch.from_numpy(a).to(dtype).requires_grad_(requires_grad)
            for a in problem.inputs]


def _op_args(tensors, spec):
    pad = spec.padding if len(spec.padding) == 4 else (*spec.padding, *spec.padding)
    return (*tensors, list(spec.stride), list(pad), list(spec.dilation))


def _call(tensors, spec):
    """The functional form, called as torchvision's (keywords for everything after bias)."""
    x, offset, mask, weight, bias = tensors
    return dt.deform_conv2d(x, offset, weight, bias, mask=mask, **spec.kwargs)


def _reference(problem):
    return testing.loop_deform_conv2d(*problem.inputs, **problem.spec.kwargs)


# ------------------------------------------------------------------------- torchvision's call


# torchvision.ops.deform_conv2d's parameters and defaults, as its documentation states them.
TORCHVISION_PARAMETERS = [("input", inspect.Parameter.empty), ("offset", inspect.Parameter.empty),
                          ("weight", inspect.Parameter.empty), ("bias", None), ("stride", (1, 1)),
                          ("padding", (0, 0)), ("dilation", (1, 1)), ("mask", None)]


def test_signature_is_torchvisions():
    parameters = inspect.signature(dt.deform_conv2d).parameters.values()
    assert [(p.name, p.default) for p in parameters] == TORCHVISION_PARAMETERS
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)


def test_positional_and_keyword_calls_agree_with_the_reference(rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    x, offset, mask, weight, bias = _tensors(problem)
    expected = _reference(problem)
    positional = dt.deform_conv2d(x, offset, weight, bias, spec.stride, spec.padding[:2], spec.dilation, mask)
    keywords = dt.deform_conv2d(input=x, offset=offset, weight=weight, bias=bias, stride=spec.stride,
                                padding=spec.padding, dilation=spec.dilation, mask=mask)
    assert_within_tolerance(positional.numpy(), expected, "float64", "positional")
    assert_within_tolerance(keywords.numpy(), expected, "float64", "keywords")


def test_ints_and_four_sided_padding(rng):
    spec = Spec(height=7, width=6, stride=(2, 2), dilation=(2, 2), padding=(2, 2, 2, 2))
    problem = make_problem(spec, rng)
    x, offset, mask, weight, bias = _tensors(problem)
    out = dt.deform_conv2d(x, offset, weight, bias, stride=2, padding=2, dilation=2, mask=mask)
    assert_within_tolerance(out.numpy(), _reference(problem), "float64", "int arguments")
    asymmetric = make_problem(SPECS["asymmetric_padding"], rng)
    out = _call(_tensors(asymmetric), asymmetric.spec)
    assert_within_tolerance(out.numpy(), _reference(asymmetric), "float64", "(top, left, bottom, right)")


# ------------------------------------------------------------------------------------ operators


@pytest.mark.parametrize("spec", [SPECS["basic"], SPECS["no_mask_no_bias"]], ids=["basic", "no_mask_no_bias"])
def test_opcheck_forward(spec, rng):
    args = _op_args(_tensors(make_problem(spec, rng), requires_grad=True), spec)
    torch.library.opcheck(torch.ops.deformcp.deform_conv2d.default, args)


def test_opcheck_forward_channels_last(rng):
    spec = SPECS["basic"]
    x, *rest = _tensors(make_problem(spec, rng), requires_grad=True)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.deformcp.deform_conv2d.default, _op_args([x, *rest], spec))


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
    assert torch.autograd.gradcheck(lambda *t: _call(t, spec), tensors)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradients_against_reference(spec, dtype, rng):
    problem = make_problem(spec, rng)
    tensors = _tensors(problem, dtype, requires_grad=True)
    out = _call(tensors, spec)
    dtype_name = str(dtype).removeprefix("torch.")
    assert out.dtype == dtype
    assert_within_tolerance(out.detach().numpy(), _reference(problem), dtype_name, "forward")
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
    _call((x, offset, mask, weight, bias), problem.spec).square().sum().backward()
    assert asked == [{"offset", "weight"}]
    assert x.grad is None and mask.grad is None and bias.grad is None
    assert weight.grad is not None and offset.grad is not None


def test_bad_input_is_named(rng):
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _tensors(problem)
    with pytest.raises(ValueError, match="^offset must have shape"):
        dt.deform_conv2d(x, offset[:, :, :-1], weight, bias, padding=1, mask=mask)
    with pytest.raises(TypeError, match="all floating inputs must share one dtype.*weight=float32"):
        dt.deform_conv2d(x, offset, weight.float(), bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="^stride must be >= 1"):
        dt.deform_conv2d(x, offset, weight, bias, stride=0, mask=mask)
    with pytest.raises(ValueError, match="^padding must be an int or a tuple of 2 or 4 ints"):
        dt.deform_conv2d(x, offset, weight, bias, padding=(1, 1, 1), mask=mask)
    # The NumPy API's order (mask third) sends the mask in as the weight: named, not computed.
    with pytest.raises(ValueError, match="^bias must be 1-D"):
        dt.deform_conv2d(x, offset, mask, weight, padding=1)


# ------------------------------------------------------------------- graph capture, TorchScript


def test_torch_compile_fullgraph_forward_and_backward(rng):
    spec = SPECS["asymmetric_padding"]
    problem = make_problem(spec, rng)

    def loss(*tensors):
        return (_call(tensors, spec).tanh() ** 2).sum()

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


def test_torch_export_keeps_the_operator(rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)

    class Functional(torch.nn.Module):
        def forward(self, x, offset, mask, weight, bias):
            return _call((x, offset, mask, weight, bias), spec)

    tensors = _tensors(problem)
    batch = torch.export.Dim("batch")
    program = torch.export.export(Functional(), tuple(tensors),
                                  dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, None, None))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.deformcp.deform_conv2d.default in targets
    assert_within_tolerance(program.module()(*tensors).numpy(), _reference(problem), "float64", "exported")
    one = [tensors[0][:1], tensors[1][:1], tensors[2][:1], *tensors[3:]]
    assert_within_tolerance(program.module()(*one).numpy(), _reference(problem)[:1], "float64", "batch of one")


def test_torchscript_functional_as_torchvisions(rng):
    """Scripted, the functional form takes (h, w) pairs, as torchvision's does; saved and loaded, it still runs."""
    spec = Spec(padding=(1, 2, 1, 2), stride=(1, 2))
    problem = make_problem(spec, rng)
    x, offset, mask, weight, bias = _tensors(problem)

    @torch.jit.script
    def scripted(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        return dt.deform_conv2d(x, offset, weight, bias, stride=(1, 2), padding=(1, 2), mask=mask)

    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for function in (scripted, loaded):
        assert_within_tolerance(function(x, offset, weight, bias, mask).numpy(), _reference(problem), "float64")


# ------------------------------------------------------------------------------ channels_last


def test_channels_last_input_gives_channels_last_output(rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    x, offset, mask, weight, bias = _tensors(problem, requires_grad=True)
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = _call((x_last, offset, mask, weight, bias), spec)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_within_tolerance(out.detach().numpy(), _reference(problem), "float64", "channels_last forward")
    out.backward(torch.from_numpy(problem.grad_out))
    expected = testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **spec.kwargs)
    assert_within_tolerance(x_last.grad.numpy(), expected["x"], "float64", "grad_x")
    # An NCHW input keeps NCHW, and so does compiled code on a channels_last one.
    assert _call((x, offset, mask, weight, bias), spec).is_contiguous()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: _call(t, spec), fullgraph=True)(x_last, offset, mask, weight, bias)
    assert compiled.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------- autocast


# Both autocast dtypes, CPU and CUDA: (torch dtype, the NumPy dtype that rounds as it does, tolerance name).
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, ml_dtypes.bfloat16, "bfloat16", id="bfloat16"),
                   pytest.param(torch.float16, np.float16, "float16", id="float16")]


def _rounded(problem, numpy_dtype):
    """The problem's inputs as autocast hands them to the operator: rounded to its dtype."""
    return problem.astype(numpy_dtype).astype(np.float64)


@pytest.mark.parametrize("autocast_dtype, numpy_dtype, name", AUTOCAST_DTYPES)
def test_autocast_cpu_casts_to_the_autocast_dtype(autocast_dtype, numpy_dtype, name, rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    x, offset, mask, weight, bias = _tensors(problem, torch.float32, requires_grad=True)
    mask = mask.detach().to(autocast_dtype)  # already in the autocast dtype: left as it is
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = dt.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
        loss = (out.float() * torch.from_numpy(problem.grad_out).float()).sum()
    loss.backward()
    assert out.dtype == autocast_dtype
    rounded = _rounded(problem, numpy_dtype)
    assert_within_tolerance(out.float().detach().numpy(), _reference(rounded), name, "autocast forward")
    expected = testing.loop_deform_conv2d_backward(rounded.grad_out, *rounded.inputs, **spec.kwargs)
    for tensor, key in ((x, "x"), (offset, "offset"), (weight, "weight"), (bias, "bias")):
        assert tensor.grad.dtype == torch.float32, key
        assert_within_tolerance(tensor.grad.numpy(), expected[key], name, f"grad_{key}")


def test_autocast_leaves_float64_alone_and_compiles(rng):
    spec = SPECS["basic"]
    problem = make_problem(spec, rng)
    tensors = _tensors(problem)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _call(tensors, spec).dtype == torch.float64       # PyTorch's rule: float64 is not cast
    tensors32 = _tensors(problem, torch.float32)

    def run(*t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _call(t, spec)

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)(*tensors32)
    assert compiled.dtype == torch.bfloat16
    assert_within_tolerance(compiled.float().numpy(), _reference(_rounded(problem, ml_dtypes.bfloat16)), "bfloat16")


# ----------------------------------------------------------------------------------------- vmap


def _count_forward_calls(monkeypatch):
    calls = []
    original = api.deform_conv2d
    monkeypatch.setattr(api, "deform_conv2d", lambda *a, **k: (calls.append(a[0].shape), original(*a, **k))[1])
    return calls


def test_vmap_folds_the_mapped_dimension_into_the_batch(rng, monkeypatch):
    spec = SPECS["groups2_offset_groups2"]
    members = [make_problem(spec, rng) for _ in range(3)]
    stack = lambda i, dim=0: torch.stack([_tensors(m)[i] for m in members], dim)  # noqa: E731
    _, _, _, weight, bias = _tensors(members[0])
    calls = _count_forward_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when it falls back to a per-example loop
        # x mapped along its second dimension, offset along its first, mask not mapped.
        mask = _tensors(members[0])[2]
        out = torch.func.vmap(lambda x, offset: dt.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask),
                              in_dims=(1, 0))(stack(0, 1), stack(1))
    assert len(calls) == 1 and calls[0][0] == 3 * spec.batch
    for v, member in enumerate(members):
        inputs = (member.x, member.offset, members[0].mask, members[0].weight, members[0].bias)
        expected = testing.loop_deform_conv2d(*inputs, **spec.kwargs)
        assert_within_tolerance(out[v].numpy(), expected, "float64", f"member {v}")


def test_vmap_over_weights_folds_into_groups(rng, monkeypatch):
    """An ensemble: one input, per-member weight, bias and offsets, in one call with V times the groups."""
    spec = SPECS["groups2_offset_groups2"]
    members = [make_problem(spec, rng) for _ in range(3)]
    stack = lambda i: torch.stack([_tensors(m)[i] for m in members])  # noqa: E731
    x = _tensors(members[0])[0]
    calls = _count_forward_calls(monkeypatch)
    weights = stack(3).requires_grad_()
    out = torch.func.vmap(lambda offset, mask, weight, bias: dt.deform_conv2d(x, offset, weight, bias, padding=1,
                                                                              mask=mask))(
        stack(1), stack(2), weights, stack(4))
    assert len(calls) == 1
    grad_outs = np.stack([m.grad_out for m in members])
    out.backward(torch.from_numpy(grad_outs))
    for v, member in enumerate(members):
        inputs = (members[0].x, member.offset, member.mask, member.weight, member.bias)
        assert_within_tolerance(out[v].detach().numpy(), testing.loop_deform_conv2d(*inputs, **spec.kwargs),
                                "float64", f"member {v}")
        expected = testing.loop_deform_conv2d_backward(member.grad_out, *inputs, **spec.kwargs)
        assert_within_tolerance(weights.grad[v].numpy(), expected["weight"], "float64", f"grad_weight {v}")


def test_func_grad_fails_as_docs_torch_md_says(rng):
    """PyTorch cannot run torch.func.grad over a custom operator's autograd; the docs quote its error."""
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _tensors(problem)
    with pytest.raises(RuntimeError) as error:
        torch.func.grad(lambda w: dt.deform_conv2d(x, offset, w, bias, padding=1, mask=mask).sum())(weight)
    message = str(error.value).split(". For more details")[0]
    assert "setup_context" in message
    assert message in (DOCS / "torch.md").read_text()


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
        out = _call(tensors, spec)
        out.backward(torch.from_numpy(problem.grad_out).cuda())
    torch.cuda.synchronize()
    assert out.device == tensors[0].device
    assert_within_tolerance(out.detach().cpu().numpy(), _reference(problem), "float64")
    actual = {n: t.grad.cpu().numpy() for n, t in zip(INPUT_NAMES, tensors)}
    assert_gradients_match(actual, testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **spec.kwargs))


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
@pytest.mark.parametrize("autocast_dtype, numpy_dtype, name", AUTOCAST_DTYPES)
def test_cuda_autocast(autocast_dtype, numpy_dtype, name, rng):
    spec = SPECS["groups2_offset_groups2"]
    problem = make_problem(spec, rng)
    tensors = [t.cuda().float().requires_grad_() for t in _tensors(problem)]
    with torch.autocast("cuda", dtype=autocast_dtype):
        out = _call(tensors, spec)
    out.float().backward(torch.from_numpy(problem.grad_out).float().cuda())
    assert out.dtype == autocast_dtype and all(t.grad.dtype == torch.float32 for t in tensors)
    rounded = _rounded(problem, numpy_dtype)
    assert_within_tolerance(out.float().detach().cpu().numpy(), _reference(rounded), name)
    expected = testing.loop_deform_conv2d_backward(rounded.grad_out, *rounded.inputs, **spec.kwargs)
    assert_within_tolerance(tensors[3].grad.cpu().numpy(), expected["weight"], name, "grad_weight")


def test_deterministic_algorithms_and_tf32_switch_reach_the_backend(monkeypatch, rng):
    # torch.use_deterministic_algorithms(True) asks for the atomic-free grad_x, and PyTorch's TF32
    # switch for float32 products is followed; both are read when the operator runs.
    seen = []
    forward, backward = api.deform_conv2d, api.deform_conv2d_backward
    monkeypatch.setattr(api, "deform_conv2d",
                        lambda *a, **k: (seen.append(("forward", k["allow_tf32"])), forward(*a, **k))[1])
    monkeypatch.setattr(api, "deform_conv2d_backward",
                        lambda *a, **k: (seen.append(("backward", k["deterministic"], k["allow_tf32"])),
                                         backward(*a, **k))[1])
    problem = make_problem(Spec(), rng)
    tensors = [torch.from_numpy(a).requires_grad_() for a in problem.inputs]
    matmul = torch.backends.cuda.matmul
    was_deterministic, was_precision = torch.are_deterministic_algorithms_enabled(), matmul.fp32_precision
    try:
        torch.use_deterministic_algorithms(True)
        matmul.fp32_precision = "tf32"
        dt.deform_conv2d(tensors[0], tensors[1], tensors[3], tensors[4], padding=1, mask=tensors[2]).sum().backward()
        torch.use_deterministic_algorithms(False)
        matmul.fp32_precision = "ieee"
        dt.deform_conv2d(tensors[0], tensors[1], tensors[3], tensors[4], padding=1, mask=tensors[2]).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        matmul.fp32_precision = was_precision
    assert seen == [("forward", True), ("backward", True, True), ("forward", False), ("backward", False, False)]
