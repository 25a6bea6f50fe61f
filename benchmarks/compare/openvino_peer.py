"""OpenVINO's ``DeformableConvolution`` (opset 8), compiled for the CPU.

``bilinear_interpolation_pad=True`` is the mode whose sampling matches ours (and
torchvision's): a sample within one pixel outside the image still blends in the
corners inside it.  With ``False`` OpenVINO returns zero for any sample outside
the image, and the results differ.  The offset layout is ours; the bias, which
the operation lacks, is an ``Add`` after it.  Weight and bias are constants, as in
a deployed model.  Inference precision is pinned to f32: on CPUs with bfloat16
units OpenVINO would otherwise default to bf16.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..shapes import BenchShape, Inputs
from .machine import cpu_threads
from .runner import FORWARD, Runner

NAME = "openvino"
TASKS = (FORWARD,)


def missing(device: str) -> Optional[str]:
    """Why OpenVINO cannot run on ``device``, or ``None``."""
    if device != "cpu":
        return "compared on the CPU only"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "not installed"
    return None


def _model(shape: BenchShape, weight: np.ndarray, bias: np.ndarray):
    import openvino
    from openvino import opset8

    kh, kw = shape.kernel
    k, g = kh * kw, shape.offset_groups
    oh, ow = shape.out_size
    top, left, bottom, right = shape.padding
    x = opset8.parameter([shape.batch, shape.in_channels, shape.height, shape.width], np.float32, name="x")
    offset = opset8.parameter([shape.batch, 2 * g * k, oh, ow], np.float32, name="offset")
    mask = opset8.parameter([shape.batch, g * k, oh, ow], np.float32, name="mask")
    conv = opset8.deformable_convolution(
        x, offset, opset8.constant(np.asarray(weight, np.float32)),
        strides=list(shape.stride), pads_begin=[top, left], pads_end=[bottom, right],
        dilations=list(shape.dilation), mask=mask, group=shape.groups, deformable_group=g,
        bilinear_interpolation_pad=True)
    out = opset8.add(conv, opset8.constant(np.asarray(bias, np.float32).reshape(1, -1, 1, 1)))
    return openvino.Model([out], [x, offset, mask], "deform_conv")


def prepare(task: str, shape: BenchShape, inputs: Inputs, device: str) -> Runner:
    """A compiled model and one infer request; inputs are shared with OpenVINO, not copied."""
    import openvino

    threads = cpu_threads()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = openvino.Core().compile_model(_model(shape, inputs.weight, inputs.bias), "CPU", config)
    request = compiled.create_infer_request()
    feeds = [np.ascontiguousarray(a) for a in (inputs.x, inputs.offset, inputs.mask)]
    settings = (f"openvino {openvino.__version__} CPU, opset8 bilinear_interpolation_pad=True, "
                f"INFERENCE_NUM_THREADS={threads}, INFERENCE_PRECISION_HINT=f32, PERFORMANCE_HINT=LATENCY")
    return Runner(lambda: request.infer(feeds, share_inputs=True), lambda result: (result[0],), settings)
