"""How long each kernel instance takes to become launchable: ``python -m benchmarks.device.kernels OUT.json``.

Every instance (3 stages x 4 dtypes x 2 index widths) is fetched with
``deformcp.backends.cuda_kernels.get_kernel`` on device 0, timed one by one, in a fresh
process (so the in-process memo is empty).  Whether that compiles with NVRTC or loads
the binary from CuPy's disk cache depends on ``CUPY_CACHE_DIR``: ``device_check`` runs
this twice over one fresh cache folder, the first time compiling everything, the second
loading from the cache.  The first instance of a process also pays for loading NVRTC.
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
    """``[{stage, dtype, index_bits, seconds}]``, one per instance, in the order fetched."""
    import cupy

    from deformcp.backends import cuda_kernels

    device = cupy.cuda.Device().id
    rows = []
    for stage in cuda_kernels.STAGES:
        for dtype in cuda_kernels.SCALAR_TYPES:
            for bits in cuda_kernels.INDEX_TYPES:
                start = time.perf_counter()
                cuda_kernels.get_kernel(device, stage, dtype, bits)
                rows.append({"stage": stage, "dtype": dtype, "index_bits": bits,
                             "seconds": time.perf_counter() - start})
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
