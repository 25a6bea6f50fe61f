"""Which element types deformcp accepts, and which type it computes in.

float16 and bfloat16 (``ml_dtypes.bfloat16``, the type JAX uses) are computed in
float32 and rounded once at the end; float32 and float64 compute in their own
type.  All floating inputs of one call must share a dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SUPPORTED_DTYPE_NAMES", "common_dtype", "compute_dtype", "is_half"]

SUPPORTED_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
_HALF_NAMES = ("float16", "bfloat16")


def common_dtype(**arrays) -> np.dtype:
    """Return the one dtype shared by the given arrays, ignoring ``None`` entries.

    Raises
    ------
    TypeError
        If an array's dtype is not one of float16, bfloat16, float32, float64, is not
        in the machine's byte order, or if the arrays do not all share one dtype.  The
        message names the argument.
    """
    found = {}
    for name, array in arrays.items():
        if array is None:
            continue
        dtype = np.dtype(array.dtype)
        if not dtype.isnative:
            raise TypeError(
                f"{name} has non-native byte order ({dtype.str}); deformcp computes in the machine's byte "
                f"order: pass {name}.astype({dtype.newbyteorder('=').str!r})"
            )
        if dtype.name not in SUPPORTED_DTYPE_NAMES:
            raise TypeError(
                f"{name} must be a floating array of one of {', '.join(SUPPORTED_DTYPE_NAMES)}, "
                f"got dtype {dtype.name}"
            )
        found[name] = dtype
    dtypes = set(found.values())
    if len(dtypes) > 1:
        listing = ", ".join(f"{name}={dtype.name}" for name, dtype in found.items())
        raise TypeError(f"all floating inputs must share one dtype, got {listing}")
    return dtypes.pop()


def is_half(dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (stored in 16 bits, computed in float32)."""
    return np.dtype(dtype).name in _HALF_NAMES


def compute_dtype(dtype) -> np.dtype:
    """The dtype arithmetic is done in: float32 for the half types, the dtype itself otherwise."""
    return np.dtype(np.float32) if is_half(dtype) else np.dtype(dtype)
