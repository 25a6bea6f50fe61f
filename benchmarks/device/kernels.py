"""How long each kernel instance takes to become launchable: ``python -m benchmarks.device.kernels OUT.json``.

Every instance of every stage (``cuda_kernels.name_expressions``) is made ready as the
loader makes it, one ``cupy.RawModule`` per instance from ``cuda_kernels.kernel_source``
with ``cuda_kernels.COMPILE_OPTIONS``, on device 0, timed one by one.  Whether that
compiles with NVRTC or loads the binary from CuPy's disk cache depends on
``CUPY_CACHE_DIR``: ``device_check`` runs this twice, in two processes, over one fresh
cache folder, the first time compiling everything, the second loading from the cache
(which then serves the later steps too).  The first instance of a process also pays for
loading NVRTC.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List

__all__ = ["main", "instance_times"]


def instance_times() -> List[dict]:
    """``[{stage, instance, seconds}]``, one per template instance, in the order made ready."""
    import cupy

    from deformcp.backends import cuda_kernels

    rows = []
    with cupy.cuda.Device(0):
        for stage in cuda_kernels.STAGES:
            source = cuda_kernels.kernel_source(stage)
            for expression in cuda_kernels.name_expressions(stage):
                start = time.perf_counter()
                module = cupy.RawModule(code=source, options=cuda_kernels.COMPILE_OPTIONS,
                                        name_expressions=(expression,))
                module.get_function(expression)  # compiles, or loads from the disk cache
                rows.append({"stage": stage, "instance": expression, "seconds": time.perf_counter() - start})
    return rows


def main(argv: List[str]) -> int:
    """Write the times, and the cache folder they were taken with, to the JSON file named by the argument."""
    if len(argv) != 1:
        print("usage: python -m benchmarks.device.kernels OUT.json", file=sys.stderr)
        return 2
    import cupy

    rows = instance_times()
    record = {"cupy": cupy.__version__, "cache_dir": os.environ.get("CUPY_CACHE_DIR"), "instances": rows,
              "total_s": sum(row["seconds"] for row in rows)}
    Path(argv[0]).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
