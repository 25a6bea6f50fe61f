"""How many threads each library may use, stated in the output rather than assumed.

The comparison gives every peer all the cores this process may run on
(:func:`cpu_threads`).  NumPy's BLAS cannot be told from Python without an extra
package, so it is *asked* (:func:`numpy_blas_threads`): OpenBLAS uses all cores
unless ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np

__all__ = ["cpu_threads", "numpy_blas_threads", "numpy_blas_name"]

# Symbol names of OpenBLAS's thread query across its builds: plain, NumPy's wheels
# (scipy-openblas, 64-bit integers) and their 32-bit-integer variant.
_OPENBLAS_QUERIES = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
                     "scipy_openblas_get_num_threads", "openblas_get_num_threads64_")


def cpu_threads() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def numpy_blas_name() -> str:
    """The BLAS NumPy was built against, e.g. ``scipy-openblas 0.3.31``."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # older NumPy without mode="dicts"
        return "unknown BLAS"
    return f"{blas.get('name', 'unknown BLAS')} {blas.get('version', '')}".strip()


def numpy_blas_threads() -> Optional[int]:
    """The thread count of the OpenBLAS loaded by NumPy, or ``None`` where it cannot be asked."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _OPENBLAS_QUERIES:
            query = getattr(lib, symbol, None)
            if query is not None:
                return int(query())
    return None
