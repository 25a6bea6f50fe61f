"""Peak memory of one forward pass, measured in a fresh process.

``tracemalloc`` sees only Python's allocator, not the native memory of NumPy's
BLAS, ONNX Runtime or OpenVINO, so the measure is the process's resident set
size, from the kernel.  Each measurement runs in a new Python process
(``python -m benchmarks.compare.memory PEER SHAPE``, from the clone's root) so that no other peer's
memory, and no allocator cache from an earlier run, is counted:

1. draw the inputs and prepare the peer (build and compile the model);
2. read the resident size, ``before``;
3. reset the kernel's high-water mark (``/proc/self/clear_refs``, Linux);
4. run the forward once; read the high-water mark, ``peak``.

The figure reported is ``peak - before``: the memory the forward call itself
needed on top of its inputs and compiled model, output included.  Where the
high-water mark cannot be reset, ``ru_maxrss`` is used instead; it may include a
higher peak from step 1, so the difference is then only a lower bound, and the
output says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["forward_peak_memory", "main"]

# The clone's root, where ``python -m benchmarks...`` finds this package: the child runs there.
REPO_ROOT = Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _measure(peer: str, shape_name: str, seed: int) -> dict:
    from ..shapes import make_inputs, shape_named
    from .peers import prepare_runner
    from .runner import FORWARD

    shape = shape_named(shape_name)
    runner = prepare_runner(peer, FORWARD, shape, make_inputs(shape, seed, with_grad_out=False), "cpu")
    gc.collect()
    before_kib = _status_kib("VmRSS")
    if before_kib is not None and _reset_high_water_mark():
        method = "VmHWM after resetting it (/proc/self/clear_refs), minus VmRSS before the call"
        outputs = runner()
        peak_kib = _status_kib("VmHWM")
    else:
        method = "ru_maxrss after the call minus before (cannot be reset: a lower bound)"
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outputs = runner()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del outputs
    return {"rss_before_bytes": 1024 * before_kib, "peak_bytes": 1024 * peak_kib,
            "forward_bytes": 1024 * (peak_kib - before_kib), "method": method}


def forward_peak_memory(peer: str, shape_name: str, seed: int = 0, timeout: float = 600.0) -> dict:
    """Measure the forward's peak memory for ``peer`` on the named shape, in a fresh process.

    Returns
    -------
    dict
        ``rss_before_bytes``, ``peak_bytes``, ``forward_bytes`` (their difference) and
        ``method``; or ``error`` with the child's message if it failed.
    """
    command = [sys.executable, "-m", __name__, peer, shape_name, "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: List[str]) -> int:
    """Child process: measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__.splitlines()[0])
    parser.add_argument("peer")
    parser.add_argument("shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(_measure(args.peer, args.shape, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
