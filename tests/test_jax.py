"""The JAX adapter: values and gradients against the float64 reference, under jit, grad and vmap.

Arrays are placed on an explicit device: the CPU, except in the tests marked ``gpu``
(``tests/conftest.py`` also keeps JAX's default device on the CPU for the others), so the
CPU tests test the CPU also where JAX's default backend is a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import deformcp.jax as dj
from deformcp import api
from problems import EXAMPLE_SPECS, INPUT_NAMES, assert_within_tolerance, assert_gradients_match, make_problem
from deformcp import testing

SPECS = {name: EXAMPLE_SPECS[name] for name in ("basic", "groups2_offset_groups2", "stride2", "asymmetric_padding",
                                                 "dilation", "no_mask_no_bias")}
SPEC_PARAMS = [pytest.param(s, id=n) for n, s in SPECS.items()]
CPU = jax.devices("cpu")[0]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _put(array, dtype=None, device=CPU):
    return jax.device_put(jnp.asarray(array, dtype=dtype), device)


def _arrays(problem, dtype=None, device=CPU):
    return [None if a is None else _put(a, dtype, device) for a in problem.inputs]


def _vjp_all(arrays, grad_out, kwargs):
    """The output and the cotangents of every present input, through jit."""
    present = [i for i, a in enumerate(arrays) if a is not None]

    def f(*values):
        full = list(arrays)
        for i, v in zip(present, values):
            full[i] = v
        return dj.deform_conv2d(*full, **kwargs)

    @jax.jit
    def run(values, g):
        out, vjp = jax.vjp(f, *values)
        return out, vjp(g)

    out, grads = run([arrays[i] for i in present], grad_out)
    by_index = dict(zip(present, grads))
    return out, {name: by_index.get(i) for i, name in enumerate(INPUT_NAMES)}


def _assert_gradients(grads, problem, dtype_name="float64"):
    """``grads`` against the reference's on ``problem`` (the inputs as given, in float64)."""
    exact = problem.astype(np.float64)
    expected = testing.loop_deform_conv2d_backward(exact.grad_out, *exact.inputs, **problem.spec.kwargs)
    assert_gradients_match({n: None if g is None else np.asarray(g) for n, g in grads.items()}, expected, dtype_name)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_float64_values_and_gradients_against_reference(spec, rng, x64):
    problem = make_problem(spec, rng)
    out, grads = _vjp_all(_arrays(problem), _put(problem.grad_out), spec.kwargs)
    assert out.dtype == jnp.float64
    assert_within_tolerance(out, testing.loop_deform_conv2d(*problem.inputs, **spec.kwargs), "float64", "forward")
    _assert_gradients(grads, problem)


@pytest.mark.parametrize("dtype, name", [(jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")])
def test_low_precision_values_and_gradients(dtype, name, rng):
    spec = SPECS["groups2_offset_groups2"]
    rounded = make_problem(spec, rng).astype(np.dtype(dtype))
    exact = rounded.astype(np.float64)
    out, grads = _vjp_all(_arrays(rounded), _put(rounded.grad_out), spec.kwargs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values() if g is not None)
    assert_within_tolerance(np.asarray(out), testing.loop_deform_conv2d(*exact.inputs, **spec.kwargs), name, "forward")
    _assert_gradients(grads, rounded, name)


def _record_calls(monkeypatch, name):
    calls = []
    original = getattr(api, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(api, name, recording)
    return calls


def test_only_the_needed_gradients_are_computed(rng, monkeypatch):
    calls = _record_calls(monkeypatch, "deform_conv2d_backward")
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _arrays(problem, jnp.float32)
    grad = jax.grad(lambda w, m: dj.deform_conv2d(x, offset, m, w, bias, **problem.spec.kwargs).sum(),
                    argnums=(0, 1))(weight, mask)
    assert [set(kwargs["wrt"]) for _, kwargs in calls] == [{"weight", "mask"}]
    assert grad[0].shape == weight.shape and grad[1].shape == mask.shape


def test_jit_matches_eager(rng):
    problem = make_problem(SPECS["stride2"], rng)
    arrays = _arrays(problem, jnp.float32)
    f = lambda *a: dj.deform_conv2d(*a, **problem.spec.kwargs)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(*arrays)), np.asarray(f(*arrays)))


def _stack_of(f, *batched):
    return jnp.stack([f(*items) for items in zip(*batched)])


def test_vmap_over_inputs_folds_into_one_backend_call(rng, monkeypatch):
    spec = SPECS["groups2_offset_groups2"]
    examples = [make_problem(spec, rng).astype(np.float32) for _ in range(3)]
    shared = _arrays(examples[0])
    xs, offsets, masks = (_put(np.stack([getattr(p, n) for p in examples])) for n in ("x", "offset", "mask"))
    f = lambda x, o, m: dj.deform_conv2d(x, o, m, shared[3], shared[4], **spec.kwargs)  # noqa: E731
    expected = _stack_of(f, xs, offsets, masks)
    calls = _record_calls(monkeypatch, "deform_conv2d")
    assert_within_tolerance(np.asarray(jax.vmap(f)(xs, offsets, masks)), np.asarray(expected), "float32", "vmap")
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 3 * spec.batch


def test_vmap_over_weight_and_nested_vmap(rng):
    spec = SPECS["basic"]
    p = make_problem(spec, rng).astype(np.float32)
    x, offset, mask, weight, bias = _arrays(p)
    weights = jnp.stack([weight, 2 * weight, -weight])
    xs = jnp.stack([x, x + 1])
    f = lambda x, w: dj.deform_conv2d(x, offset, mask, w, bias, **spec.kwargs)  # noqa: E731
    expected = jnp.stack([jnp.stack([f(xi, w) for w in weights]) for xi in xs])
    nested = jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))(xs, weights)
    assert nested.shape == (2, 3) + x.shape[:1] + (spec.out_channels,) + x.shape[2:]
    assert_within_tolerance(np.asarray(nested), np.asarray(expected), "float32", "nested vmap")


def test_vmap_of_grad_gives_per_example_gradients(rng):
    spec = SPECS["asymmetric_padding"]
    examples = [make_problem(spec, rng).astype(np.float32) for _ in range(3)]
    x, offset, mask, weight, bias = _arrays(examples[0])
    xs = _put(np.stack([p.x for p in examples]))

    def loss(w, b, x, offset):
        return jnp.sum(jnp.tanh(dj.deform_conv2d(x, offset, mask, w, b, **spec.kwargs)))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    batched = jax.jit(jax.vmap(grad, in_axes=(None, None, 0, None)))(weight, bias, xs, offset)
    for k, name in enumerate(("weight", "bias", "x", "offset")):
        expected = jnp.stack([grad(weight, bias, xi, offset)[k] for xi in xs])
        assert_within_tolerance(np.asarray(batched[k]), np.asarray(expected), "float32", f"per-example grad_{name}")


def test_grad_of_a_vmapped_loss_sums_over_examples(rng):
    spec = SPECS["no_mask_no_bias"]
    examples = [make_problem(spec, rng) for _ in range(2)]
    with jax.enable_x64(True):
        xs = _put(np.stack([p.x for p in examples]))
        offsets = _put(np.stack([p.offset for p in examples]))
        weight = _put(examples[0].weight)
        g_out = _put(np.stack([p.grad_out for p in examples]))
        total = lambda w: jnp.vdot(jax.vmap(lambda x, o: dj.deform_conv2d(x, o, None, w, **spec.kwargs))(xs, offsets),
                                   g_out)  # noqa: E731
        actual = np.asarray(jax.grad(total)(weight))
    expected = sum(testing.loop_deform_conv2d_backward(p.grad_out, p.x, p.offset, None, examples[0].weight, None,
                                                    **spec.kwargs)["weight"] for p in examples)
    assert_within_tolerance(actual, expected, "float64", "grad_weight")


def test_bad_input_fails_at_trace_time_naming_the_argument(rng):
    problem = make_problem(SPECS["basic"], rng)
    x, offset, mask, weight, bias = _arrays(problem, jnp.float32)
    with pytest.raises(ValueError, match="^mask must have shape"):
        jax.jit(lambda m: dj.deform_conv2d(x, offset, m, weight, bias, padding=1))(mask[:, :4])
    with pytest.raises(TypeError, match="all floating inputs must share one dtype.*bias=bfloat16"):
        dj.deform_conv2d(x, offset, mask, weight, bias.astype(jnp.bfloat16), padding=1)
    with pytest.raises(ValueError, match="^padding must be non-negative"):
        dj.deform_conv2d(x, offset, mask, weight, bias, padding=-1)


def test_bfloat16_results_are_bfloat16(rng):
    problem = make_problem(SPECS["basic"], rng).astype(ml_dtypes.bfloat16)
    out = jax.jit(lambda *a: dj.deform_conv2d(*a, **problem.spec.kwargs))(*_arrays(problem))
    assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------- GPU


def _gpu_device():
    """JAX's first GPU, and ``None`` with the reason where JAX has none."""
    try:
        return jax.devices("gpu")[0], None
    except RuntimeError as exc:
        return None, f"JAX has no GPU backend ({exc})"


GPU, GPU_REASON = _gpu_device()
DEVICE_PATH_DTYPES = [pytest.param(np.dtype(np.float64), id="float64"),
                      pytest.param(np.dtype(ml_dtypes.bfloat16), id="bfloat16")]


def _check_callback_path(rng, callback_target, device, dtype):
    """Values, gradients and both vmap paths through the callback whose lowering names ``callback_target``."""
    spec = SPECS["groups2_offset_groups2"]
    rounded = make_problem(spec, rng).astype(dtype)
    exact = rounded.astype(np.float64)
    arrays = _arrays(rounded, device=device)
    hlo = jax.jit(lambda *a: dj.deform_conv2d(*a, **spec.kwargs)).lower(*arrays).as_text()
    assert callback_target in hlo
    out, grads = _vjp_all(arrays, _put(rounded.grad_out, device=device), spec.kwargs)
    assert out.devices() == {device} and out.dtype == dtype
    assert_within_tolerance(np.asarray(out), testing.loop_deform_conv2d(*exact.inputs, **spec.kwargs), dtype.name,
                            "forward")
    _assert_gradients(grads, rounded, dtype.name)
    xs = jnp.stack([arrays[0], 2 * arrays[0]])
    weights = jnp.stack([arrays[3], -arrays[3]])
    f = lambda x, w: dj.deform_conv2d(x, arrays[1], arrays[2], w, arrays[4], **spec.kwargs)  # noqa: E731
    assert_within_tolerance(np.asarray(jax.vmap(f)(xs, weights)), np.asarray(_stack_of(f, xs, weights)), dtype.name,
                            "vmap")
    assert_within_tolerance(np.asarray(jax.vmap(f, in_axes=(0, None))(xs, arrays[3])),
                            np.asarray(_stack_of(f, xs, [arrays[3]] * 2)), dtype.name, "folded vmap")


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))
@pytest.mark.parametrize("dtype", DEVICE_PATH_DTYPES)
def test_gpu_runs_on_device_buffers(rng, x64, dtype):
    # With CuPy present the lowered program uses the device-buffer callback, not a host callback,
    # for bfloat16 too (CuPy 14 views bfloat16 buffers through DLPack).
    pytest.importorskip("cupy", reason="CuPy is needed for the device-buffer path")
    _check_callback_path(rng, "xla_buffer_python_gpu_callback", GPU, dtype)


@pytest.mark.parametrize("dtype", DEVICE_PATH_DTYPES)
def test_cpu_runs_on_xlas_buffers(rng, x64, dtype):
    # The CPU takes the path CUDA takes (buffer_callback, results written into XLA's buffers), with NumPy views.
    _check_callback_path(rng, "xla_buffer_python_cpu_callback", CPU, dtype)


@pytest.mark.parametrize("dtype", DEVICE_PATH_DTYPES)
def test_host_callback_path_on_the_cpu(rng, monkeypatch, x64, dtype):
    # The path of platforms deformcp cannot run in place (pure_callback on host copies), run on the CPU.
    monkeypatch.setattr(dj, "_IN_PLACE_PLATFORMS", ())
    _check_callback_path(rng, "xla_ffi_python_cpu_callback", CPU, dtype)
