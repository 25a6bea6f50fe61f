"""Backends: one small module per array library, each plain functions of (geometry, arrays).

Every backend module provides ``forward``, ``backward`` and ``im2col`` with the
signatures of :mod:`deformcp.backends.numpy_backend`.  :func:`backend_for` picks
the module for an array; CuPy is imported only when a CuPy array arrives.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

__all__ = ["backend_for"]


def _is_cupy_array(array) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(array, cupy.ndarray)


def backend_for(arrays: dict) -> ModuleType:
    """Return the backend module for the given named arrays (``None`` entries ignored).

    Raises
    ------
    TypeError
        If an entry is neither a NumPy nor a CuPy array, or if NumPy and CuPy arrays are mixed.
    """
    kinds = {}
    for name, array in arrays.items():
        if array is None:
            continue
        if isinstance(array, np.ndarray):
            kinds[name] = "numpy"
        elif _is_cupy_array(array):
            kinds[name] = "cupy"
        else:
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, or any DLPack-capable array), "
                f"got {type(array).__module__}.{type(array).__qualname__}"
            )
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name} on {kind}" for name, kind in kinds.items())
        raise TypeError(f"all arrays must live on one device (all NumPy or all CuPy), got {listing}")
    if "cupy" in kinds.values():
        from . import cupy_backend

        return cupy_backend
    from . import numpy_backend

    return numpy_backend
