"""Backends: one small module per array library, each plain functions of (geometry, arrays).

Every backend module provides ``forward``, ``backward`` and ``im2col`` with the
signatures of :mod:`deformcp.backends.numpy_backend`: the validated
:class:`~deformcp.geometry.ConvGeometry`, the compute dtype, then the arrays, which
:mod:`deformcp.interop` has already made NumPy (CPU) or CuPy (CUDA) arrays on one device.
:func:`backend_for_device` picks the module for that device; CuPy is imported only
when CUDA arrays arrive.
"""

from __future__ import annotations

from types import ModuleType
from typing import Tuple

from ..interop import DL_CUDA

__all__ = ["backend_for_device"]


def backend_for_device(device: Tuple[int, int]) -> ModuleType:
    """The backend module for a DLPack device ``(device_type, device_id)``: CuPy's for CUDA, else NumPy's."""
    if device[0] == DL_CUDA:
        from . import cupy_backend

        return cupy_backend
    from . import numpy_backend

    return numpy_backend
