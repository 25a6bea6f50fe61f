"""ONNX export of the operator and the layers: one standard DeformConv node (opset 19, default domain),
from the TorchScript exporter and from the dynamo exporter, run by ONNX Runtime against eager PyTorch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import deformcp.torch as dt
from deformcp.testing import relative_error
from problems import EXAMPLE_SPECS, Spec, make_problem

EXPORTERS = ["torchscript", "dynamo"]
# float32 ONNX Runtime against float32 eager PyTorch.
ONNX_TOLERANCE = 1e-5

CASES = {
    "mask_bias": EXAMPLE_SPECS["basic"],
    "asymmetric_padding": EXAMPLE_SPECS["asymmetric_padding"],
    "groups_stride_dilation_no_mask_no_bias": Spec(in_channels=4, out_channels=6, groups=2, offset_groups=2, height=7,
                                                   width=7, stride=(2, 1), dilation=(1, 2), padding=(1, 2, 1, 2),
                                                   mask=False, bias=False),
    "mask_no_bias": Spec(kernel=(3, 2), padding=(1, 0, 1, 1), mask=True, bias=False),
    "bias_no_mask": Spec(offset_groups=2, mask=False, bias=True, padding=(2, 1, 0, 1)),
}


class Functional(torch.nn.Module):
    """``deformcp.torch.deform_conv2d`` with the weight and bias as parameters, as a deployed model holds them."""

    def __init__(self, weight, bias, spec):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.spec = spec

    def forward(self, x, offset, mask=None):
        return dt.deform_conv2d(x, offset, self.weight, self.bias, mask=mask, **self.spec.kwargs)


def _export(model, args, exporter, **options) -> bytes:
    model.eval()
    if exporter == "torchscript":
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
            torch.onnx.export(model, args, buffer, dynamo=False, **options)
        return buffer.getvalue()
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, **options)
    return program.model_proto.SerializeToString()


def _deform_conv_node(data: bytes) -> onnx.NodeProto:
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    nodes = [node for node in model.graph.node if node.op_type == "DeformConv"]
    assert len(nodes) == 1, [node.op_type for node in model.graph.node]
    assert nodes[0].domain == ""
    default_opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default_opset and default_opset[0] >= 19
    return nodes[0]


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _expected_attributes(spec: Spec) -> dict:
    geom = spec.geometry
    return dict(pads=list(geom.padding), strides=list(spec.stride), dilations=list(spec.dilation), group=spec.groups,
                offset_group=spec.offset_groups, kernel_shape=list(spec.kernel))


def _run(data: bytes, inputs) -> np.ndarray:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), names
    return session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]


def _check_node(node, spec):
    attributes = _attributes(node)
    for key, value in _expected_attributes(spec).items():
        assert attributes.get(key, [1, 1] if key in ("strides", "dilations") else 1) == value, key
    # Inputs X, W, offset, then B and mask where present (an absent B before a mask is an empty name).
    names = list(node.input)
    assert len(names) == (5 if spec.mask else 4 if spec.bias else 3), names
    if spec.mask and not spec.bias:
        assert names[3] == ""


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_functional_exports_to_deform_conv_and_runs_in_onnxruntime(spec, exporter, rng):
    problem = make_problem(spec, rng, dtype=np.float32)
    x, offset, mask, weight, bias = (None if a is None else torch.from_numpy(a) for a in problem.inputs)
    model = Functional(weight, bias, spec)
    args = (x, offset) if mask is None else (x, offset, mask)
    data = _export(model, args, exporter, opset_version=19)
    _check_node(_deform_conv_node(data), spec)
    with torch.no_grad():
        eager = model(*args).numpy()
    assert relative_error(_run(data, args), eager) <= ONNX_TOLERANCE


def _randomised(layer):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return layer


MODULES = {
    "pack_modulated_asymmetric": (lambda: dt.DeformConv2dPack(4, 6, 3, padding=(0, 1, 2, 1), offset_groups=2),
                                  Spec(in_channels=4, out_channels=6, offset_groups=2, padding=(0, 1, 2, 1),
                                       height=8, width=7)),
    "pack_dcnv1_stride": (lambda: dt.DeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2, modulated=False,
                                                      bias=False),
                          Spec(in_channels=4, out_channels=6, groups=2, stride=(2, 2), padding=(1, 1), height=8,
                               width=7, mask=False, bias=False)),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODULES)
def test_pack_exports_and_runs_in_onnxruntime(name, exporter):
    make, spec = MODULES[name]
    layer = _randomised(make())
    x = torch.randn(2, 4, spec.height, spec.width, generator=torch.Generator().manual_seed(4))
    data = _export(layer, (x,), exporter)  # each exporter's default opset (20 in PyTorch 2.13)
    _check_node(_deform_conv_node(data), spec)
    with torch.no_grad():
        eager = layer(x).numpy()
    assert relative_error(_run(data, (x,)), eager) <= ONNX_TOLERANCE


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_torchvision_layer_exports_with_a_dynamic_batch(exporter, rng):
    layer = _randomised(dt.DeformConv2d(4, 6, 3, padding=1))
    spec = EXAMPLE_SPECS["basic"]
    problem = make_problem(spec, rng, dtype=np.float32)
    x, offset, mask = (torch.from_numpy(a) for a in (problem.x, problem.offset, problem.mask))
    if exporter == "torchscript":
        options = dict(input_names=["input", "offset", "mask"], opset_version=19,
                       dynamic_axes={name: {0: "batch"} for name in ("input", "offset", "mask")})
    else:
        batch = torch.export.Dim("batch")
        options = dict(dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    data = _export(layer, (x, offset, mask), exporter, **options)
    _check_node(_deform_conv_node(data), spec)
    one = (x[:1], offset[:1], mask[:1])
    with torch.no_grad():
        assert relative_error(_run(data, one), layer(*one).numpy()) <= ONNX_TOLERANCE
        assert relative_error(_run(data, (x, offset, mask)), layer(x, offset, mask).numpy()) <= ONNX_TOLERANCE


def test_exported_program_with_the_translation_table(rng):
    """A program captured by torch.export holds the operator; onnx_translation_table() translates it."""
    spec = CASES["asymmetric_padding"]
    problem = make_problem(spec, rng, dtype=np.float32)
    x, offset, mask, weight, bias = (torch.from_numpy(a) for a in problem.inputs)
    model = Functional(weight, bias, spec).eval()
    program = torch.export.export(model, (x, offset, mask))
    assert torch.ops.deformcp.deform_conv2d.default in [n.target for n in program.graph.nodes]
    onnx_program = torch.onnx.export(program, custom_translation_table=dt.onnx_translation_table(), verbose=False)
    data = onnx_program.model_proto.SerializeToString()
    _check_node(_deform_conv_node(data), spec)
    with torch.no_grad():
        eager = model(x, offset, mask).numpy()
    assert relative_error(_run(data, (x, offset, mask)), eager) <= ONNX_TOLERANCE


def test_torchscript_exporter_below_opset_19_says_so(rng):
    layer = dt.DeformConv2dPack(4, 6, 3, padding=1)
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="added in version 19"):
        _export(layer, (torch.randn(1, 4, 5, 5),), "torchscript", opset_version=17)
