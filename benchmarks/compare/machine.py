"""What the comparison runs on, stated in its output rather than assumed: the code, CPUs and BLAS threads.

Every peer is given all the CPUs this process may run on (:func:`cpu_threads`).
NumPy's BLAS is not set but reported (:func:`blas_libraries`), by threadpoolctl,
a dependency of deformcp made for exactly this: it knows every BLAS NumPy and
SciPy may load (OpenBLAS, MKL, BLIS, Accelerate) and asks each for its threads.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from threadpoolctl import threadpool_info

__all__ = ["blas_libraries", "cpu_threads", "deformcp_version"]


def deformcp_version() -> str:
    """deformcp's version, and the git commit when it runs from a checkout (figures are tied to code)."""
    import deformcp

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(deformcp.__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{deformcp.__version__} ({commit})" if commit else deformcp.__version__


def cpu_threads() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_libraries() -> str:
    """The BLAS libraries loaded in this process and their thread counts, e.g. ``openblas 0.3.31 (2 threads)``.

    Only what is loaded is listed: call it after NumPy (and SciPy, if the peer uses
    it) has been imported.
    """
    found = []
    for info in threadpool_info():
        if info["user_api"] == "blas":
            version = f" {info['version']}" if info.get("version") else ""
            found.append(f"{info['internal_api']}{version} ({info['num_threads']} threads)")
    return ", ".join(found) or "no BLAS found by threadpoolctl"
