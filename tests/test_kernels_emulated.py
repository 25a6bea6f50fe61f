"""The CUDA kernels, run on the CPU, against the NumPy backend (the oracle).

``kernels/*.cu`` are compiled by g++ against ``tests/emulation/cuda_emulation.h`` and
driven by the real CuPy backend (``deformcp.backends.cupy_backend``) through a NumPy
stand-in for CuPy (``tests/emulation/fake_cupy.py``), so the kernels and the backend's
tiling, layouts and argument lists are checked together, with no GPU.  Needs only a C++
compiler; skipped, with the reason, where there is none.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deformcp.backends import cuda_kernels
from deformcp.workspace import workspace_limit
import backend_check
import nonfinite_cases
from deformcp.api import INPUT_NAMES
from emulation import build, fake_cupy
from problems import TOLERANCE, Spec, make_problem, relative_error, specs

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _outputs(backend, problem, wrt=backend_check.ALL, **backward_options) -> dict:
    return backend_check.backend_outputs(backend, problem, fake_cupy.asarray, np.asarray, wrt, **backward_options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(), seed=st.integers(0, 2**32 - 1))
def test_kernels_match_numpy_backend(cuda_emulated, dtype, spec, seed):
    problem = make_problem(spec, np.random.default_rng(seed), dtype)
    actual = _outputs(cuda_emulated, problem)
    assert set(actual) == backend_check.expected_keys(problem)
    backend_check.assert_outputs_close(actual, backend_check.numpy_twin_outputs(problem), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_64_bit_index_instances(cuda_emulated, dtype, monkeypatch):
    spec = Spec(batch=2, in_channels=4, height=7, width=6, out_channels=6, kernel=(3, 2), groups=2, offset_groups=2,
                stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    problem = make_problem(spec, np.random.default_rng(7), dtype)
    narrow = _outputs(cuda_emulated, problem, deterministic=True)
    fake_cupy.launches.clear()
    monkeypatch.setattr(cuda_emulated, "_MIN_INDEX_BITS", 64)
    wide = _outputs(cuda_emulated, problem, deterministic=True)
    names = {launch.name for launch in fake_cupy.launches}
    assert len(names) == 4 and all(", long long" in name for name in names), names
    for name in narrow:
        np.testing.assert_array_equal(wide[name], narrow[name], err_msg=name)
    backend_check.assert_outputs_close(wide, backend_check.numpy_twin_outputs(problem), dtype)


def test_index_width_follows_element_counts(cuda_emulated):
    geom = Spec(batch=1).geometry
    launch = cuda_emulated._Launch(geom, np.dtype(np.float32), fake_cupy.zeros(geom.x_shape, np.float32))
    headroom = launch.max_blocks * cuda_emulated._THREADS_PER_BLOCK
    launch.choose_index_width(10, 2**31 - 1 - headroom)
    assert launch.index_bits == 32
    launch.choose_index_width(2**31 - headroom)
    assert launch.index_bits == 64


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16)], ids=lambda d: d.name)
def test_tiles_of_images_and_of_rows(cuda_emulated, dtype):
    spec = Spec(batch=3, in_channels=4, height=9, width=7, out_channels=4, kernel=(3, 3), offset_groups=2,
                padding=(1, 2, 0, 1))
    problem = make_problem(spec, np.random.default_rng(3), dtype)
    expected = backend_check.numpy_twin_outputs(problem)
    # One image per tile, then a few output rows per tile.
    for limit in (6000, 1500):
        fake_cupy.launches.clear()
        with workspace_limit(limit):
            actual = _outputs(cuda_emulated, problem)
        sample_launches = sum(1 for launch in fake_cupy.launches if "deform_sample_kernel" in launch.name)
        assert sample_launches > 3, f"limit {limit}: expected several tiles, got {sample_launches} sample launches"
        backend_check.assert_outputs_close(actual, expected, dtype)


def test_empty_batch_launches_nothing(cuda_emulated):
    problem = make_problem(Spec(batch=0), np.random.default_rng(1), np.float32)
    fake_cupy.launches.clear()
    actual = _outputs(cuda_emulated, problem)
    assert fake_cupy.launches == []
    assert actual["forward"].shape == (0, 4, 6, 5)
    assert actual["grad_x"].shape == problem.x.shape
    np.testing.assert_array_equal(actual["grad_weight"], np.zeros_like(problem.weight))
    np.testing.assert_array_equal(actual["grad_bias"], np.zeros_like(problem.bias))


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_each_gradient_alone(cuda_emulated, name):
    problem = make_problem(Spec(offset_groups=2, groups=2), np.random.default_rng(11), np.float64)
    everything = _outputs(cuda_emulated, problem, deterministic=True)
    alone = _outputs(cuda_emulated, problem, frozenset({name}), deterministic=True)
    assert set(alone) == {"im2col", "forward", f"grad_{name}"}
    np.testing.assert_array_equal(alone[f"grad_{name}"], everything[f"grad_{name}"])


def test_non_contiguous_inputs(cuda_emulated):
    problem = make_problem(Spec(groups=2, offset_groups=2), np.random.default_rng(5), np.float32)
    contiguous = _outputs(cuda_emulated, problem, deterministic=True)
    strided = type(problem)(problem.spec, *(None if a is None else np.asfortranarray(a)
                                             for a in (*problem.inputs, problem.grad_out)))
    assert not strided.x.flags.c_contiguous
    actual = _outputs(cuda_emulated, strided, deterministic=True)
    for name in contiguous:
        np.testing.assert_array_equal(actual[name], contiguous[name], err_msg=name)


def _special_values_problem(dtype) -> tuple:
    """A problem whose samples hit every NaN/inf rule, and the places each one lands."""
    spec = Spec(batch=1, in_channels=2, height=5, width=5, out_channels=2, kernel=(3, 3), padding=(1, 1, 1, 1))
    problem = make_problem(spec, np.random.default_rng(2), np.float64)
    x, offset, mask = problem.x, problem.offset, problem.mask
    # offset[0, 2k (dy) / 2k+1 (dx), oy, ox]; kernel point k = i*3 + j samples at oy - 1 + i + dy
    offset[0, 0, 2, 2] = np.nan                  # NaN position: NaN sample and NaN gradients
    offset[0, 2, 3, 3] = np.inf                  # infinite position: outside, reads nothing
    offset[0, 4, 1, 1] = -50.0                   # far outside ...
    mask[0, 2, 1, 1] = np.nan                    # ... with a NaN mask: the sample is NaN
    offset[0, 6:8, 2, 1] = (0.3, 0.4)            # k=3 at (2, 1) reads inside, at (2.3, 0.4) ...
    mask[0, 3, 2, 1] = np.nan                    # ... with a NaN mask: NaN scattered to its 4 pixels
    offset[0, 8, 0, 4] = -1.0                    # k=4 (i=j=1) at oy=0: py = 0 - 1 + 1 - 1 = -1, the -1 line
    offset[0, 9, 0, 4] = 0.25
    x[0, 1, 0, 4] = np.nan                       # read by that sample's coordinate gradient, not by the sample
    offset[0, 0:2, 3, 3] = (1.0, 1.5)            # k=0 at (3, 3) samples (3.0, 3.5): row 4 has weight 0 ...
    x[0, 1, 4, 4] = np.inf                       # ... yet an infinite pixel there still poisons it (0 * inf)
    x[0, 0, 0, 0] = np.nan
    return problem.astype(dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nan_and_infinity_rules(cuda_emulated, dtype):
    problem = _special_values_problem(dtype)
    actual = _outputs(cuda_emulated, problem)
    expected = backend_check.numpy_twin_outputs(problem)
    tolerance = TOLERANCE[np.dtype(dtype).name]
    for name, value in expected.items():
        got = actual[name].astype(np.float64)
        nan = np.isnan(value)
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{name}: NaN pattern differs")
        assert nan.any() or name == "grad_bias", f"{name}: the problem should produce NaN"
        assert not nan.all(), f"{name}: everything is NaN, the comparison would be vacuous"
        np.testing.assert_array_equal(np.isinf(got), np.isinf(value), err_msg=f"{name}: infinities differ")
        finite = np.isfinite(value)
        assert relative_error(got[finite], value[finite]) <= tolerance, name
    # On the line py = -1 the sample is 0 but its coordinate gradient reads the image
    # (torchvision's rule): here a NaN pixel, so NaN; for channel 0 alone it would be non-zero.
    assert actual["im2col"][0, 1 * 9 + 4, 0 * 5 + 4] == 0
    assert np.isnan(actual["grad_offset"][0, 8, 0, 4])
    assert actual["grad_mask"][0, 4, 0, 4] == 0  # grad_mask follows the sample, early exit included
    # The sample at (3.0, 3.5) gives its infinite pixel weight 0, and is NaN.
    assert np.isnan(actual["im2col"][0, 1 * 9 + 0, 3 * 5 + 3])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns on the overflowing and NaN casts
def test_emulated_16_bit_conversions_round_to_nearest_even(cuda_emulated):
    library = build.load(cuda_kernels.kernel_source("sample"), tuple(cuda_kernels.name_expressions("sample")))
    bits = np.arange(2**16, dtype=np.uint16)
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 65504, 65519.996, 65520, -65520, 2**-24, 2**-25, 3 * 2**-26, 2**-14 - 2**-25,
                      1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, np.inf, -np.inf, np.nan],
                     dtype=np.float32)
    floats = np.concatenate([edges, rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
                             .view(np.float32), rng.standard_normal(50_000).astype(np.float32)])
    for name, numpy_type in (("half", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        widened = library.convert(f"from_{name}", bits, np.empty(bits.size, np.float32))
        reference = bits.view(numpy_type).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(widened), np.isnan(reference))
        np.testing.assert_array_equal(widened[~np.isnan(reference)], reference[~np.isnan(reference)])
        narrowed = library.convert(f"to_{name}", floats, np.empty(floats.size, np.uint16)).view(numpy_type)
        reference = floats.astype(numpy_type)
        nan = np.isnan(reference.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(narrowed.astype(np.float32)), nan)
        np.testing.assert_array_equal(narrowed.view(np.uint16)[~nan], reference.view(np.uint16)[~nan])


def test_harness_rejects_arguments_cupy_would_mangle(cuda_emulated):
    kernel = cuda_kernels.get_kernel(0, "sample", "float32", 32)
    x = fake_cupy.zeros((1, 2, 2, 1), np.float32)
    geometry = [np.int32(1)] * 24
    good = [x, x, x, np.int32(0), x, np.int32(-1), *geometry]
    with pytest.raises(TypeError, match="Python int"):
        kernel((1,), (32,), [*good[:3], 0, *good[4:]])
    with pytest.raises(TypeError, match="8 bytes"):
        kernel((1,), (32,), [*good[:3], np.int64(0), *good[4:]])
    with pytest.raises(TypeError, match="float64"):
        kernel((1,), (32,), [*good[:4], fake_cupy.zeros(4, np.float64), *good[5:]])
    with pytest.raises(ValueError, match="empty launch"):
        kernel((0,), (32,), good)
    with pytest.raises(TypeError, match="takes 30 arguments"):
        kernel((1,), (32,), good[:-1])


def test_loader_compiles_each_instance_once(cuda_emulated):
    cuda_kernels.get_kernel.cache_clear()
    problem = make_problem(Spec(), np.random.default_rng(4), np.float32)
    _outputs(cuda_emulated, problem)
    first = cuda_kernels.get_kernel.cache_info()
    _outputs(cuda_emulated, problem)
    second = cuda_kernels.get_kernel.cache_info()
    assert first.misses == 2  # sample (forward, im2col, weight gradient) and sample_backward
    assert second.misses == first.misses and second.hits > first.hits


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name, value, offset_kind", nonfinite_cases.CASES)
def test_nonfinite_input_reaches_what_torchvision_reaches(cuda_emulated, name, value, offset_kind, rng):
    spec = Spec(batch=2, in_channels=4, out_channels=4, height=5, width=6, groups=2, offset_groups=2)
    problem = nonfinite_cases.poisoned_problem(spec, name, value, offset_kind, rng)
    outputs = _outputs(cuda_emulated, problem)
    actual = dict(forward=outputs["forward"], **{n: outputs.get(f"grad_{n}") for n in INPUT_NAMES})
    nonfinite_cases.assert_same_patterns(actual, nonfinite_cases.oracle_outputs(problem), f"{name}={value}")
