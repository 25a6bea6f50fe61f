"""``python -m deformcp``: report versions and backends, check each backend, time it.

For every backend found (the CPU always; the GPU when CuPy sees a device) the
forward pass and all five gradients of a small built-in example are compared with
the float64 loop oracle (:mod:`deformcp.testing`), in float32 and float64.
A short timing table follows.  The exit status is non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import time
from dataclasses import dataclass
from typing import Callable, List

import numpy as np

from . import __version__
from .api import INPUT_NAMES, deform_conv2d, deform_conv2d_backward
from .geometry import ConvGeometry
from .testing import TOLERANCE, loop_deform_conv2d, loop_deform_conv2d_backward, relative_error


@dataclass(frozen=True)
class Backend:
    """A backend as the self-check sees it: how to move arrays there, and how to wait for it."""

    name: str
    to_device: Callable[[np.ndarray], object]
    to_host: Callable[[object], np.ndarray]
    synchronize: Callable[[], None]


def find_backends() -> List[Backend]:
    """The CPU backend, and the CUDA backend when CuPy imports and sees a device."""
    found = [Backend("cpu (NumPy/SciPy)", np.asarray, np.asarray, lambda: None)]
    try:
        import cupy
    except ImportError:
        return found
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return found
    except cupy.cuda.runtime.CUDARuntimeError:
        return found
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    found.append(Backend(f"cuda (CuPy, {name})", cupy.asarray, cupy.asnumpy,
                         lambda: cupy.cuda.get_current_stream().synchronize()))
    return found


def _versions() -> str:
    """Versions of deformcp, Python and the installed array libraries (from metadata: nothing imported)."""
    parts = [f"deformcp {__version__}", f"Python {platform.python_version()}"]
    for dist in ("numpy", "scipy", "ml_dtypes", "cupy-cuda13x", "cupy-cuda12x", "torch", "jax"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _example(rng: np.random.Generator) -> dict:
    """A small DCNv2 problem with groups, offset groups, stride, dilation and asymmetric padding."""
    geom = ConvGeometry(batch=2, in_channels=4, height=9, width=8, out_channels=6, kernel_h=3, kernel_w=2,
                        stride=(1, 2), padding=(1, 0, 2, 1), dilation=(2, 1), groups=2, offset_groups=2,
                        has_mask=True, has_bias=True)
    return dict(x=rng.standard_normal(geom.x_shape), offset=rng.normal(0.0, 2.0, geom.offset_shape),
                mask=rng.uniform(0.0, 1.0, geom.mask_shape), weight=rng.standard_normal(geom.weight_shape),
                bias=rng.standard_normal(geom.out_channels), grad_out=rng.standard_normal(geom.out_shape),
                geometry=dict(stride=geom.stride, padding=geom.padding, dilation=geom.dilation))


def check(backend: Backend, example: dict, expected: dict) -> List[tuple]:
    """Compare the backend's forward and five gradients with the reference; return result rows."""
    rows = []
    for dtype in ("float32", "float64"):
        arrays = {k: backend.to_device(example[k].astype(dtype)) for k in ("grad_out", *INPUT_NAMES)}
        inputs = [arrays[k] for k in INPUT_NAMES]
        y = deform_conv2d(*inputs, **example["geometry"])
        grads = deform_conv2d_backward(arrays["grad_out"], *inputs, **example["geometry"])
        results = [("forward", y, expected["forward"])]
        results += [(f"grad_{n}", g, expected[n]) for n, g in zip(INPUT_NAMES, grads)]
        for what, got, want in results:
            err = relative_error(backend.to_host(got), want)
            rows.append((backend.name, dtype, what, err, err <= TOLERANCE[dtype]))
    return rows


def _median_ms(fn: Callable[[], object], synchronize: Callable[[], None], repeats: int) -> float:
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def timing(backend: Backend, rng: np.random.Generator, repeats: int) -> tuple:
    """Median forward and forward+backward times (ms) for B=8, C=C_out=64, 64x64, 3x3, padding 1, float32."""
    shape = dict(x=(8, 64, 64, 64), offset=(8, 18, 64, 64), mask=(8, 9, 64, 64), weight=(64, 64, 3, 3))
    x = rng.standard_normal(shape["x"], dtype=np.float32)
    offset = rng.normal(0.0, 2.0, shape["offset"]).astype(np.float32)
    mask = rng.uniform(0.0, 1.0, shape["mask"]).astype(np.float32)
    weight = (rng.standard_normal(shape["weight"], dtype=np.float32) / 24).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    grad_out = rng.standard_normal((8, 64, 64, 64), dtype=np.float32)
    x, offset, mask, weight, bias, grad_out = map(backend.to_device, (x, offset, mask, weight, bias, grad_out))

    def forward():
        return deform_conv2d(x, offset, mask, weight, bias, padding=1)

    def training_step():
        forward()
        return deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, padding=1)

    return _median_ms(forward, backend.synchronize, repeats), _median_ms(training_step, backend.synchronize, repeats)


# The comparison with other implementations was ``python -m deformcp bench`` before it moved
# out of the package; whoever types that still gets told where it went.
COMPARISON_MOVED = ("the comparison with other implementations is not part of the installed package: "
                    "from a clone of the repository, run `python -m benchmarks.compare` (docs/benchmarks.md)")


def _at_least_one(text: str) -> int:
    """argparse type of ``--repeats``: a whole number of at least 1 (a median of no runs is no figure)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deformcp``."""
    cli = argparse.ArgumentParser(
        prog="python -m deformcp", description=__doc__.splitlines()[0],
        epilog=f"There are no subcommands; {COMPARISON_MOVED}.")
    cli.add_argument("--version", action="version", version=f"deformcp {__version__}")
    cli.add_argument("--repeats", type=_at_least_one, default=5,
                     help="timed runs per measurement, at least 1 (median shown; default 5)")
    cli.add_argument("--no-timing", action="store_true", help="skip the timing table")
    return cli


def main(argv: List[str]) -> int:
    """Run the self-check; return the exit status (0 when every check passes).

    Bad arguments exit through argparse (status 2, the option named) before any work.
    """
    cli = parser()
    if argv[:1] == ["bench"]:
        cli.error(COMPARISON_MOVED)
    args = cli.parse_args(argv)

    print(_versions())
    backends = find_backends()
    print("backends:", "; ".join(b.name for b in backends))
    if len(backends) == 1:
        print("  (no GPU backend: CuPy is not installed or sees no CUDA device)")

    example = _example(np.random.default_rng())
    inputs = [example[k] for k in INPUT_NAMES]
    expected = dict(forward=loop_deform_conv2d(*inputs, **example["geometry"]),
                    **loop_deform_conv2d_backward(example["grad_out"], *inputs, **example["geometry"]))

    print("\ncheck against the float64 loop oracle (relative error):")
    failures = 0
    for backend in backends:
        for name, dtype, what, err, ok in check(backend, example, expected):
            failures += not ok
            print(f"  {name:<28} {dtype:<8} {what:<12} {err:9.2e}  {'ok' if ok else 'FAIL'}")

    if not args.no_timing:
        print("\ntiming, float32, B=8 C=64 64x64 C_out=64 3x3 padding 1 (median of "
              f"{args.repeats}):")
        print(f"  {'backend':<28} {'forward':>10} {'fwd+bwd':>10}")
        rng = np.random.default_rng()
        for backend in backends:
            fwd, step = timing(backend, rng, args.repeats)
            print(f"  {backend.name:<28} {fwd:8.1f} ms {step:8.1f} ms")

    print(f"\n{'all checks passed' if not failures else f'{failures} checks FAILED'}")
    return 1 if failures else 0
