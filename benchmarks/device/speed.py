"""Speed and memory on a CUDA device, side by side: ``python -m benchmarks.device.speed OUT.json [options]``.

For each shape, dtype and task (``forward``; ``training``: the forward, then the
gradients of all five inputs), on the same inputs:

``deformcp``
    the plain functions on CuPy arrays (CuPy's current stream and memory pool);
``torchvision``
    ``torchvision.ops.deform_conv2d``, its gradients by autograd;
``deformcp.torch``
    deformcp's PyTorch operator with autograd: the adapter's host overhead is counted;
``deformcp.jax``
    ``deformcp.jax.deform_conv2d`` under ``jax.jit`` (``jax.vjp`` for training);
``deformcp deterministic``
    the plain functions with ``deterministic=True`` (training only: ``grad_x`` gathered
    in a fixed order instead of added with atomics), so the record shows what that costs.

Inputs are drawn in float32 (``benchmarks.shapes.make_inputs``) and rounded to the dtype
by each library (round to nearest even everywhere, so all get the same values).

Times: after the first call (compilation) and ``--warmup`` more, ``--repeats`` calls,
each timed alone with CUDA events recorded on the stream the implementation runs on
(CuPy's or PyTorch's current stream): the device's time from the call's first work to
its last, host gaps included.  XLA's stream has no event reachable from Python, so
``deformcp.jax`` is timed by the wall clock around the call and ``block_until_ready``.
The median and quartiles are reported.

Memory, from one more call: ``torch_peak_bytes`` is PyTorch's ``max_memory_allocated``
during the call above what was allocated before it (PyTorch implementations; deformcp's
calls with PyTorch tensors allocate there too); ``cupy_pool_bytes`` is how much CuPy's
memory pool grew in the call, emptied of cached blocks before it (an upper bound of
CuPy's peak; for ``deformcp.jax`` the only part measured, XLA's own buffers are not).

Each case also reports its forward output's relative error against ``deformcp``'s, so
that a fast wrong answer shows.  A case that cannot run (torchvision has no bfloat16
kernel, a library is missing) is recorded with the exception, never stops the others.

float32 runs with TF32 off (CuPy's default; PyTorch's ``allow_tf32`` set False); with
``--tf32`` only float32 runs, with ``CUPY_TF32=1`` (CuPy's switch for its own products),
PyTorch's ``allow_tf32`` on, and ``allow_tf32=True`` passed to deformcp's functions where
they take it (:func:`tf32_keywords`; the settings record which held).
``--device cpu`` runs the same harness on the CPU, timed by the wall clock, with no
memory figures: a check that this code runs, not figures to quote.  The JSON file is
rewritten after every case, so a run stopped by its time box keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..shapes import SHAPES, BenchShape, Inputs, dtype_named, make_inputs

__all__ = ["GPU_SHAPES", "IMPLEMENTATIONS", "SMOKE_SHAPE", "main", "tf32_keywords"]

GPU_SHAPES = (SHAPES["b8_c64_64x64"], BenchShape("b8_c256_64x64", 8, 256, 64, 64, 256),
              BenchShape("b2_c256_100x167", 2, 256, 100, 167, 256))
# The CPU smoke run's shape: small, symmetric padding (torchvision's), groups and offset groups.
SMOKE_SHAPE = BenchShape("smoke", 2, 4, 7, 6, 4, groups=2, offset_groups=2)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
TASKS = ("forward", "training")
IMPLEMENTATIONS = ("deformcp", "torchvision", "deformcp.torch", "deformcp.jax", "deformcp deterministic")
REFERENCE = "deformcp"


@dataclass
class _Prepared:
    """One implementation ready for one case.

    ``call`` runs it once and returns its outputs (forward output first) without waiting;
    ``finish`` waits for them; ``timed`` runs it once and returns its time in seconds;
    ``memory`` runs it once and returns its memory figures; ``to_numpy`` fetches an output.
    """

    call: Callable[[], tuple]
    finish: Callable[[tuple], None]
    timed: Callable[[], float]
    memory: Callable[[], dict]
    to_numpy: Callable[[object], np.ndarray]


class _Device:
    """The device the harness runs on, and how it times and measures there."""

    def __init__(self, gpu: bool):
        self.gpu = gpu

    def cupy_timer(self, call: Callable[[], tuple]) -> Callable[[], float]:
        if not self.gpu:
            return _wall_clock(call, lambda outputs: None)
        import cupy

        def timed() -> float:
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            call()
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) / 1e3

        return timed

    def torch_timer(self, call: Callable[[], tuple]) -> Callable[[], float]:
        if not self.gpu:
            return _wall_clock(call, lambda outputs: None)
        import torch

        def timed() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed

    def memory(self, call: Callable[[], tuple], finish: Callable[[tuple], None],
               torch_peak: bool) -> Callable[[], dict]:
        """A function that runs ``call`` once and returns its memory figures (none on the CPU)."""
        def measure() -> dict:
            if not self.gpu:
                return {}
            import cupy

            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            held = pool.total_bytes()
            if torch_peak:
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                allocated = torch.cuda.memory_allocated()
            outputs = call()
            finish(outputs)
            figures = {"cupy_pool_bytes": int(pool.total_bytes() - held)}
            if torch_peak:
                figures["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated() - allocated)
            return figures

        return measure


def _wall_clock(call: Callable[[], tuple], finish: Callable[[tuple], None]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        finish(call())
        return time.perf_counter() - start

    return timed


def tf32_keywords(function: Callable, tf32: bool) -> dict:
    """``{"allow_tf32": True}`` when TF32 is asked for and ``function`` takes that keyword, else ``{}``."""
    return {"allow_tf32": True} if tf32 and "allow_tf32" in inspect.signature(function).parameters else {}


def _prepare_deformcp(device: _Device, task: str, shape: BenchShape, host: Inputs, dtype_name: str,
                      tf32: bool = False, deterministic: Optional[bool] = None) -> _Prepared:
    import deformcp

    if device.gpu:
        import cupy

        to_device, to_numpy = cupy.asarray, cupy.asnumpy
        finish = lambda outputs: cupy.cuda.get_current_stream().synchronize()  # noqa: E731
    else:
        to_device, to_numpy, finish = np.asarray, np.asarray, lambda outputs: None
    rounded = host.astype(dtype_named(dtype_name))
    args = [to_device(a) for a in rounded.conv_args]
    grad_out = to_device(rounded.grad_out)

    forward = {**shape.kwargs, **tf32_keywords(deformcp.deform_conv2d, tf32)}
    backward = {**shape.kwargs, **tf32_keywords(deformcp.deform_conv2d_backward, tf32)}
    if deterministic is not None:
        backward["deterministic"] = deterministic

    def call() -> tuple:
        out = deformcp.deform_conv2d(*args, **forward)
        if task == "forward":
            return (out,)
        return (out, *deformcp.deform_conv2d_backward(grad_out, *args, **backward))

    return _Prepared(call, finish, device.cupy_timer(call), device.memory(call, finish, torch_peak=False), to_numpy)


def _prepare_torch(conv: Callable, device: _Device, task: str, shape: BenchShape, host: Inputs, dtype_name: str):
    """A PyTorch implementation with torchvision's call: ``conv(x, offset, weight, bias, ..., mask=mask)``."""
    import torch

    where = "cuda" if device.gpu else "cpu"
    dtype = getattr(torch, dtype_name)
    x, offset, mask, weight, bias = (torch.from_numpy(a).to(where).to(dtype) for a in host.conv_args)
    grad_out = torch.from_numpy(host.grad_out).to(where).to(dtype)
    top, left, bottom, right = shape.padding
    if (top, left) != (bottom, right):
        raise ValueError(f"torchvision pads symmetrically; padding {shape.padding} is not")
    kwargs = dict(stride=shape.stride, padding=(top, left), dilation=shape.dilation)
    finish = (lambda outputs: torch.cuda.synchronize()) if device.gpu else (lambda outputs: None)

    if task == "forward":
        def call() -> tuple:
            with torch.no_grad():
                return (conv(x, offset, weight, bias, mask=mask, **kwargs),)
    else:
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask, weight, bias)]

        def call() -> tuple:
            for leaf in leaves:
                leaf.grad = None
            lx, loffset, lmask, lweight, lbias = leaves
            out = conv(lx, loffset, lweight, lbias, mask=lmask, **kwargs)
            out.backward(grad_out)
            return (out.detach(), *(leaf.grad for leaf in leaves))

    def to_numpy(tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float64).numpy()

    return _Prepared(call, finish, device.torch_timer(call), device.memory(call, finish, torch_peak=True), to_numpy)


def _prepare_torchvision(device, task, shape, host, dtype_name):
    from torchvision.ops import deform_conv2d

    return _prepare_torch(deform_conv2d, device, task, shape, host, dtype_name)


def _prepare_deformcp_torch(device, task, shape, host, dtype_name):
    from deformcp.torch import deform_conv2d

    return _prepare_torch(deform_conv2d, device, task, shape, host, dtype_name)


def _prepare_deformcp_jax(device: _Device, task: str, shape: BenchShape, host: Inputs, dtype_name: str):
    import jax
    import jax.numpy as jnp

    import deformcp.jax as dj

    where = jax.devices("gpu" if device.gpu else "cpu")[0]
    dtype = jnp.dtype(dtype_name)
    args = [jax.device_put(a, where).astype(dtype) for a in host.conv_args]
    grad_out = jax.device_put(host.grad_out, where).astype(dtype)

    def conv(*arrays):
        return dj.deform_conv2d(*arrays, **shape.kwargs)

    if task == "forward":
        forward = jax.jit(conv)

        def call() -> tuple:
            return (forward(*args),)
    else:
        @jax.jit
        def training(arrays, g):
            out, vjp = jax.vjp(conv, *arrays)
            return (out, *vjp(g))

        def call() -> tuple:
            return training(args, grad_out)

    finish = jax.block_until_ready
    return _Prepared(call, finish, _wall_clock(call, finish), device.memory(call, finish, torch_peak=False),
                     lambda array: np.asarray(array.astype(jnp.float32), dtype=np.float64))


def _prepare_deformcp_deterministic(device, task, shape, host, dtype_name, tf32: bool = False):
    if task == "forward":
        raise ValueError("deterministic applies to the backward pass only")
    return _prepare_deformcp(device, task, shape, host, dtype_name, tf32=tf32, deterministic=True)


_PREPARE = {"deformcp": _prepare_deformcp, "torchvision": _prepare_torchvision,
            "deformcp.torch": _prepare_deformcp_torch, "deformcp.jax": _prepare_deformcp_jax,
            "deformcp deterministic": _prepare_deformcp_deterministic}


def _summary(samples: List[float]) -> dict:
    return {"median_ms": 1e3 * float(np.median(samples)), "q1_ms": 1e3 * float(np.percentile(samples, 25)),
            "q3_ms": 1e3 * float(np.percentile(samples, 75)), "runs": len(samples)}


def _run_case(device: _Device, shape: BenchShape, dtype_name: str, task: str, host: Inputs, args) -> dict:
    from deformcp.testing import relative_error

    case = {"shape": shape.name, "label": shape.label, "dtype": dtype_name, "task": task, "tf32": args.tf32,
            "results": {}}
    reference = None
    for name in args.implementations:
        try:
            extra = {"tf32": args.tf32} if name in ("deformcp", "deformcp deterministic") else {}
            prepared = _PREPARE[name](device, task, shape, host, dtype_name, **extra)
            outputs = prepared.call()  # the first call compiles; its output is checked
            prepared.finish(outputs)
            forward = prepared.to_numpy(outputs[0])
            del outputs
            for _ in range(args.warmup):
                prepared.finish(prepared.call())
            entry = _summary([prepared.timed() for _ in range(args.repeats)])
            entry.update(prepared.memory())
        except Exception as error:  # a library, a dtype or a device it lacks: recorded, the others go on
            message = str(error).strip().splitlines()
            case["results"][name] = {"skipped": f"{type(error).__name__}: {message[0] if message else ''}"}
            print(f"  {name}: {case['results'][name]['skipped']}", file=sys.stderr, flush=True)
            continue
        if name == REFERENCE:
            reference = forward
        elif reference is not None:
            entry["error_vs_deformcp"] = relative_error(forward, reference)
        case["results"][name] = entry
        print(f"  {name}: {entry['median_ms']:.3f} ms", file=sys.stderr, flush=True)
    return case


def _settings(device: _Device, args) -> dict:
    import deformcp

    settings = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": "gpu" if device.gpu else "cpu", "tf32": args.tf32, "warmup": args.warmup,
                "repeats": args.repeats, "seed": args.seed, "CUPY_TF32": os.environ.get("CUPY_TF32"),
                "deformcp_allow_tf32_keyword": bool(tf32_keywords(deformcp.deform_conv2d, True)),
                "timer": "CUDA events (deformcp.jax: wall clock)" if device.gpu else "wall clock"}
    try:
        import torch

        settings["torch"] = torch.__version__
        if device.gpu:
            settings["torch_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
            settings["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device.speed", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the JSON file to write (rewritten after every case)")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--tf32", action="store_true", help="float32 only, with TF32 on in CuPy and PyTorch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    return parser


def main(argv: List[str]) -> int:
    args = _parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        _parser().error("--repeats must be at least 1 and --warmup at least 0")
    device = _Device(args.device == "gpu")
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"  # CuPy reads it at its first float32 product
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    except ImportError:
        pass
    shapes = GPU_SHAPES if device.gpu else (SMOKE_SHAPE,)
    dtype_names = ("float32",) if args.tf32 else DTYPE_NAMES
    record: Dict[str, object] = {"settings": _settings(device, args), "cases": []}
    for shape in shapes:
        host = make_inputs(shape, args.seed)
        for dtype_name in dtype_names:
            for task in TASKS:
                print(f"{shape.name} {dtype_name} {task}{' tf32' if args.tf32 else ''}", file=sys.stderr, flush=True)
                record["cases"].append(_run_case(device, shape, dtype_name, task, host, args))
                args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
