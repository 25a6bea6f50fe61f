"""The CUDA path around the kernels, without a GPU: CuPy 14.2 played by the stand-in.

``tests/test_gpu.py`` runs this code on a device.  Here ``tests/emulation/fake_cupy.py``
stands in for CuPy (strict where CuPy is, its kernels run by the CPU emulation), so that
a CPU-only CI holds what first contact with a GPU needs: CUDA arrays cross the interop
layer and run on the kernels; bfloat16 is refused clearly by a CuPy without it while the
other dtypes run; streams are taken with ``Stream.from_external`` (never the deprecated
``ExternalStream``: any DeprecationWarning fails these tests); calls with PyTorch tensors
allocate from PyTorch's caching allocator, for the call only; and the JAX adapter takes
XLA's buffers and stream through CuPy for every dtype, bfloat16 included.
"""

from __future__ import annotations

import gc
import itertools
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import backend_check
import deformcp
import deformcp.jax as dj
from deformcp import interop, testing
from deformcp.api import INPUT_NAMES
from deformcp.backends import cuda_kernels
from deformcp.dtypes import compute_dtype
from emulation import fake_cupy
from problems import Spec, assert_within_tolerance, make_problem

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

SPEC = Spec(batch=2, in_channels=4, height=6, width=5, out_channels=6, kernel=(3, 2), groups=2, offset_groups=2,
            stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def backend():
    """The CuPy backend imported against the stand-in, which is ``sys.modules["cupy"]`` meanwhile."""
    with fake_cupy.installed() as module:
        fake_cupy.launches.clear()
        yield module


def _on_device(arrays):
    return [None if a is None else fake_cupy.CudaArray(a) for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_cuda_arrays_run_on_the_kernels_through_the_public_api(backend, dtype, rng):
    problem = make_problem(SPEC, rng, dtype)
    inputs = _on_device(problem.inputs)
    out = deformcp.deform_conv2d(*inputs, **SPEC.kwargs)
    grads = deformcp.deform_conv2d_backward(fake_cupy.CudaArray(problem.grad_out), *inputs, **SPEC.kwargs)
    columns = deformcp.deform_im2col(*inputs[:3], SPEC.kernel, **SPEC.kwargs)
    results = {"forward": out, "im2col": columns, **{f"grad_{n}": g for n, g in zip(INPUT_NAMES, grads)}}
    assert all(type(r) is fake_cupy.ndarray for r in results.values())
    launched = {launch.name.split("<")[0] for launch in fake_cupy.launches}
    assert launched and launched <= {kernel for _, kernel in cuda_kernels.STAGES.values()}, launched
    backend_check.assert_outputs_close({k: np.asarray(v) for k, v in results.items()},
                                       backend_check.numpy_twin_outputs(problem), dtype)


def test_bfloat16_on_a_cupy_without_it_is_refused_before_any_work(backend, rng):
    problem = make_problem(SPEC, rng, BFLOAT16)
    with fake_cupy.pretending("13.6.0"):
        inputs = _on_device(problem.inputs)
        with pytest.raises(TypeError, match=r"^x is a bfloat16 array on CUDA, which needs CuPy >= 14 .*CuPy 13\.6\.0"):
            deformcp.deform_conv2d(*inputs, **SPEC.kwargs)
        grad_out = fake_cupy.CudaArray(problem.grad_out)
        with pytest.raises(TypeError, match=r"^grad_out is a bfloat16 array on CUDA"):
            deformcp.deform_conv2d_backward(grad_out, *inputs, **SPEC.kwargs)
        assert all(a.dlpack_calls == 0 for a in (grad_out, *inputs) if a is not None), "an input was read"
        assert not fake_cupy.launches
        # The other dtypes still run on that CuPy.
        p32 = problem.astype(np.float32)
        out = deformcp.deform_conv2d(*_on_device(p32.inputs), **SPEC.kwargs)
    exact = problem.astype(np.float64)
    assert_within_tolerance(np.asarray(out), testing.loop_deform_conv2d(*exact.inputs, **SPEC.kwargs), "float32")


def test_what_cupy_needs_for_bfloat16(backend, monkeypatch):
    assert interop.cupy_bfloat16_missing() is None
    with fake_cupy.pretending("13.6.0"):
        assert interop.cupy_bfloat16_missing() == "CuPy 13.6.0 (bfloat16 needs CuPy >= 14)"
    monkeypatch.setattr(np, "__version__", "2.1.1")
    assert interop.cupy_bfloat16_missing() == "NumPy 2.1.1 (CuPy enables bfloat16 from NumPy 2.1.2)"
    monkeypatch.setattr(np, "__version__", "2.1.2")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises ImportError
    assert interop.cupy_bfloat16_missing() == "no ml_dtypes"


class _TorchStream:
    """What ``torch.cuda.current_stream`` returns, as far as deformcp uses it: the CUDA stream protocol."""

    def __init__(self, pointer: int):
        self.cuda_stream = pointer

    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.fixture
def torch_cuda(monkeypatch):
    """PyTorch's current stream and caching allocator, played by recorders; yields what they saw."""
    seen = types.SimpleNamespace(stream=_TorchStream(0x5EED), allocated={}, freed=[])
    pointers = itertools.count(0x1000, 0x100)

    def caching_allocator_alloc(size, device=None, stream=None):
        pointer = next(pointers)
        seen.allocated[pointer] = (size, device, stream)
        return pointer

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: seen.stream)
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", caching_allocator_alloc)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", seen.freed.append)
    return seen


def test_torch_calls_run_on_torchs_stream_and_allocate_from_torch(backend, torch_cuda, rng):
    cupy = sys.modules["cupy"]
    problem = make_problem(SPEC, rng, np.float32)
    geom, cdt = SPEC.geometry, compute_dtype(np.float32)
    arrays = [None if a is None else cupy.asarray(a) for a in problem.inputs]
    with interop._caller_stream("torch", (interop.DL_CUDA, 0)):
        assert cupy.cuda.get_current_stream().ptr == torch_cuda.stream.cuda_stream
        out = backend.forward(geom, cdt, *arrays)
        gc.collect()
    assert cupy.cuda.get_current_stream().ptr == 0 and not fake_cupy._allocators, "the call's scope leaked"
    # The output and every scratch buffer came from PyTorch, for its stream, on device 0.
    assert out.memory.ptr in torch_cuda.allocated and torch_cuda.allocated[out.memory.ptr][0] == out.nbytes
    assert len(torch_cuda.allocated) > 1, "no scratch space was allocated"
    assert {(device, stream) for _, device, stream in torch_cuda.allocated.values()} == {
        (0, torch_cuda.stream.cuda_stream)}
    # Scratch went back to PyTorch when CuPy let go of it; the output goes back when it is dropped.
    assert sorted(torch_cuda.freed) == sorted(set(torch_cuda.allocated) - {out.memory.ptr})
    pointer = out.memory.ptr
    del out
    gc.collect()
    assert pointer in torch_cuda.freed
    assert_within_tolerance(np.asarray(backend.forward(geom, cdt, *arrays)),
                            testing.loop_deform_conv2d(*problem.inputs, **SPEC.kwargs), "float32")


class _OldTorchStream:
    """A PyTorch stream from before the CUDA stream protocol: only ``cuda_stream``."""

    cuda_stream = 0xB0B


@pytest.mark.parametrize("stream, pointer", [(_TorchStream(0xABC), 0xABC), (_OldTorchStream(), 0xB0B),
                                             (0xC0FFEE, 0xC0FFEE)], ids=["protocol", "cuda_stream", "pointer"])
def test_on_stream_takes_streams_by_protocol(backend, stream, pointer):
    cupy = sys.modules["cupy"]
    with interop.on_stream(stream):
        assert cupy.cuda.get_current_stream().ptr == pointer
    assert cupy.cuda.get_current_stream().ptr == 0


def test_on_stream_falls_back_to_external_stream_on_cupy_13(backend, monkeypatch):
    cupy = sys.modules["cupy"]
    monkeypatch.delattr(fake_cupy.Stream, "from_external")
    with fake_cupy.pretending("13.6.0"), interop.on_stream(0xABC):
        assert isinstance(cupy.cuda.get_current_stream(), fake_cupy.ExternalStream)
        assert cupy.cuda.get_current_stream().ptr == 0xABC


@pytest.mark.parametrize("stream_is_a_method", [False, True], ids=["property", "method"])
def test_jax_buffers_on_cuda_are_viewed_through_dlpack_on_xlas_stream(backend, stream_is_a_method):
    cupy = sys.modules["cupy"]
    values = np.arange(6.0, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)
    buffer = fake_cupy.CudaArray(values)
    xla_stream = 0xFEED
    ctx = types.SimpleNamespace(stream=(lambda: xla_stream) if stream_is_a_method else xla_stream)
    with dj._buffer_arrays(buffer, ctx) as (xp, view):
        assert xp is cupy and cupy.cuda.get_current_stream().ptr == xla_stream
        array = view(buffer)
        assert buffer.dlpack_calls == 1 and array.dtype == BFLOAT16
        np.testing.assert_array_equal(np.asarray(array).astype(np.float32), values.astype(np.float32))
    assert cupy.cuda.get_current_stream().ptr == 0


def test_jax_takes_the_device_path_for_every_dtype_cupy_has(backend, monkeypatch):
    monkeypatch.setattr(dj, "_cupy_available", lambda: True)
    assert all(dj._cupy_takes(dtype) for dtype in DTYPES)
    with fake_cupy.pretending("13.6.0"):
        assert [dj._cupy_takes(dtype) for dtype in DTYPES] == [True, True, True, False]
    monkeypatch.setattr(dj, "_cupy_available", lambda: False)
    assert not any(dj._cupy_takes(dtype) for dtype in DTYPES)


def test_jax_bfloat16_on_cuda_lowers_to_the_device_buffer_callback(backend, monkeypatch, rng):
    # Lowered for CUDA on this CPU-only machine: the callback XLA would run on the GPU.
    monkeypatch.setattr(dj, "_cupy_available", lambda: True)
    problem = make_problem(SPEC, rng).astype(BFLOAT16)
    arrays = [None if a is None else jnp.asarray(a) for a in problem.inputs]
    forward = jax.jit(lambda *a: dj.deform_conv2d(*a, **SPEC.kwargs))
    training = jax.jit(lambda *a: jax.grad(lambda x, w: dj.deform_conv2d(x, a[1], a[2], w, a[4], **SPEC.kwargs)
                                           .astype(jnp.float32).sum(), argnums=(0, 1))(a[0], a[3]))
    for function in (forward, training):
        hlo = function.trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()
        # Only the device-buffer callback: no host callback (xla_ffi_python_gpu_callback).
        assert set(re.findall(r"custom_call @(\w*callback\w*)", hlo)) == {"xla_buffer_python_gpu_callback"}
