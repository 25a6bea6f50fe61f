"""ONNX Runtime's ``DeformConv`` (ONNX opset 19, default domain), on its CPU or CUDA provider.

The model is one ``DeformConv`` node built with :mod:`onnx.helper`; weight and
bias are initializers, as in a deployed model.  ONNX's attribute semantics are
ours: ``pads`` is ``[top, left, bottom, right]``, the offset channels are
``(offset group, kernel point, (dy, dx))`` and the inputs are ``X, W, offset, B, mask``.
ONNX defines no gradient for it, so this peer runs the forward only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..shapes import BenchShape, Inputs
from .machine import cpu_threads
from .runner import FORWARD, Runner

NAME = "onnxruntime"
TASKS = (FORWARD,)
OPSET = 19
_PROVIDER = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}


def missing(device: str) -> Optional[str]:
    """Why ONNX Runtime cannot run on ``device``, or ``None``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as error:
        return f"not installed ({error.name})"
    if _PROVIDER[device] not in onnxruntime.get_available_providers():
        return f"{_PROVIDER[device]} is not available in this onnxruntime build"
    return None


def model_bytes(shape: BenchShape, weight: np.ndarray, bias: np.ndarray) -> bytes:
    """A serialized float32 ONNX model: one DeformConv node with ``weight`` and ``bias`` built in."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kh, kw = shape.kernel
    k, g = kh * kw, shape.offset_groups
    oh, ow = shape.out_size

    def tensor(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

    node = helper.make_node(
        "DeformConv", ["X", "W", "offset", "B", "mask"], ["Y"],
        dilations=list(shape.dilation), group=shape.groups, kernel_shape=[kh, kw],
        offset_group=g, pads=list(shape.padding), strides=list(shape.stride))
    graph = helper.make_graph(
        [node], "deform_conv",
        inputs=[tensor("X", (shape.batch, shape.in_channels, shape.height, shape.width)),
                tensor("offset", (shape.batch, 2 * g * k, oh, ow)),
                tensor("mask", (shape.batch, g * k, oh, ow))],
        outputs=[tensor("Y", (shape.batch, shape.out_channels, oh, ow))],
        initializer=[numpy_helper.from_array(np.asarray(weight, np.float32), "W"),
                     numpy_helper.from_array(np.asarray(bias, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def prepare(task: str, shape: BenchShape, inputs: Inputs, device: str) -> Runner:
    """An inference session for the shape; on the GPU, inputs and output stay on the device (I/O binding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes(shape, inputs.weight, inputs.bias), options,
                                   providers=[_PROVIDER[device]])
    feeds = {"X": inputs.x, "offset": inputs.offset, "mask": inputs.mask}
    settings = (f"onnxruntime {ort.__version__} {_PROVIDER[device]}, opset {OPSET}, "
                f"intra_op_num_threads={options.intra_op_num_threads}, inter_op_num_threads=1")
    if device == "cpu":
        return Runner(lambda: session.run(None, feeds), lambda outputs: (outputs[0],), settings)

    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
    binding.bind_output("Y", "cuda", 0)

    def call():
        session.run_with_iobinding(binding)
        return binding

    return Runner(call, lambda bound: (bound.copy_outputs_to_cpu()[0],), settings,
                  synchronize=binding.synchronize_outputs)
