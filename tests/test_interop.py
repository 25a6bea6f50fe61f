"""The plain API on any DLPack array: NumPy, PyTorch, JAX and other producers in, the caller's type out.

Values are checked against the float64 loop reference; the interop layer's own
promises (no copies, the caller's type, device and dtype, clear errors) are checked
directly.  GPU variants run where CuPy sees a CUDA device and skip, saying so, elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import deformcp
from deformcp import interop
from problems import INPUT_NAMES, Spec, assert_within_tolerance, assert_gradients_match, make_problem
from deformcp import testing

SPEC = Spec(batch=2, in_channels=4, out_channels=4, groups=2, offset_groups=2, height=5, width=6,
            stride=(1, 2), padding=(1, 0, 2, 1))


@pytest.fixture
def problem(rng):
    return make_problem(SPEC, rng)


def _expected(problem):
    p = problem
    return dict(
        forward=testing.loop_deform_conv2d(*p.inputs, **p.spec.kwargs),
        backward=testing.loop_deform_conv2d_backward(p.grad_out, *p.inputs, **p.spec.kwargs),
        im2col=testing.loop_im2col(p.x, p.offset, p.mask, *p.spec.kernel, **p.spec.kwargs),
    )


def _run_all(convert, problem):
    """Forward, backward and im2col on converted inputs; returns the raw results of the caller's type."""
    p = problem
    x, offset, mask, weight, bias, grad_out = (None if a is None else convert(a)
                                               for a in (*p.inputs, p.grad_out))
    return dict(
        forward=deformcp.deform_conv2d(x, offset, mask, weight, bias, **p.spec.kwargs),
        backward=deformcp.deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, **p.spec.kwargs),
        im2col=deformcp.deform_im2col(x, offset, mask, p.spec.kernel, **p.spec.kwargs),
    )


def _check_all(results, expected, to_numpy, dtype_name, is_result):
    """Every result passes ``is_result`` (type, dtype, device) and matches the reference."""
    grads = dict(zip(INPUT_NAMES, results["backward"]))
    for what, r in (("forward", results["forward"]), ("im2col", results["im2col"]),
                    *((f"grad_{n}", g) for n, g in grads.items())):
        assert is_result(r), f"{what}: {type(r).__module__}.{type(r).__qualname__} {getattr(r, 'dtype', None)}"
    assert_within_tolerance(to_numpy(results["forward"]), expected["forward"], dtype_name, "forward")
    assert_within_tolerance(to_numpy(results["im2col"]).reshape(expected["im2col"].shape), expected["im2col"], dtype_name,
                 "im2col")
    assert_gradients_match({n: to_numpy(g) for n, g in grads.items()}, expected["backward"], dtype_name)


def _torch_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


# --------------------------------------------------------------------------------------- NumPy


def test_numpy_arrays_pass_straight_through(problem):
    with interop.native(**dict(zip(INPUT_NAMES, problem.inputs))) as call:
        for name, array in zip(INPUT_NAMES, problem.inputs):
            assert call.arrays[name] is array, name
    assert call.kind == "numpy"


def test_read_only_numpy_inputs(problem):
    # np.from_dlpack of a JAX array is read-only; so are these.
    for a in (*problem.inputs, problem.grad_out):
        a.setflags(write=False)
    results = _run_all(lambda a: a, problem)
    _check_all(results, _expected(problem), np.asarray, "float64", lambda r: isinstance(r, np.ndarray))


def test_read_only_view_of_a_jax_array(problem):
    jax_x = jnp.asarray(problem.x.astype(np.float32))
    x = np.from_dlpack(jax_x)
    assert not x.flags.writeable
    p32 = problem.astype(np.float32)
    out = deformcp.deform_conv2d(x, *p32.inputs[1:], **p32.spec.kwargs)
    assert_within_tolerance(out, _expected(problem)["forward"], "float32")


# ------------------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_round_trip(problem, dtype):
    def check(r):
        return isinstance(r, torch.Tensor) and r.dtype == dtype and r.device.type == "cpu"

    results = _run_all(lambda a: torch.from_numpy(a).to(dtype), problem)
    dtype_name = str(dtype).removeprefix("torch.")
    _check_all(results, _expected(problem), lambda t: t.numpy(), dtype_name, check)


def test_torch_inputs_are_not_copied(problem):
    tensors = {n: torch.from_numpy(a) for n, a in zip(INPUT_NAMES, problem.inputs)}
    with interop.native(**tensors) as call:
        for name, tensor in tensors.items():
            assert call.arrays[name].ctypes.data == tensor.data_ptr(), name


def test_torch_result_is_not_copied():
    result = np.arange(6.0).reshape(2, 3)
    with interop.native(x=torch.zeros(1)) as call:
        back = call.back(result)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == result.ctypes.data


def test_torch_non_contiguous_inputs(problem):
    # Every input (and grad_out) as a non-contiguous view holding the same values.
    def strided(a):
        big = torch.zeros((2 * a.shape[0], *a.shape[1:]), dtype=torch.float64)
        big[::2] = torch.from_numpy(a)
        return big[::2]

    def transposed(a):
        if a.ndim == 1:
            return strided(a)
        return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, -1, -2))).transpose(-1, -2)

    for make in (strided, transposed):
        assert not make(problem.x).is_contiguous() and not make(problem.bias).is_contiguous()
        results = _run_all(make, problem)
        _check_all(results, _expected(problem), lambda t: t.numpy(), "float64",
                   lambda r: isinstance(r, torch.Tensor))


def test_torch_inputs_that_require_grad_give_plain_results(problem):
    tensors = [None if a is None else torch.from_numpy(a).requires_grad_() for a in problem.inputs]
    out = deformcp.deform_conv2d(*tensors, **problem.spec.kwargs)
    assert isinstance(out, torch.Tensor) and not out.requires_grad and out.grad_fn is None
    assert_within_tolerance(out.numpy(), _expected(problem)["forward"], "float64")
    grads = deformcp.deform_conv2d_backward(torch.from_numpy(problem.grad_out), *tensors, **problem.spec.kwargs)
    assert all(not g.requires_grad for g in grads)
    assert all(t.grad is None for t in tensors)


def test_torch_bfloat16_round_trip(problem):
    rounded = problem.astype(ml_dtypes.bfloat16)
    tensors = {n: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for n, a in zip(INPUT_NAMES, rounded.inputs)}
    with interop.native(**tensors) as call:
        for name, tensor in tensors.items():
            view = call.arrays[name]
            assert view.dtype == ml_dtypes.bfloat16, name
            assert view.ctypes.data == tensor.data_ptr(), f"{name} was copied"

    def check(r):
        return isinstance(r, torch.Tensor) and r.dtype == torch.bfloat16

    results = _run_all(lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16), rounded)
    _check_all(results, _expected(rounded.astype(np.float64)), _torch_numpy, "bfloat16", check)


def test_torch_float16(problem):
    rounded = problem.astype(np.float16)
    out = deformcp.deform_conv2d(*(torch.from_numpy(a) for a in rounded.inputs), **problem.spec.kwargs)
    assert out.dtype == torch.float16
    assert_within_tolerance(out.numpy(), _expected(rounded.astype(np.float64))["forward"], "float16")


def test_gradients_of_absent_inputs_are_none(problem):
    p = problem
    grads = deformcp.deform_conv2d_backward(torch.from_numpy(p.grad_out), torch.from_numpy(p.x),
                                            torch.from_numpy(p.offset), None, torch.from_numpy(p.weight), None,
                                            **p.spec.kwargs)
    assert grads.grad_mask is None and grads.grad_bias is None
    assert isinstance(grads.grad_x, torch.Tensor)


# ----------------------------------------------------------------------------------------- JAX


def test_jax_round_trip(problem):
    p32 = problem.astype(np.float32)
    device = jax.devices("cpu")[0]

    def check(r):
        return isinstance(r, jax.Array) and r.dtype == jnp.float32 and r.devices() == {device}

    _check_all(_run_all(lambda a: jax.device_put(a, device), p32), _expected(problem), np.asarray, "float32",
               check)


def test_jax_inputs_are_not_copied(problem):
    arrays = {n: jnp.asarray(a.astype(np.float32)) for n, a in zip(INPUT_NAMES, problem.inputs)}
    with interop.native(**arrays) as call:
        for name, array in arrays.items():
            assert call.arrays[name].ctypes.data == array.unsafe_buffer_pointer(), name


def test_jax_bfloat16_round_trip(problem):
    def check(r):
        return isinstance(r, jax.Array) and r.dtype == jnp.bfloat16

    rounded = problem.astype(ml_dtypes.bfloat16)
    results = _run_all(jnp.asarray, rounded)
    _check_all(results, _expected(rounded.astype(np.float64)), np.asarray, "bfloat16", check)


def test_jax_non_contiguous_numpy_mix(problem):
    # A JAX x with non-contiguous NumPy views for the rest: the result follows x.
    p32 = problem.astype(np.float32)
    rest = [None if a is None else np.asfortranarray(a) for a in p32.inputs[1:]]
    out = deformcp.deform_conv2d(jnp.asarray(p32.x), *rest, **p32.spec.kwargs)
    assert isinstance(out, jax.Array)
    assert_within_tolerance(np.asarray(out), _expected(problem)["forward"], "float32")


def test_jax_tracer_is_refused_with_a_pointer_to_the_adapter(problem):
    p32 = problem.astype(np.float32)
    with pytest.raises(TypeError, match=r"x is a traced JAX value.*deformcp\.jax"):
        jax.jit(lambda x: deformcp.deform_conv2d(x, *p32.inputs[1:], **p32.spec.kwargs))(p32.x)


# ------------------------------------------------------------------------- mixing and other producers


def test_result_type_follows_x(problem):
    p = problem
    out = deformcp.deform_conv2d(torch.from_numpy(p.x), *p.inputs[1:], **p.spec.kwargs)
    assert isinstance(out, torch.Tensor)
    out = deformcp.deform_conv2d(p.x, *(torch.from_numpy(a) for a in p.inputs[1:]), **p.spec.kwargs)
    assert isinstance(out, np.ndarray)
    assert_within_tolerance(out, _expected(problem)["forward"], "float64")


class _FakeDeviceArray:
    """An array that says it lives on a CUDA device; it must be refused before anything reads it."""

    shape, dtype = (2, 4, 5, 6), np.dtype(np.float64)

    def __dlpack_device__(self):
        return (interop.DL_CUDA, 1)

    def __dlpack__(self, **kwargs):  # pragma: no cover - reaching this is the failure
        raise AssertionError("read before the device check")


def test_arrays_on_different_devices_are_refused(problem):
    p = problem
    with pytest.raises(TypeError, match=r"one device.*x on cpu.*offset on cuda:1"):
        deformcp.deform_conv2d(torch.from_numpy(p.x), _FakeDeviceArray(), *p.inputs[2:], **p.spec.kwargs)


def test_unsupported_device_is_refused(problem):
    class Metal(_FakeDeviceArray):
        def __dlpack_device__(self):
            return (8, 0)

    with pytest.raises(TypeError, match=r"weight lives on a metal:0 device"):
        deformcp.deform_conv2d(*problem.inputs[:3], Metal(), **problem.spec.kwargs)


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_non_arrays_are_refused_by_name(problem, name):
    args = dict(zip(INPUT_NAMES, problem.inputs))
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"^{name} must be an array.*got builtins\.list"):
        deformcp.deform_conv2d(**args, **problem.spec.kwargs)


class _Producer:
    """A minimal DLPack producer from some other library, optionally with an array namespace."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class _Namespace:
    @staticmethod
    def from_dlpack(array):
        return _NamespacedProducer(np.from_dlpack(array))


class _NamespacedProducer(_Producer):
    def __array_namespace__(self, api_version=None):
        return _Namespace


def test_other_dlpack_producers(problem):
    p = problem
    expected = _expected(problem)["forward"]
    out = deformcp.deform_conv2d(*(None if a is None else _Producer(a) for a in p.inputs), **p.spec.kwargs)
    assert isinstance(out, np.ndarray)  # no array namespace to go back through
    assert_within_tolerance(out, expected, "float64")
    out = deformcp.deform_conv2d(*(None if a is None else _NamespacedProducer(a) for a in p.inputs),
                                 **p.spec.kwargs)
    assert isinstance(out, _NamespacedProducer)
    assert_within_tolerance(out._array, expected, "float64")


def test_type_errors_come_before_dtype_and_shape_errors(problem):
    # A bad argument is named even when another argument has the wrong dtype or shape.
    p = problem
    with pytest.raises(TypeError, match="^bias must be an array"):
        deformcp.deform_conv2d(p.x.astype(np.float32), p.offset[:, :3], p.mask, p.weight, "bias")


# ----------------------------------------------------------------------------------------- GPU


def _cuda_reason():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
        return "CuPy sees no CUDA device"
    except Exception as exc:  # ImportError, or no driver
        return f"CuPy with a CUDA device is needed ({type(exc).__name__}: {exc})"


CUDA_REASON = _cuda_reason()
TORCH_CUDA_REASON = CUDA_REASON or (None if torch.cuda.is_available() else "PyTorch sees no CUDA device")
JAX_CUDA_REASON = CUDA_REASON or (None if jax.default_backend() == "gpu" else "JAX has no GPU backend")


@pytest.mark.gpu
@pytest.mark.skipif(TORCH_CUDA_REASON is not None, reason=str(TORCH_CUDA_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cuda_round_trip_on_a_side_stream(problem, dtype, monkeypatch):
    import cupy

    from deformcp.backends import cupy_backend

    seen = []
    original = cupy_backend.forward
    monkeypatch.setattr(cupy_backend, "forward",
                        lambda *a, **k: (seen.append(cupy.cuda.get_current_stream().ptr), original(*a, **k))[1])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # Produced on the side stream, consumed with no synchronisation: the order must come from the protocol.
        tensors = [None if a is None else torch.from_numpy(a).to("cuda", dtype) * 1 for a in problem.inputs]
        out = deformcp.deform_conv2d(*tensors, **problem.spec.kwargs)
        result = out.double().cpu()
    assert seen == [side.cuda_stream]
    assert isinstance(out, torch.Tensor) and out.device == tensors[0].device and out.dtype == dtype
    rounded = [None if t is None else t.double().cpu().numpy() for t in tensors]
    expected = testing.loop_deform_conv2d(*rounded, **problem.spec.kwargs)
    assert_within_tolerance(result.numpy(), expected, "float32" if dtype == torch.float32 else "bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(TORCH_CUDA_REASON is not None, reason=str(TORCH_CUDA_REASON))
def test_torch_cuda_inputs_are_not_copied(problem):
    tensors = {n: torch.from_numpy(a).float().cuda() for n, a in zip(INPUT_NAMES, problem.inputs)}
    with interop.native(**tensors) as call:
        for name, tensor in tensors.items():
            assert call.arrays[name].data.ptr == tensor.data_ptr(), name


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
def test_cupy_round_trip(problem):
    import cupy

    results = _run_all(lambda a: cupy.asarray(a), problem)
    _check_all(results, _expected(problem), cupy.asnumpy, "float64", lambda r: isinstance(r, cupy.ndarray))


@pytest.mark.gpu
@pytest.mark.skipif(JAX_CUDA_REASON is not None, reason=str(JAX_CUDA_REASON))
def test_jax_cuda_round_trip(problem):
    device = jax.devices("gpu")[0]

    def check(r):
        return isinstance(r, jax.Array) and r.devices() == {device}

    p32 = problem.astype(np.float32)
    _check_all(_run_all(lambda a: jax.device_put(a, device), p32), _expected(problem), np.asarray, "float32", check)


@pytest.mark.gpu
@pytest.mark.skipif(TORCH_CUDA_REASON is not None, reason=str(TORCH_CUDA_REASON))
def test_cpu_and_cuda_arrays_are_refused(problem):
    p = problem
    with pytest.raises(TypeError, match=r"one device.*x on cpu.*offset on cuda:0"):
        deformcp.deform_conv2d(torch.from_numpy(p.x), torch.from_numpy(p.offset).cuda(), *p.inputs[2:],
                               **p.spec.kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(TORCH_CUDA_REASON is not None, reason=str(TORCH_CUDA_REASON))
def test_torch_cuda_memory_comes_from_torchs_caching_allocator(problem):
    import gc

    import cupy

    pool = cupy.get_default_memory_pool()
    tensors = [None if a is None else torch.from_numpy(a).float().cuda() for a in problem.inputs]
    torch.cuda.synchronize()
    held_by_cupy, allocated = pool.used_bytes(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = deformcp.deform_conv2d(*tensors, **problem.spec.kwargs)
    torch.cuda.synchronize()
    assert pool.used_bytes() == held_by_cupy, "CuPy's own pool served the call"
    assert torch.cuda.memory_allocated() - allocated >= out.numel() * out.element_size()
    assert torch.cuda.max_memory_allocated() > torch.cuda.memory_allocated(), "the scratch space was not torch's"
    del out
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated, "the output's memory did not go back to PyTorch"
