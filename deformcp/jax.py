"""JAX adapter: :func:`deform_conv2d` with a custom VJP, under ``jit``, ``grad`` and ``vmap``.

Where the work runs
-------------------
* CPU and CUDA: :func:`jax.experimental.buffer_callback.buffer_callback` hands the
  callback XLA's buffers (and, on CUDA, XLA's stream).  On the CPU they are host
  memory, viewed by NumPy with no copy; on CUDA, with CuPy installed, CuPy views
  them through DLPack (every dtype, bfloat16 included) and the kernels read them in
  place on that stream.  The result is copied into XLA's output buffer; no host
  round trip.
* Any other platform, and CUDA without CuPy or for bfloat16 where CuPy has no
  bfloat16 (:func:`deformcp.interop.cupy_bfloat16_missing`): a host callback,
  :func:`jax.pure_callback`, calls the NumPy/SciPy backend on host copies.

Sharded inputs
--------------
Under ``jit`` with operands on a mesh of several devices, the callbacks run inside
:func:`jax.shard_map`: every device convolves its share of the batch, in parallel,
and the output comes back split along the batch the same way (weight and bias
replicated; their gradients summed over the devices).  Over Explicit mesh axes the
split is the one ``x``'s type names, and an operand split along any other axis is
refused with a ValueError; over Auto axes deformcp splits the batch over every axis
whose size divides it.  Inside a user's ``shard_map`` or ``pmap`` the callbacks
already run per device.

Under :func:`jax.vmap` the callbacks receive the mapped axes in front
(``vmap_method="expand_dims"``).  When the weight and bias are shared by all
mapped examples, the mapped axes are folded into the batch and the backend runs
once; otherwise (a mapped weight, or per-example weight gradients, which is what
``vmap`` of a backward pass asks for) it runs once per mapped example.

Only the gradients JAX needs are computed (``symbolic_zeros``): for instance
``jax.grad`` with respect to the weight alone skips the input and offset gradients.
Higher-order derivatives are not supported.

Examples
--------
>>> import jax, jax.numpy as jnp, deformcp.jax as dj
>>> k = jax.random.split(jax.random.key(0), 3)
>>> x = jax.random.normal(k[0], (1, 4, 8, 8))
>>> offset = jax.random.normal(k[1], (1, 18, 8, 8))
>>> weight = jax.random.normal(k[2], (6, 4, 3, 3))
>>> loss = lambda w: dj.deform_conv2d(x, offset, None, w, padding=1).sum()
>>> jax.jit(jax.grad(loss))(weight).shape
(6, 4, 3, 3)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import api, interop
from .api import INPUT_NAMES
from .dtypes import common_dtype
from .geometry import IntPair, Padding, conv_geometry, normalize_pair, normalize_padding

__all__ = ["deform_conv2d"]

# Dimensions of each operand once vmap's leading axes are removed; all but weight and bias
# start with the batch axis, into which mapped axes can be folded.
_CORE_NDIM = {"grad_out": 4, "x": 4, "offset": 4, "mask": 4, "weight": 4, "bias": 1}
_SHARED = ("weight", "bias")

def deform_conv2d(x, offset, mask, weight, bias=None, *, stride: IntPair = 1, padding: Padding = 0,
                  dilation: IntPair = 1):
    """Deformable 2-D convolution on JAX arrays, differentiable, and usable under ``jit`` and ``vmap``.

    Parameters
    ----------
    x : jax.Array, shape (B, C, H, W)
    offset : jax.Array, shape (B, 2*G*kh*kw, H_out, W_out)
    mask : jax.Array, shape (B, G*kh*kw, H_out, W_out), or None
        None means DCNv1 (a mask of ones).
    weight : jax.Array, shape (C_out, C/groups, kh, kw)
    bias : jax.Array, shape (C_out,), optional
    stride, padding, dilation
        As for :func:`deformcp.deform_conv2d`; they are static (Python ints).

    Returns
    -------
    jax.Array, shape (B, C_out, H_out, W_out)
        Of ``x``'s dtype.

    Raises
    ------
    ValueError, TypeError
        As :func:`deformcp.deform_conv2d`, at trace time, naming the argument; and a
        ValueError for an operand split over Explicit mesh axes along any axis but
        the batch (x, offset and mask alike) or, for weight and bias, at all.

    Notes
    -----
    float64 needs ``jax_enable_x64``, as everywhere in JAX.  The module docstring
    says where the work runs on each platform, and how a batch split over devices
    is computed.
    """
    arrays = {name: None if a is None else jnp.asarray(a) for name, a in zip(INPUT_NAMES, (x, offset, mask, weight, bias))}
    conv = (normalize_pair(stride, "stride"), normalize_padding(padding), normalize_pair(dilation, "dilation"))
    common_dtype(**arrays)
    _geometry(arrays, conv)
    if _mesh_of(arrays) is not None and not any(isinstance(a, jax.core.Tracer) for a in arrays.values()):
        # Arrays on several devices, outside any transformation: shard_map's eager mode has no
        # custom_vjp with symbolic zeros, so the call is compiled (once per geometry).
        return _compiled_over_batch_shards(arrays, conv)
    return _over_batch_shards(arrays, conv)

def _geometry(arrays: Dict[str, Optional[jax.Array]], conv):
    stride, padding, dilation = conv
    shapes = [None if arrays[n] is None else tuple(arrays[n].shape) for n in INPUT_NAMES]
    return conv_geometry(*shapes, stride=stride, padding=padding, dilation=dilation)

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation):
    arrays = dict(zip(INPUT_NAMES, (x, offset, mask, weight, bias)))
    conv = (stride, padding, dilation)
    out = jax.ShapeDtypeStruct(_geometry(arrays, conv).out_shape, x.dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)

    def run(a):
        return (api.deform_conv2d(a["x"], a["offset"], a["mask"], a["weight"], a["bias"], **kwargs),)

    fold = lambda batched: not any(batched[n] for n in _SHARED)  # noqa: E731
    (result,) = _call(run, fold, arrays, (out,))
    return result

def _forward(x, offset, mask, weight, bias, stride, padding, dilation):
    values = [None if p is None else p.value for p in (x, offset, mask, weight, bias)]
    # Which gradients are wanted travels as the keys of a dict in the residuals: pytree
    # structure is static, so the backward pass sees plain Python values.
    wanted = {name: None for name, p in zip(INPUT_NAMES, (x, offset, mask, weight, bias)) if p is not None and p.perturbed}
    return _deform_conv2d(*values, stride, padding, dilation), (values, wanted)

def _backward(stride, padding, dilation, residuals, grad_out):
    values, wanted = residuals
    if isinstance(grad_out, SymbolicZero) or not wanted:
        return (None,) * len(INPUT_NAMES)
    arrays = dict(grad_out=grad_out, **dict(zip(INPUT_NAMES, values)))
    names = tuple(wanted)
    shapes = tuple(jax.ShapeDtypeStruct(arrays[n].shape, arrays[n].dtype) for n in names)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)

    def run(a):
        grads = api.deform_conv2d_backward(a["grad_out"], a["x"], a["offset"], a["mask"], a["weight"], a["bias"],
                                           wrt=names, **kwargs)
        return tuple(getattr(grads, "grad_" + n) for n in names)

    # Per-example weight or bias gradients cannot come out of one folded batch.
    fold = lambda batched: not any(batched[n] for n in _SHARED) and not set(names) & set(_SHARED)  # noqa: E731
    grads = dict(zip(names, _call(run, fold, arrays, shapes)))
    return tuple(grads.get(n) for n in INPUT_NAMES)

_deform_conv2d.defvjp(_forward, _backward, symbolic_zeros=True)

def _call(run: Callable, fold: Callable, arrays: dict, results: tuple):
    """Run ``run`` (dict of backend arrays -> tuple of results) as a callback on ``arrays``' platform."""
    names = tuple(n for n, a in arrays.items() if a is not None)
    operands = tuple(arrays[n] for n in names)

    def on_host(*host_arrays):
        out = _unmapped(run, fold, dict(zip(names, host_arrays)), np)
        return tuple(np.asarray(r) for r in out)

    def host(*ops):
        return jax.pure_callback(on_host, results, *ops, vmap_method="expand_dims")

    platforms = [p for p in _IN_PLACE_PLATFORMS if p != "cuda" or _cupy_takes(results[0].dtype)]
    if not platforms:
        return host(*operands)

    def on_buffers(ctx, outs, *buffers):
        # The weight is never empty, so its buffer tells the device all of them are on.
        with _buffer_arrays(buffers[names.index("weight")], ctx) as (xp, view):
            out = _unmapped(run, fold, {n: view(b) for n, b in zip(names, buffers)}, xp)
            for target, value in zip(outs, out):
                view(target)[...] = value

    from jax.experimental.buffer_callback import buffer_callback

    in_place = buffer_callback(on_buffers, results, vmap_method="expand_dims")
    return jax.lax.platform_dependent(*operands, **dict.fromkeys(platforms, in_place), default=host)

# Platforms whose buffers the backends read and write in place (buffer_callback); the others
# take the host callback (pure_callback).  The CPU is one of them: pure_callback first copies
# its operands onto JAX's first CPU device, which under several CPU devices is one the running
# program occupies; a callback on another device then waits on it, which can deadlock a
# program that all-reduces (the sharded training step).  buffer_callback hands each device's
# callback its own buffers as host memory, NumPy views with no copy.
_IN_PLACE_PLATFORMS = ("cpu", "cuda")

@contextlib.contextmanager
def _buffer_arrays(buffer, ctx):
    """Yield ``(xp, view)`` for ``buffer_callback`` buffers like ``buffer``: their array module, and
    the function that views one as an array of it, in place.

    For CUDA, CuPy views them through DLPack (``cupy.from_dlpack``, which takes bfloat16;
    their ``__cuda_array_interface__`` cannot describe it), and the block runs on the
    buffer's device with XLA's stream as CuPy's current stream, so the kernels are ordered
    with XLA's work.
    """
    device_type, device = buffer.__dlpack_device__()
    if device_type != interop.DL_CUDA:
        yield np, np.asarray
        return
    import cupy

    stream = ctx.stream() if callable(ctx.stream) else ctx.stream  # a method in some jaxlib versions
    with cupy.cuda.Device(device), interop.on_stream(stream):
        yield cupy, cupy.from_dlpack

def _cupy_takes(dtype) -> bool:
    """Whether CUDA arrays of ``dtype`` run in place through CuPy (else through the host)."""
    if not _cupy_available():
        return False
    return np.dtype(dtype).name != "bfloat16" or interop.cupy_bfloat16_missing() is None

@functools.lru_cache(maxsize=None)
def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CuPy present without a usable CUDA runtime or driver
        return False

def _unmapped(run: Callable, fold: Callable, arrays: dict, xp) -> tuple:
    """Evaluate ``run`` on arrays that carry ``vmap``'s leading axes in front of their own.

    ``vmap_method="expand_dims"`` gives every operand the same number of leading axes,
    of size 1 where that operand is not mapped; the results must have the full
    leading shape.  ``fold(batched)`` says whether the leading axes may be folded
    into the batch axis, given which operands are mapped.
    """
    leading = {n: a.shape[:a.ndim - _CORE_NDIM[n]] for n, a in arrays.items()}
    lead = np.broadcast_shapes(*leading.values())
    if not lead:
        return run({**dict.fromkeys(INPUT_NAMES), **arrays})
    count = math.prod(lead)
    if fold({n: math.prod(leading.get(n, ())) > 1 for n in _SHARED}):
        folded = {n: _fold(a, lead, _CORE_NDIM[n], xp) if n not in _SHARED else a.reshape(a.shape[len(lead):])
                  for n, a in arrays.items()}
        return tuple(r.reshape(lead + (r.shape[0] // count,) + r.shape[1:])
                     for r in run({**dict.fromkeys(INPUT_NAMES), **folded}))
    per_example = []
    for index in np.ndindex(*lead):
        # Index size-1 (unmapped) axes with 0, so those operands broadcast over the others.
        picked = {n: a[tuple(i if s > 1 else 0 for i, s in zip(index, leading[n]))] for n, a in arrays.items()}
        per_example.append(run({**dict.fromkeys(INPUT_NAMES), **picked}))
    return tuple(xp.stack([r[k] for r in per_example]).reshape(lead + per_example[0][k].shape)
                 for k in range(len(per_example[0])))

def _fold(array, lead, core_ndim: int, xp):
    """``array`` with leading axes ``lead`` (broadcast from size 1 where unmapped) merged into its batch axis."""
    core = array.shape[len(lead):]
    full = xp.broadcast_to(array, lead + core)
    return full.reshape((math.prod(lead) * core[0],) + core[1:])

# ------------------------------------------------------------------------------------ sharding

# The operands whose first axis is the batch; the others (weight, bias) every device needs whole.
_BATCHED = ("x", "offset", "mask")


def _over_batch_shards(arrays: Dict[str, Optional[jax.Array]], conv):
    """The convolution of ``arrays``, run by every device of the operands' mesh on its share of the batch.

    The callbacks are opaque to XLA's partitioner, which would run them once, on one
    device, for the whole batch.  Under a mesh they run inside :func:`jax.shard_map`
    instead: the batch operands are split along the axes :func:`_batch_axes` picks,
    the weight and bias are replicated, and the output comes back split the same way.
    The weight's and bias's gradients are summed over the devices by ``shard_map``'s
    transpose.  ``check_vma=False``: a callback's results carry no record of which
    axes they vary along.
    """
    mesh = _mesh_of(arrays)
    free = () if mesh is None else tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types)
                                         if t != jax.sharding.AxisType.Manual)
    if math.prod(mesh.shape[n] for n in free) == 1:  # no mesh, or no device to share the work with
        return _deform_conv2d(*arrays.values(), *conv)
    axes = _batch_axes(mesh, free, arrays)
    batch_spec = jax.sharding.PartitionSpec(axes or None)
    names = tuple(n for n, a in arrays.items() if a is not None)

    def on_shard(*shares):
        return _deform_conv2d(*{**dict.fromkeys(INPUT_NAMES), **dict(zip(names, shares))}.values(), *conv)

    in_specs = tuple(batch_spec if n in _BATCHED else jax.sharding.PartitionSpec() for n in names)
    return jax.shard_map(on_shard, mesh=mesh, in_specs=in_specs, out_specs=batch_spec, axis_names=frozenset(free),
                         check_vma=False)(*(arrays[n] for n in names))


_compiled_over_batch_shards = jax.jit(_over_batch_shards, static_argnums=1)


def _mesh_of(arrays):
    """The operands' mesh, or the context's; None if neither names one.

    A concrete operand (a constant the function closes over, or an eager call's array)
    gives its devices' Mesh: a jit whose arguments live on one device takes its device
    assignment from the arguments, and only a concrete Mesh tells shard_map the rest.
    Otherwise the first operand whose type names a mesh gives that abstract mesh.
    """
    present = [a for a in arrays.values() if a is not None]
    for array in present:
        if not isinstance(array, jax.core.Tracer) and isinstance(array.sharding, jax.sharding.NamedSharding):
            if array.sharding.mesh.size > 1:
                return array.sharding.mesh
    for array in present:
        mesh = jax.typeof(array).sharding.mesh
        if not mesh.empty:
            return mesh
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _batch_axes(mesh, free, arrays) -> tuple:
    """The mesh axes to split the batch along.

    Explicit axes are read from the types: those ``x``'s batch axis is split along, which
    ``offset`` and ``mask`` must share; no other axis of any operand may be split (a
    ValueError says which and how to reshard).  Auto axes carry no sharding in the types,
    so deformcp chooses: each in mesh order whose size, times those chosen before, divides
    the batch.
    """
    P = jax.sharding.PartitionSpec
    specs = {n: tuple(jax.typeof(a).sharding.spec) + (None,) * a.ndim for n, a in arrays.items() if a is not None}
    batch = _spec_axes(specs["x"][0])
    batch_entry = None if not batch else batch[0] if len(batch) == 1 else batch
    for name, spec in specs.items():
        spec = spec[:arrays[name].ndim]
        wanted = (batch,) if name in _BATCHED else ()
        if tuple(map(_spec_axes, spec)) != wanted + ((),) * (len(spec) - len(wanted)):
            raise ValueError(
                f"{name} is sharded as {P(*spec)} over Explicit mesh axes, but deformcp.jax.deform_conv2d splits "
                f"only the batch axis of x, offset and mask, alike, and needs the weight and bias whole: "
                f"reshard {name} to {P(batch_entry) if name in _BATCHED and batch else P()} (jax.sharding.reshard) "
                f"before the call")
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    share = arrays["x"].shape[0] // math.prod(mesh.shape[n] for n in batch)
    chosen = list(batch)
    for name in free:
        if types[name] == jax.sharding.AxisType.Auto and share % mesh.shape[name] == 0:
            chosen.append(name)
            share //= mesh.shape[name]
    return tuple(chosen)


def _spec_axes(entry) -> tuple:
    """The mesh axis names one entry of a PartitionSpec names, as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
