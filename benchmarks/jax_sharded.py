"""deformcp.jax with the batch split over two CPU devices against one device, side by side:
``python -m benchmarks.jax_sharded`` from the clone's root.

XLA splits the CPU into two host devices (``--xla_force_host_platform_device_count=2``,
set here before JAX starts) and the same jitted forward, and forward + all five
gradients, run on one device and with x, offset and mask split along the batch over
both.  Calls alternate between the two versions after untimed compilation calls; the
figures are medians, and the ratio is split / one device.  With
``DEFORMCP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` each call of the CPU backend uses
one thread (BLAS included: with DEFORMCP_NUM_THREADS=1 the backend leaves BLAS's own
threads alone), so on two idle cores the ratio shows whether the two shares run in
parallel (ideal 0.5); with the default (one worker per CPU) the one-device call
already uses every core.  Figures are recorded in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def _start_jax_with_two_cpu_devices():
    """Import JAX with XLA's CPU split in two; here, not at import, so that asv's discovery
    of this folder's modules leaves its process's JAX alone."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    devices = jax.devices()
    assert len(devices) == 2, f"JAX had started before the flag was set: {devices}"
    return jax


def _inputs(batch, channels, size, rng):
    import jax.numpy as jnp

    x = rng.standard_normal((batch, channels, size, size))
    offset = rng.normal(0, 2, (batch, 18, size, size))
    mask = rng.uniform(0, 1, (batch, 9, size, size))
    weight = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)
    bias = rng.standard_normal(channels)
    return [jnp.asarray(a, jnp.float32) for a in (x, offset, mask, weight, bias)]


def _forward(x, offset, mask, weight, bias):
    import deformcp.jax as dj

    return dj.deform_conv2d(x, offset, mask, weight, bias, padding=1)


def _training(x, offset, mask, weight, bias):
    import jax
    import jax.numpy as jnp

    return jax.grad(lambda *a: jnp.sum(_forward(*a) ** 2), argnums=tuple(range(5)))(x, offset, mask, weight, bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    jax = _start_jax_with_two_cpu_devices()
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    arrays = _inputs(args.batch, args.channels, args.size, np.random.default_rng(0))
    one = [jax.device_put(a, devices[0]) for a in arrays]
    mesh = jax.make_mesh((2,), ("batch",), axis_types=(AxisType.Auto,))
    split = [jax.device_put(a, NamedSharding(mesh, P("batch") if k < 3 else P())) for k, a in enumerate(arrays)]

    report = {"shape": vars(args), "DEFORMCP_NUM_THREADS": os.environ.get("DEFORMCP_NUM_THREADS"),
              "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "jax": jax.__version__}
    for name, function in (("forward", _forward), ("forward + backward", _training)):
        compiled = jax.jit(function)
        times = {"one device": [], "split over 2": []}
        for _ in range(2):  # compile and warm both
            jax.block_until_ready(compiled(*one))
            jax.block_until_ready(compiled(*split))
        for _ in range(args.repeats):
            for label, operands in (("one device", one), ("split over 2", split)):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*operands))
                times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        report[name] = {**{f"{label} ms": round(m, 2) for label, m in medians.items()},
                        "ratio split / one": round(medians["split over 2"] / medians["one device"], 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
