"""Checks of deformcp.jax and deformcp.flax that need two JAX devices.

XLA makes its host devices when JAX starts, so these run in a process of their own:
``tests/test_jax_sharding.py`` starts ``python tests/jax_two_devices.py CHECK SEED``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (and a timeout), and a
check passes when the process exits 0.  Each check is a function named ``check_*``;
the seed makes the inputs fresh per test run and reproducible from its id.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import deformcp.jax as dj
from deformcp import api, testing
from problems import INPUT_NAMES, Spec, assert_gradients_match, assert_within_tolerance, make_problem

# Batch 4 splits 2 + 2; groups and offset groups so that no channel arithmetic hides.
SPEC = Spec(batch=4, in_channels=4, out_channels=6, groups=2, offset_groups=2, height=6, width=5)
BATCHED = ("x", "offset", "mask")


def _mesh(kind: AxisType):
    return jax.make_mesh((2,), ("batch",), axis_types=(kind,))


def _placed(problem, mesh, batch_spec=P("batch")):
    """The problem's inputs in float32: x, offset and mask split along the batch, weight and bias replicated."""
    return [None if a is None else jax.device_put(jnp.asarray(a, jnp.float32),
                                                  NamedSharding(mesh, batch_spec if n in BATCHED else P()))
            for n, a in zip(INPUT_NAMES, problem.inputs)]


def _forward(*arrays):
    return dj.deform_conv2d(*arrays, **SPEC.kwargs)


def _expected_forward(problem):
    return testing.loop_deform_conv2d(*problem.inputs, **SPEC.kwargs)


def _all_gradients(arrays, grad_out):
    """The cotangents of every input under jit, as a dict by name."""
    def loss(*values):
        # A product and a sum rather than vdot, whose contraction over a split batch an
        # Explicit mesh would ask to be told the sharding of.
        return jnp.sum(_forward(*values) * grad_out)

    return dict(zip(INPUT_NAMES, jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*arrays)))


def _assert_batch_split(array, mesh):
    expected = NamedSharding(mesh, P("batch"))
    assert array.sharding.is_equivalent_to(expected, array.ndim), f"{array.sharding} is not {expected}"


@contextlib.contextmanager
def _backend_calls_meeting_in_parallel():
    """Record the backend's forward calls (batch size, thread), each waiting for the other at a barrier.

    Two calls that ran one after the other would break the barrier after its timeout,
    so the check fails unless the two shares of the batch run at the same time.
    """
    calls, barrier, original = [], threading.Barrier(2, timeout=60), api.deform_conv2d

    def meeting(x, *args, **kwargs):
        calls.append((x.shape[0], threading.get_ident()))
        barrier.wait()
        return original(x, *args, **kwargs)

    api.deform_conv2d = meeting
    try:
        yield calls
    finally:
        api.deform_conv2d = original


def check_auto_mesh_runs_each_share_on_its_device(rng):
    mesh = _mesh(AxisType.Auto)
    problem = make_problem(SPEC, rng)
    arrays = _placed(problem, mesh)
    with _backend_calls_meeting_in_parallel() as calls:
        out = jax.jit(_forward)(*arrays)
        out.block_until_ready()
    assert sorted(size for size, _ in calls) == [2, 2], calls
    assert len({thread for _, thread in calls}) == 2, calls
    _assert_batch_split(out, mesh)
    assert_within_tolerance(np.asarray(out), _expected_forward(problem), "float32", "sharded forward")
    # Later operations take the output as any batch-split array (it once came back with a
    # single-device sharding that they rejected).
    total = jax.jit(lambda y: jnp.sum(2 * y))(out)
    np.testing.assert_allclose(float(total), 2 * float(np.asarray(out, np.float64).sum()), rtol=1e-5)
    _assert_batch_split(out + 1, mesh)


def check_eager_call_on_split_arrays(rng):
    mesh = _mesh(AxisType.Auto)
    problem = make_problem(SPEC, rng)
    out = _forward(*_placed(problem, mesh))
    _assert_batch_split(out, mesh)
    assert_within_tolerance(np.asarray(out), _expected_forward(problem), "float32", "eager forward")


def check_auto_mesh_gradients(rng):
    mesh = _mesh(AxisType.Auto)
    problem = make_problem(SPEC, rng)
    grad_out = jax.device_put(jnp.asarray(problem.grad_out, jnp.float32), NamedSharding(mesh, P("batch")))
    grads = _all_gradients(_placed(problem, mesh), grad_out)
    for name in BATCHED:
        _assert_batch_split(grads[name], mesh)
    # The weight's and bias's gradients sum both shares, and every device holds the sum.
    assert grads["weight"].sharding.is_fully_replicated and grads["bias"].sharding.is_fully_replicated
    expected = testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **SPEC.kwargs)
    assert_gradients_match({n: np.asarray(g) for n, g in grads.items()}, expected, "float32")
    # The split arrays closed over, and the only argument on one device: the jit's devices come
    # from its arguments, so the op must find the mesh in the constants.
    x, offset, mask, _, bias = _placed(problem, mesh)
    on_one_device = jnp.asarray(problem.weight, jnp.float32)
    g_weight = jax.jit(jax.grad(lambda w: jnp.sum(_forward(x, offset, mask, w, bias) * grad_out)))(on_one_device)
    assert_within_tolerance(np.asarray(g_weight), expected["weight"], "float32", "grad_weight, closed over")


def check_auto_mesh_batch_that_does_not_split(rng):
    # Batch 3 over 2 devices: the whole batch runs on each device; the result is the same.
    spec = Spec(batch=3, in_channels=4, out_channels=6, groups=2, offset_groups=2, height=6, width=5)
    problem = make_problem(spec, rng)
    arrays = [None if a is None else jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(_mesh(AxisType.Auto),
                                                                                                 P()))
              for a in problem.inputs]
    out = jax.jit(_forward)(*arrays)
    assert_within_tolerance(np.asarray(out), testing.loop_deform_conv2d(*problem.inputs, **spec.kwargs), "float32",
                            "unsplit batch")


def check_explicit_mesh(rng):
    mesh = _mesh(AxisType.Explicit)
    problem = make_problem(SPEC, rng)
    with jax.set_mesh(mesh):
        arrays = _placed(problem, mesh)
        out = jax.jit(_forward)(*arrays)
        assert jax.typeof(out).sharding.spec == P("batch", None, None, None), jax.typeof(out)
        assert_within_tolerance(np.asarray(out), _expected_forward(problem), "float32", "explicit forward")
        grad_out = jax.device_put(jnp.asarray(problem.grad_out, jnp.float32), P("batch"))
        grads = _all_gradients(arrays, grad_out)
        expected = testing.loop_deform_conv2d_backward(problem.grad_out, *problem.inputs, **SPEC.kwargs)
        assert_gradients_match({n: np.asarray(g) for n, g in grads.items()}, expected, "float32")

        # Replicated operands: each device computes the whole batch, and the type says so.
        replicated = _placed(problem, mesh, batch_spec=P())
        out = jax.jit(_forward)(*replicated)
        assert jax.typeof(out).sharding.spec == P(None, None, None, None), jax.typeof(out)
        assert_within_tolerance(np.asarray(out), _expected_forward(problem), "float32", "explicit, replicated")

        # Split along anything but the batch: refused, naming the operand and the way out.
        by_channel = list(arrays)
        by_channel[0] = jax.device_put(arrays[0], P(None, "batch"))
        try:
            jax.jit(_forward)(*by_channel)
        except ValueError as exc:
            assert str(exc).startswith("x is sharded as P(None, 'batch', None, None) over Explicit mesh axes"), exc
            assert "reshard x to P() (jax.sharding.reshard)" in str(exc), exc
        else:
            raise AssertionError("x split along its channels was accepted")
        # x split along the batch but the offset not: the offset is named, with the split it needs.
        unsplit_offset = list(arrays)
        unsplit_offset[1] = jax.device_put(arrays[1], P())
        try:
            jax.jit(_forward)(*unsplit_offset)
        except ValueError as exc:
            assert "offset is sharded as P(None, None, None, None)" in str(exc), exc
            assert "reshard offset to P('batch',) (jax.sharding.reshard)" in str(exc), exc
        else:
            raise AssertionError("an offset split unlike x was accepted")


def check_inside_shard_map_and_pmap(rng):
    mesh = _mesh(AxisType.Auto)
    problem = make_problem(SPEC, rng)
    expected = _expected_forward(problem)
    arrays = _placed(problem, mesh)
    specs = tuple(None if a is None else (P("batch") if n in BATCHED else P()) for n, a in zip(INPUT_NAMES, arrays))
    mapped = jax.jit(jax.shard_map(_forward, mesh=mesh, in_specs=specs, out_specs=P("batch")))(*arrays)
    assert_within_tolerance(np.asarray(mapped), expected, "float32", "inside shard_map")

    halves = [None if a is None else jnp.asarray(a, jnp.float32) for a in problem.inputs]
    halves = [None if a is None else (a.reshape((2, 2) + a.shape[1:]) if n in BATCHED else jnp.stack([a, a]))
              for n, a in zip(INPUT_NAMES, halves)]
    pmapped = jax.pmap(_forward)(*halves)
    assert_within_tolerance(np.asarray(pmapped).reshape(expected.shape), expected, "float32", "pmap")


def check_vmap_inside_sharded_jit(rng):
    mesh = _mesh(AxisType.Auto)
    problems = [make_problem(SPEC, rng) for _ in range(3)]
    arrays = _placed(problems[0], mesh)
    xs = jax.device_put(jnp.asarray(np.stack([p.x for p in problems]), jnp.float32),
                        NamedSharding(mesh, P(None, "batch")))
    out = jax.jit(jax.vmap(lambda x: _forward(x, *arrays[1:])))(xs)
    for k, p in enumerate(problems):
        expected = testing.loop_deform_conv2d(p.x, *problems[0].inputs[1:], **SPEC.kwargs)
        assert_within_tolerance(np.asarray(out[k]), expected, "float32", f"vmap example {k}")


def _flax_training(rng, kind: AxisType, steps: int = 2):
    """Train a small Flax NNX model of two deformcp layers for ``steps`` SGD steps, the batch split over
    both devices and on one device; the losses and parameters must agree."""
    import optax
    from flax import nnx

    from deformcp.flax import DeformConv2dPack

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dcn1 = DeformConv2dPack(3, 8, 3, offset_groups=1, rngs=rngs)
            self.dcn2 = DeformConv2dPack(8, 8, 3, strides=2, feature_group_count=2, modulated=False, rngs=rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            y = self.dcn2(nnx.relu(self.dcn1(x)))
            return self.head(jnp.mean(nnx.relu(y), axis=(1, 2)))

    @nnx.jit
    def step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    images = rng.standard_normal((4, 10, 9, 3)).astype(np.float32)
    targets = rng.standard_normal((4, 2)).astype(np.float32)
    # Offsets that are not all zero from the first step, so the sampling is really deformed.
    offset_kernels = [rng.normal(0, 0.3, shape).astype(np.float32) for shape in ((3, 3, 3, 27), (3, 3, 8, 18))]
    mesh = _mesh(kind)
    results = []
    for split in (False, True):
        context = jax.set_mesh(mesh) if split and kind == AxisType.Explicit else contextlib.nullcontext()
        with context:
            model = Net(nnx.Rngs(0))
            for layer, kernel in zip((model.dcn1, model.dcn2), offset_kernels):
                layer.conv_offset.kernel[...] = jnp.asarray(kernel)
            optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
            x, t = jnp.asarray(images), jnp.asarray(targets)
            if split:
                x, t = (jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, t))
            losses = [float(step(model, optimizer, x, t)) for _ in range(steps)]
            results.append((losses, [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]))
    (one_losses, one_params), (split_losses, split_params) = results
    assert np.all(np.isfinite(one_losses)) and one_losses[-1] < one_losses[0], one_losses
    np.testing.assert_allclose(split_losses, one_losses, rtol=1e-5)
    for split_value, one_value in zip(split_params, one_params, strict=True):
        assert_within_tolerance(split_value, one_value, "float32", "parameters after training")


def check_flax_training_step_auto_mesh(rng):
    _flax_training(rng, AxisType.Auto)


def check_flax_training_step_explicit_mesh(rng):
    _flax_training(rng, AxisType.Explicit)


def check_docs_jax_and_flax_examples(rng):
    # docs/jax.md's ```python blocks, in order, in one namespace: its sharded examples need the devices.
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "jax.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    namespace = {}
    exec(compile("\n".join(blocks), str(page), "exec"), namespace)
    missing = [n for n in ("per_example", "g_weight", "y", "loss", "loss_split") if n not in namespace]
    assert not missing, f"docs/jax.md: the examples did not define {missing}"


def main() -> None:
    name, seed = sys.argv[1], int(sys.argv[2])
    devices = jax.devices()
    assert len(devices) == 2, f"two devices expected (XLA_FLAGS), got {devices}"
    globals()["check_" + name](np.random.default_rng(seed))
    print(f"{name}: passed")


if __name__ == "__main__":
    main()
