"""What the CUDA backend's design promises, checked in the CPU emulation (no GPU needed).

* The deterministic ``grad_x`` (a gather in sample order) is bitwise identical across
  shuffled schedules, tile sizes and launch sizes; the atomic one is not, which shows the
  shuffling has teeth.
* Channel vectors and lanes: wide channel counts take the 16-byte instances and several
  threads per sample, against the NumPy twin in every dtype, atomic and deterministic.
* Few passes: the kernel launches and cuBLAS calls of a forward and a backward are counted.
* The products' types: half operands with float32 compute, TF32 only on request.
* The emulator itself: a divergent ``__syncthreads()`` is reported, and a kernel that reads
  shared memory another thread writes without a barrier gives schedule-dependent results.
* The GPU's workspace limit follows the device's memory unless a limit was set.
"""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend_check
from deformcp import workspace
from deformcp.workspace import workspace_limit
from emulation import build, fake_cublas, fake_cupy
from problems import Spec, assert_within_tolerance, make_problem, relative_error, specs

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
# 16 channels in 2 offset groups and 2 convolution groups: 8 channels a group, one 16-byte
# vector of a half type, two of float32 (two lanes), four of float64 (four lanes).
WIDE = Spec(batch=2, in_channels=16, height=6, width=5, out_channels=4, kernel=(3, 2), groups=2, offset_groups=2,
            padding=(1, 0, 1, 1))


@pytest.fixture
def schedule(monkeypatch):
    """Set the emulation's schedule seed for one test."""
    return lambda seed: monkeypatch.setattr(fake_cupy, "SCHEDULE_SEED", seed)


def _outputs(cuda_emulated, problem, wrt=backend_check.ALL, **options) -> dict:
    return backend_check.backend_outputs(cuda_emulated, problem, fake_cupy.asarray, np.asarray, wrt, **options)


def _grad_x(cuda_emulated, problem, **options) -> np.ndarray:
    return _outputs(cuda_emulated, problem, frozenset({"x"}), **options)["grad_x"]


# --- the deterministic grad_x --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_deterministic_grad_x_is_bitwise_stable(cuda_emulated, dtype, schedule, monkeypatch):
    problem = make_problem(WIDE, np.random.default_rng(21), dtype, offset_spread=1.0)
    expected = backend_check.numpy_twin_outputs(problem)["grad_x"]
    results = []
    for seed, limit, blocks_per_multiprocessor in [(1, None, 8), (2, None, 8), (3, 5000, 8), (4, 1500, 8),
                                                   (0, None, 1), (5, 1500, 1)]:
        schedule(seed)
        monkeypatch.setattr(cuda_emulated, "_BLOCKS_PER_MULTIPROCESSOR", blocks_per_multiprocessor)
        fake_cupy.launches.clear()
        with workspace_limit(limit or workspace.get_workspace_limit()):
            results.append(_grad_x(cuda_emulated, problem, deterministic=True))
        gathers = [launch for launch in fake_cupy.launches if "deform_gather_kernel" in launch.name]
        assert gathers, "the deterministic path must gather"
        if limit == 1500:
            assert len(gathers) > 2, "a small limit should cut the batch into bands of rows"
    for result in results:
        np.testing.assert_array_equal(result.view(np.uint8), results[0].view(np.uint8))
    assert_within_tolerance(results[0], expected, dtype, "grad_x")


def test_atomic_grad_x_depends_on_the_schedule(cuda_emulated, schedule):
    """The shuffled schedule changes the order of the atomic additions, so their rounding."""
    problem = make_problem(WIDE, np.random.default_rng(22), np.float32, offset_spread=1.0)
    results = set()
    for seed in range(1, 7):
        schedule(seed)
        results.add(_grad_x(cuda_emulated, problem).tobytes())
    assert len(results) > 1


# --- vectors and lanes, against the twin ----------------------------------------------


@st.composite
def wide_specs(draw) -> Spec:
    """The hypothesis geometry space with channel counts that take vectors and several lanes."""
    spec = draw(specs(max_batch=2, max_size=6))
    per_group = draw(st.sampled_from([8, 16, 24]))
    in_channels = per_group * spec.groups * spec.offset_groups
    return Spec(**{**spec.__dict__, "in_channels": in_channels})


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=wide_specs(), seed=st.integers(0, 2**32 - 1))
def test_wide_channels_match_numpy_backend(cuda_emulated, dtype, deterministic, spec, seed):
    problem = make_problem(spec, np.random.default_rng(seed), dtype)
    fake_cupy.launches.clear()
    actual = _outputs(cuda_emulated, problem, deterministic=deterministic)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)
    if spec.batch:
        widest = 16 // dtype.itemsize
        vectors = {int(launch.name.rstrip(">").rsplit(",", 1)[1]) for launch in fake_cupy.launches
                   if "sample" in launch.name}
        assert vectors == {widest}, f"{spec}: launched with vector widths {vectors}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(), seed=st.integers(0, 2**32 - 1))
def test_deterministic_matches_numpy_backend(cuda_emulated, dtype, spec, seed):
    """Every stage of the deterministic path (gather_keys, gather) over the geometry space.

    The atomic path's is test_kernels_emulated.test_kernels_match_numpy_backend.
    """
    problem = make_problem(spec, np.random.default_rng(seed), dtype)
    actual = _outputs(cuda_emulated, problem, deterministic=True)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype, channels", [(np.dtype(np.float64), 520), (np.dtype(np.float16), 2056)],
                         ids=["float64", "float16"])
def test_more_vectors_than_a_block_has_threads(cuda_emulated, dtype, channels, deterministic):
    """260 and 257 channel vectors a sample: 256 lanes (one sample a block), some taking two vectors."""
    spec = Spec(batch=1, in_channels=channels, height=3, width=3, out_channels=2, kernel=(2, 2), padding=(0, 0, 0, 0))
    problem = make_problem(spec, np.random.default_rng(29), dtype)
    actual = _outputs(cuda_emulated, problem, deterministic=deterministic)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)


def test_misaligned_channels_last_input_takes_scalar_loads(cuda_emulated):
    problem = make_problem(WIDE, np.random.default_rng(30), np.float32)
    storage = fake_cupy.zeros(problem.x.size + 1, np.float32)
    x_nhwc = storage[1:].reshape(*problem.x.transpose(0, 2, 3, 1).shape)  # 4 bytes past a 16-byte boundary
    x_nhwc[...] = problem.x.transpose(0, 2, 3, 1)
    fake_cupy.launches.clear()
    actual = backend_check.backend_outputs(cuda_emulated, problem,
                                           lambda a: x_nhwc.transpose(0, 3, 1, 2) if a is problem.x
                                           else fake_cupy.asarray(a), np.asarray)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), np.float32)
    assert {launch.name.rstrip(">").rsplit(", ", 1)[1] for launch in fake_cupy.launches} == {"1"}


def test_channels_last_input_is_read_in_place(cuda_emulated):
    problem = make_problem(WIDE, np.random.default_rng(23), np.float32)
    x_nhwc = fake_cupy.asarray(np.ascontiguousarray(problem.x.transpose(0, 2, 3, 1)))
    x = x_nhwc.transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory: a torch channels_last tensor
    assert not x.flags.c_contiguous
    view = cuda_emulated._channels_last(x)
    assert view.flags.c_contiguous and np.shares_memory(view, x_nhwc)
    copied = cuda_emulated._channels_last(fake_cupy.asarray(problem.x))
    assert not np.shares_memory(copied, problem.x)
    expected = backend_check.numpy_twin_outputs(problem)
    actual = backend_check.backend_outputs(cuda_emulated, problem, lambda a: x if a is problem.x else fake_cupy.asarray(a),
                                           np.asarray)
    backend_check.assert_outputs_close(actual, expected, np.float32)


# --- launches and products per call ----------------------------------------------------


def _counted(call) -> tuple:
    """``(kernel launches by stage, cuBLAS calls)`` of one call."""
    fake_cupy.launches.clear()
    fake_cublas.calls.clear()
    call()
    stages = [launch.name.split("<")[0].replace("deform_", "").replace("_kernel", "") for launch in fake_cupy.launches]
    return sorted(stages), list(fake_cublas.calls)


@pytest.mark.parametrize("batch, groups", [(3, 1), (3, 2), (1, 4)])
def test_launches_and_products_per_call(cuda_emulated, batch, groups):
    spec = Spec(batch=batch, in_channels=8, height=6, width=5, out_channels=4, groups=groups, offset_groups=2)
    problem = make_problem(spec, np.random.default_rng(24), np.float32)
    geom, cdt = spec.geometry, np.dtype(np.float32)
    x, offset, mask, weight, bias = (fake_cupy.asarray(a) for a in problem.inputs)
    grad_out = fake_cupy.asarray(problem.grad_out)
    everything = frozenset({"x", "offset", "mask", "weight", "bias"})
    # A product per group batched over the images, or per image batched over the groups: whichever is fewer.
    calls, per_call = min(batch, groups), max(batch, groups)

    stages, products = _counted(lambda: cuda_emulated.forward(geom, cdt, x, offset, mask, weight, bias))
    assert stages == ["sample"]  # bias and the NCHW layout come with the product
    assert [(p.batch, p.beta, p.ldc) for p in products] == [(per_call, 0.0, geom.out_pixels)] * calls

    stages, products = _counted(lambda: cuda_emulated.backward(geom, cdt, grad_out, x, offset, mask, weight, everything))
    assert stages == ["sample", "sample_backward"]
    # The weight gradient (run first): one product per image over the groups, accumulating after the first.
    weight_products, column_products = products[:batch], products[batch:]
    assert [(p.batch, p.beta) for p in weight_products] == [(groups, 0.0)] + [(groups, 1.0)] * (batch - 1)
    assert [(p.batch, p.beta) for p in column_products] == [(per_call, 0.0)] * calls

    stages, products = _counted(lambda: cuda_emulated.backward(geom, cdt, grad_out, x, offset, mask, weight, everything,
                                                     deterministic=True))
    assert stages == ["gather", "gather_keys", "sample", "sample_backward"]
    assert len(products) == batch + calls

    stages, products = _counted(lambda: cuda_emulated.backward(geom, cdt, grad_out, x, offset, mask, weight,
                                                     frozenset({"weight"})))
    assert stages == ["sample"] and len(products) == batch
    stages, products = _counted(lambda: cuda_emulated.backward(geom, cdt, grad_out, x, offset, mask, weight,
                                                     frozenset({"bias"})))
    assert stages == [] and products == []


# --- the products' types ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_product_has_the_operand_and_compute_types(cuda_emulated, dtype):
    problem = make_problem(WIDE, np.random.default_rng(25), dtype)
    fake_cublas.calls.clear()
    _outputs(cuda_emulated, problem)
    assert fake_cublas.calls
    for call in fake_cublas.calls:
        assert (call.a_type, call.b_type) == (dtype.name, dtype.name), call
        if dtype in HALF:  # tensor cores: half operands, float32 accumulation
            assert call.compute == "32F" and call.c_type in (dtype.name, "float32"), call
        else:
            assert call.compute == {"float32": "32F", "float64": "64F"}[dtype.name] and call.c_type == dtype.name


def test_tf32_only_on_request(cuda_emulated):
    problem = make_problem(WIDE, np.random.default_rng(26), np.float32)
    geom, cdt = WIDE.geometry, np.dtype(np.float32)
    arrays = [fake_cupy.asarray(a) for a in problem.inputs]
    expected = backend_check.numpy_twin_outputs(problem)
    fake_cublas.calls.clear()
    strict = np.asarray(cuda_emulated.forward(geom, cdt, *arrays))
    assert {call.compute for call in fake_cublas.calls} == {"32F"}
    fake_cublas.calls.clear()
    fast = np.asarray(cuda_emulated.forward(geom, cdt, *arrays, allow_tf32=True))
    grads = cuda_emulated.backward(geom, cdt, fake_cupy.asarray(problem.grad_out), *arrays[:4],
                         frozenset({"x", "weight"}), allow_tf32=True)
    assert {call.compute for call in fake_cublas.calls} == {"32F_FAST_TF32"}
    assert_within_tolerance(strict, expected["forward"], np.float32, "strict float32")
    error = relative_error(fast, expected["forward"])
    assert 1e-6 < error <= 3e-3, f"TF32's error should be about 2**-11, got {error:.3g}"
    for name in ("x", "weight"):
        assert relative_error(np.asarray(grads[name]), expected[f"grad_{name}"]) <= 3e-3, name


# --- the emulator has teeth ---------------------------------------------------------------

_PROBE = """
__global__ void divergent_kernel(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

using Slots = float[64];

__global__ void racy_kernel(float* out) {
    DCN_SHARED(Slots, slots);
    slots[threadIdx.x] = float(threadIdx.x);
    out[threadIdx.x] = slots[(threadIdx.x + 1) % 64];  // no barrier: the neighbour may not have written yet
}

__global__ void synced_kernel(float* out) {
    DCN_SHARED(Slots, slots);
    slots[threadIdx.x] = float(threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = slots[(threadIdx.x + 1) % 64];
}
"""


@pytest.fixture(scope="module")
def probe():
    if build.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): the kernel emulation cannot be built")
    return build.load(_PROBE, ("divergent_kernel", "racy_kernel", "synced_kernel"))


def _run_probe(probe, name: str, seed: int) -> np.ndarray:
    out = np.zeros(64, np.float32)
    pointer = ctypes.c_void_p(out.ctypes.data)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(pointer), ctypes.c_void_p))
    probe.launch(probe.find(name), (2, 1, 1), (64, 1, 1), args, seed)
    return out


def test_emulator_reports_a_divergent_barrier(probe):
    with pytest.raises(RuntimeError, match=r"63 threads .* wait at __syncthreads\(\) .* while 1 have returned"):
        _run_probe(probe, "divergent_kernel", 0)


def test_emulator_exposes_a_missing_barrier(probe):
    expected = (np.arange(64) + 1) % 64
    for seed in range(4):
        np.testing.assert_array_equal(_run_probe(probe, "synced_kernel", seed), expected)
    racy = [_run_probe(probe, "racy_kernel", seed) for seed in range(4)]
    # In the natural order every thread reads its neighbour's slot before it is written: poison.
    assert np.isnan(racy[0][:63]).all()
    assert any(not np.array_equal(r, racy[0], equal_nan=True) for r in racy[1:]), "shuffles change the outcome"


# --- the GPU's workspace limit ----------------------------------------------------------


def test_workspace_follows_the_device_unless_set(cuda_emulated, monkeypatch):
    gib = 2**30
    assert workspace.device_workspace_limit(16 * gib) == gib
    assert workspace.device_workspace_limit(2 * gib) == workspace.DEFAULT_WORKSPACE_BYTES
    assert workspace.device_workspace_limit(141 * gib) == workspace.MAX_DEVICE_WORKSPACE_BYTES
    seen = []
    real = cuda_emulated.plan_tiles
    monkeypatch.setattr(cuda_emulated, "plan_tiles", lambda *a, **k: (seen.append(k["limit"]), real(*a, **k))[1])
    problem = make_problem(Spec(), np.random.default_rng(27), np.float32)
    _outputs(cuda_emulated, problem)
    assert set(seen) == {workspace.device_workspace_limit(fake_cupy.DEVICE_MEMORY)} == {gib}
    seen.clear()
    with workspace_limit(123456):
        _outputs(cuda_emulated, problem)
        assert workspace.device_workspace_limit(fake_cupy.DEVICE_MEMORY) == 123456
    assert set(seen) == {123456}
    seen.clear()
    _outputs(cuda_emulated, problem)  # the setting is restored: the device's default again
    assert set(seen) == {gib}


def test_index_width_and_vector_are_chosen_per_call(cuda_emulated):
    x = fake_cupy.zeros((1, 5, 5, 16), np.float16)
    launch = cuda_emulated._Launch(WIDE.geometry, np.dtype(np.float32), x)
    assert (launch.vector, launch.lanes, launch.index_bits) == (8, 1, 32)
    odd = Spec(in_channels=6, offset_groups=2, groups=1)
    launch = cuda_emulated._Launch(odd.geometry, np.dtype(np.float32), fake_cupy.zeros((2, 6, 5, 6), np.float16))
    assert (launch.vector, launch.lanes) == (1, 4)  # 3 channels an offset group: scalar loads, 4 lanes
    misaligned = fake_cupy.zeros((2 * 6 * 5 * 16 + 1,), np.float32)[1:].reshape(2, 6, 5, 16)
    launch = cuda_emulated._Launch(WIDE.geometry, np.dtype(np.float32), misaligned)
    assert launch.vector == 1  # not on 16 bytes: no vector loads
    headroom = launch.max_blocks * cuda_emulated._THREADS_PER_BLOCK
    launch.choose_index_width(2**31 - 1 - headroom)
    assert launch.index_bits == 32
    launch.choose_index_width(2**31 - headroom)
    assert launch.index_bits == 64


# --- the public keywords ---------------------------------------------------------------


def test_public_keywords_reach_the_cuda_backend(cuda_emulated):
    import deformcp

    problem = make_problem(WIDE, np.random.default_rng(28), np.float32)
    inputs = [None if a is None else fake_cupy.CudaArray(a) for a in problem.inputs]
    grad_out = fake_cupy.CudaArray(problem.grad_out)
    fake_cupy.launches.clear()
    fake_cublas.calls.clear()
    deformcp.deform_conv2d(*inputs, **WIDE.kwargs, allow_tf32=True)
    deformcp.deform_conv2d_backward(grad_out, *inputs, **WIDE.kwargs, deterministic=True, allow_tf32=True)
    assert {call.compute for call in fake_cublas.calls} == {"32F_FAST_TF32"}
    assert any("deform_gather_kernel" in launch.name for launch in fake_cupy.launches)
    fake_cupy.launches.clear()
    fake_cublas.calls.clear()
    deformcp.deform_conv2d_backward(grad_out, *inputs, **WIDE.kwargs)
    assert {call.compute for call in fake_cublas.calls} == {"32F"}
    assert not any("gather" in launch.name for launch in fake_cupy.launches)


def test_public_keywords_on_the_cpu(rng):
    """The CPU backend is always deterministic and float32 there is float32: the keywords change nothing."""
    import deformcp

    problem = make_problem(WIDE, rng, np.float32)
    plain = deformcp.deform_conv2d_backward(problem.grad_out, *problem.inputs, **WIDE.kwargs)
    chosen = deformcp.deform_conv2d_backward(problem.grad_out, *problem.inputs, **WIDE.kwargs, deterministic=True,
                                             allow_tf32=True)
    for a, b in zip(plain, chosen):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(deformcp.deform_conv2d(*problem.inputs, **WIDE.kwargs, allow_tf32=True),
                                  deformcp.deform_conv2d(*problem.inputs, **WIDE.kwargs))
    with pytest.raises(TypeError, match=r"deterministic must be True, False or None, got str 'yes'"):
        deformcp.deform_conv2d_backward(problem.grad_out, *problem.inputs, **WIDE.kwargs, deterministic="yes")
    with pytest.raises(TypeError, match=r"allow_tf32 must be True or False, got int 1"):
        deformcp.deform_conv2d(*problem.inputs, **WIDE.kwargs, allow_tf32=1)
