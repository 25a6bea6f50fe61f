"""The CuPy backend on a real CUDA device.

Skipped, with the reason, where CuPy is not installed or sees no device (CI has none;
``tests/test_kernels_emulated.py`` checks the same kernels there on the CPU).  The tests
are collected everywhere (CuPy is imported only where it can be), so that a machine
without a GPU still sees the suite: ``benchmarks/device_check.py`` counts it there.  Run
with ``python -m pytest -m gpu tests/test_gpu.py``; see ``docs/cuda.md``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import deformcp
from deformcp.api import INPUT_NAMES
from deformcp.backends import cuda_kernels
import backend_check
from problems import TOLERANCE, Spec, make_problem, relative_error, specs


def _cupy_or_reason():
    """CuPy with a CUDA device, or ``None`` and why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy that cannot load its CUDA libraries
        return None, (f"CuPy cannot be imported ({type(exc).__name__}: {exc}); the GPU tests need cupy-cuda12x "
                      "or cupy-cuda13x")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver
        return None, f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    return (cupy, None) if devices > 0 else (None, "CuPy sees no CUDA device")


cupy, GPU_REASON = _cupy_or_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))]
if cupy is not None:
    from deformcp.backends import cupy_backend  # imports CuPy

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _outputs(problem, wrt=backend_check.ALL, **backward_options) -> dict:
    return backend_check.backend_outputs(cupy_backend, problem, cupy.asarray, cupy.asnumpy, wrt, **backward_options)


class _LaunchSpy:
    """Wraps ``cupy_backend.get_kernel`` to record each launch's instance and stream."""

    def __init__(self, monkeypatch):
        self.launches = []
        real = cupy_backend.get_kernel

        def get_kernel(device_id, stage, dtype_name, index_bits, vector=1):
            kernel = real(device_id, stage, dtype_name, index_bits, vector)

            def launch(*args, **kwargs):
                self.launches.append((stage, dtype_name, index_bits, cupy.cuda.get_current_stream().ptr))
                return kernel(*args, **kwargs)

            return launch

        monkeypatch.setattr(cupy_backend, "get_kernel", get_kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(), seed=st.integers(0, 2**32 - 1))
def test_matches_numpy_backend(dtype, spec, seed):
    problem = make_problem(spec, np.random.default_rng(seed), dtype)
    actual = _outputs(problem)
    assert set(actual) == backend_check.expected_keys(problem)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_public_api_with_cupy_arrays(dtype):
    spec = Spec(batch=2, in_channels=4, height=7, width=6, out_channels=6, kernel=(3, 2), groups=2, offset_groups=2,
                stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    problem = make_problem(spec, np.random.default_rng(1), dtype)
    on_device = [None if a is None else cupy.asarray(a) for a in problem.inputs]
    out = deformcp.deform_conv2d(*on_device, **spec.kwargs)
    grads = deformcp.deform_conv2d_backward(cupy.asarray(problem.grad_out), *on_device, **spec.kwargs)
    columns = deformcp.deform_im2col(*on_device[:3], spec.kernel, **spec.kwargs)
    assert isinstance(out, cupy.ndarray) and all(isinstance(g, cupy.ndarray) for g in grads)
    actual = {"forward": out, "im2col": columns,
              **{f"grad_{name}": g for name, g in zip(INPUT_NAMES, grads)}}
    backend_check.assert_outputs_close({k: cupy.asnumpy(v) for k, v in actual.items()}, backend_check.numpy_twin_outputs(problem), dtype)


@pytest.fixture(scope="module")
def torchvision_cuda():
    """``(torch, torchvision)`` with a CUDA device, or a skip saying what is missing."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch, torchvision


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)], ids=lambda d: d.name)
@settings(max_examples=15, deadline=None)
@given(spec=specs(allow_empty_batch=False), seed=st.integers(0, 2**32 - 1))
def test_matches_torchvision(torchvision_cuda, dtype, spec, seed):
    torch, torchvision = torchvision_cuda
    pad = spec.padding
    assume(pad[0] == pad[2] and pad[1] == pad[3])  # torchvision pads symmetrically
    problem = make_problem(spec, np.random.default_rng(seed), dtype)
    names = ("x", "offset", "mask", "weight", "bias")
    tensors = {n: None if a is None else torch.tensor(a, device="cuda", requires_grad=True)
               for n, a in zip(names, problem.inputs)}
    y = torchvision.ops.deform_conv2d(tensors["x"], tensors["offset"], tensors["weight"], tensors["bias"],
                                      stride=spec.stride, padding=pad[:2], dilation=spec.dilation,
                                      mask=tensors["mask"])
    y.backward(torch.tensor(problem.grad_out, device="cuda"))
    expected = {"forward": y.detach().cpu().numpy()}
    expected.update({f"grad_{n}": t.grad.cpu().numpy() for n, t in tensors.items() if t is not None})
    actual = _outputs(problem)
    actual.pop("im2col")
    backend_check.assert_outputs_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_64_bit_index_instances(dtype, monkeypatch):
    spec = Spec(batch=3, in_channels=4, height=9, width=8, out_channels=4, kernel=(3, 3), groups=2, offset_groups=2,
                padding=(1, 2, 0, 1))
    problem = make_problem(spec, np.random.default_rng(2), dtype)
    narrow = _outputs(problem)
    spy = _LaunchSpy(monkeypatch)
    monkeypatch.setattr(cupy_backend, "_MIN_INDEX_BITS", 64)
    wide = _outputs(problem)
    assert spy.launches and {bits for _, _, bits, _ in spy.launches} == {64}
    backend_check.assert_outputs_close(wide, backend_check.numpy_twin_outputs(problem), dtype)
    for name in narrow:  # the same arithmetic, only wider indices; atomics may reorder grad_x
        tolerance = 0 if name != "grad_x" else TOLERANCE[dtype.name]
        assert relative_error(wide[name], narrow[name]) <= tolerance, name


def test_runs_on_the_current_stream(monkeypatch):
    problem = make_problem(Spec(batch=4, offset_groups=2), np.random.default_rng(3), np.float32)
    spy = _LaunchSpy(monkeypatch)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        actual = _outputs(problem)  # cupy.asnumpy copies on the current stream, in order
    stream.synchronize()
    assert spy.launches, "no kernel was launched"
    assert {ptr for *_, ptr in spy.launches} == {stream.ptr}
    assert stream.ptr != cupy.cuda.Stream.null.ptr
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), np.float32)


def test_second_call_does_not_recompile():
    problem = make_problem(Spec(), np.random.default_rng(4), np.float64)
    _outputs(problem)
    first = cuda_kernels.get_kernel.cache_info()
    _outputs(problem)
    second = cuda_kernels.get_kernel.cache_info()
    assert second.misses == first.misses
    assert second.hits >= first.hits + 3


def _big_image(height: int, width: int, rng_seed: int):
    """A float16 image of height*width > 2^31 elements, filled in row bands (no 8 GiB float32 temporary)."""
    x = cupy.empty((1, 1, height, width), dtype=cupy.float16)
    rng = cupy.random.default_rng(rng_seed)
    band = 4096
    for r in range(0, height, band):
        rows = min(band, height - r)
        x[0, 0, r:r + rows] = rng.standard_normal((rows, width), dtype=cupy.float32).astype(cupy.float16)
    return x


def test_past_2_to_the_31_elements(monkeypatch):
    """An input of more than 2^31 - 1 elements (4 GiB of float16) takes the 64-bit instances.

    A 1x1 kernel with stride 4096 samples 12 x 12 places spread over the whole image; the
    reference is the NumPy backend on a small image holding the 4x4 neighbourhood of each.
    """
    height = width = 46341  # 46341^2 > 2^31 - 1
    stride = 4096
    free, _ = cupy.cuda.Device().mem_info
    if free < 20 * 2**30:
        pytest.skip(f"needs 20 GiB of free device memory (x, a float32 grad_x, its float16 copy); {free / 2**30:.1f} free")
    out_size = (height - 1) // stride + 1
    rng = np.random.default_rng(5)
    # Offsets in (-1, 1) on a 1/256 grid: positions oy*4096 + dy are then exact in float32.
    offset = np.round(rng.uniform(-0.99, 0.99, (1, 2, out_size, out_size)) * 256) / 256
    mask = rng.uniform(0.1, 1.0, (1, 1, out_size, out_size))
    weight = rng.standard_normal((1, 1, 1, 1))
    bias = rng.standard_normal(1)
    grad_out = rng.standard_normal((1, 1, out_size, out_size))
    x = _big_image(height, width, 6)
    assert x.size > 2**31 - 1
    half = lambda a: cupy.asarray(a.astype(np.float16))  # noqa: E731

    spy = _LaunchSpy(monkeypatch)
    kwargs = dict(stride=stride, padding=0, dilation=1)
    inputs = (x, half(offset), half(mask), half(weight), half(bias))
    out = deformcp.deform_conv2d(*inputs, **kwargs)
    grads = deformcp.deform_conv2d_backward(half(grad_out), *inputs, **kwargs)
    assert {bits for _, _, bits, _ in spy.launches} == {64}

    # Sample (oy, ox) reads big rows oy*4096 - 1 .. oy*4096 + 2 (row -1 is outside and reads 0);
    # the small image puts them at rows oy*4 .. oy*4 + 3, and the position one row further.
    small = np.zeros((1, 1, 4 * out_size, 4 * out_size))
    for oy in range(out_size):
        for ox in range(out_size):
            r, c = oy * stride - 1, ox * stride - 1
            patch = cupy.asnumpy(x[0, 0, max(r, 0):r + 4, max(c, 0):c + 4]).astype(np.float64)
            small[0, 0, 4 * oy + (r < 0):4 * oy + 4, 4 * ox + (c < 0):4 * ox + 4] = patch
    wide = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    small_inputs = (small, wide(offset) + 1, wide(mask), wide(weight), wide(bias))
    small_kwargs = dict(stride=4, padding=0, dilation=1)
    expected = deformcp.deform_conv2d(*small_inputs, **small_kwargs)
    expected_grads = deformcp.deform_conv2d_backward(wide(grad_out), *small_inputs, **small_kwargs)
    tolerance = TOLERANCE["float16"]
    assert relative_error(cupy.asnumpy(out), expected) <= tolerance
    for name in ("grad_offset", "grad_mask", "grad_weight", "grad_bias"):
        error = relative_error(cupy.asnumpy(getattr(grads, name)), getattr(expected_grads, name))
        assert error <= tolerance, name
    # grad_x: compare every neighbourhood, and check nothing landed anywhere else.
    grad_x = grads.grad_x
    assert grad_x.shape == x.shape and grad_x.dtype == cupy.float16
    got, want = [], []
    for oy in range(out_size):
        for ox in range(out_size):
            r, c = oy * stride - 1, ox * stride - 1
            got.append(cupy.asnumpy(grad_x[0, 0, max(r, 0):r + 4, max(c, 0):c + 4]).ravel())
            want.append(expected_grads.grad_x[0, 0, 4 * oy + (r < 0):4 * oy + 4, 4 * ox + (c < 0):4 * ox + 4].ravel())
    got, want = np.concatenate(got), np.concatenate(want)
    assert relative_error(got, want) <= tolerance
    assert int(cupy.count_nonzero(grad_x)) == int(np.count_nonzero(got))


# --- the speed design (issue 11): tensor cores, TF32, the deterministic grad_x, memory --------

# 64 channels a group (8 vectors of the half types: 8 lanes a sample), two groups of each kind.
WIDE = Spec(batch=2, in_channels=128, height=12, width=10, out_channels=32, kernel=(3, 3), groups=2, offset_groups=2,
            padding=(1, 1, 1, 1))


class _ProductSpy:
    """Wraps the cuBLAS binding that ``cublas_products`` calls, recording types and stream of each product."""

    def __init__(self, monkeypatch):
        from deformcp.backends import cublas_products

        self.calls = []
        real = cublas_products.cublas.gemmStridedBatchedEx

        def gemm(*args):
            # (handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
            #  beta, C, Ctype, ldc, strideC, batchCount, computeType, algo)
            self.calls.append({"a": args[8], "b": args[12], "c": args[17], "compute": args[21],
                               "stream": cupy.cuda.get_current_stream().ptr})
            return real(*args)

        monkeypatch.setattr(cublas_products.cublas, "gemmStridedBatchedEx", gemm)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_products_take_the_operands_type_and_float32_compute(dtype, monkeypatch):
    from cupy_backends.cuda.libs import cublas

    problem = make_problem(WIDE, np.random.default_rng(31), dtype)
    spy = _ProductSpy(monkeypatch)
    launches = _LaunchSpy(monkeypatch)
    actual = _outputs(problem)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)
    data_type = {"float16": cupy.cuda.runtime.CUDA_R_16F, "bfloat16": cupy.cuda.runtime.CUDA_R_16BF,
                 "float32": cupy.cuda.runtime.CUDA_R_32F, "float64": cupy.cuda.runtime.CUDA_R_64F}[dtype.name]
    compute = cublas.CUBLAS_COMPUTE_64F if dtype.name == "float64" else cublas.CUBLAS_COMPUTE_32F
    assert spy.calls
    for call in spy.calls:
        assert (call["a"], call["b"], call["compute"]) == (data_type, data_type, compute), call
    assert {stage for stage, *_ in launches.launches} == {"sample", "sample_backward"}


def test_tf32_only_on_request(monkeypatch):
    from cupy_backends.cuda.libs import cublas

    problem = make_problem(WIDE, np.random.default_rng(32), np.float32)
    expected = backend_check.numpy_twin_outputs(problem)["forward"]
    geom, cdt = WIDE.geometry, np.dtype(np.float32)
    arrays = [cupy.asarray(a) for a in problem.inputs]
    spy = _ProductSpy(monkeypatch)
    strict = cupy.asnumpy(cupy_backend.forward(geom, cdt, *arrays))
    fast = cupy.asnumpy(cupy_backend.forward(geom, cdt, *arrays, allow_tf32=True))
    assert [c["compute"] for c in spy.calls] == [cublas.CUBLAS_COMPUTE_32F] * 2 + [cublas.CUBLAS_COMPUTE_32F_FAST_TF32] * 2
    assert relative_error(strict, expected) <= TOLERANCE["float32"]
    error = relative_error(fast, expected)
    assert error <= 3e-3
    if int(cupy.cuda.Device().compute_capability) >= 80:  # TF32 tensor cores exist from Ampere on
        assert error > 1e-6, f"TF32 was asked for, yet the error {error:.3g} is float32's"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_deterministic_grad_x_is_bitwise_identical(dtype):
    problem = make_problem(WIDE, np.random.default_rng(33), dtype)
    runs = [_outputs(problem, frozenset({"x"}), deterministic=True)["grad_x"] for _ in range(2)]
    with deformcp.workspace_limit(200_000):  # bands of rows: other tiles, other launches
        runs.append(_outputs(problem, frozenset({"x"}), deterministic=True)["grad_x"])
    for run in runs[1:]:
        np.testing.assert_array_equal(run.view(np.uint8), runs[0].view(np.uint8))
    backend_check.assert_outputs_close({"grad_x": runs[0]},
                                       {"grad_x": backend_check.numpy_twin_outputs(problem)["grad_x"]}, dtype)
    atomic = _outputs(problem, frozenset({"x"}))["grad_x"]
    assert relative_error(atomic, runs[0]) <= TOLERANCE[dtype.name]


def test_products_run_on_the_current_stream(monkeypatch):
    problem = make_problem(WIDE, np.random.default_rng(34), np.float16)
    spy = _ProductSpy(monkeypatch)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        _outputs(problem)
    stream.synchronize()
    assert spy.calls and {c["stream"] for c in spy.calls} == {stream.ptr}


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_peak_memory_no_higher_than_torchvision(torchvision_cuda, dtype_name):
    """Forward and backward of one layer, all five gradients: deformcp allocates through PyTorch's
    allocator for PyTorch tensors, so one peak counter measures both."""
    torch, torchvision = torchvision_cuda
    spec = Spec(batch=4, in_channels=64, height=32, width=32, out_channels=64, kernel=(3, 3), offset_groups=1,
                padding=(1, 1, 1, 1))
    problem = make_problem(spec, np.random.default_rng(35), np.float32)
    dtype = getattr(torch, dtype_name)
    tensors = [None if a is None else torch.tensor(a, device="cuda", dtype=dtype) for a in problem.inputs]
    grad_out = torch.tensor(problem.grad_out, device="cuda", dtype=dtype)
    x, offset, mask, weight, bias = tensors

    def peak(run) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def theirs():
        leaves = [t.detach().requires_grad_() for t in tensors]
        y = torchvision.ops.deform_conv2d(leaves[0], leaves[1], leaves[3], leaves[4], padding=(1, 1), mask=leaves[2])
        y.backward(grad_out)

    def ours():
        deformcp.deform_conv2d(x, offset, mask, weight, bias, padding=1)
        deformcp.deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, padding=1)

    theirs_bytes, ours_bytes = peak(theirs), peak(ours)
    assert ours_bytes <= theirs_bytes, f"deformcp peaks at {ours_bytes} bytes, torchvision at {theirs_bytes}"
