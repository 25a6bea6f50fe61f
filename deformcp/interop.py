"""Arrays in and out: any DLPack array becomes a NumPy or CuPy array for the backends.

Data flows one way.  :func:`native` takes the caller's named arrays, checks that
each is an array and that all live on one device, and views each as a NumPy array
(CPU) or a CuPy array (CUDA) without copying; :meth:`Call.back` turns a result into
the array type of ``x`` on ``x``'s device.  NumPy and CuPy arrays pass straight
through, untouched.  ``docs/interop.md`` states the rules.

Which library an array comes from only matters at the edges:

* PyTorch: tensors are detached first (DLPack refuses tensors that require grad;
  the plain API returns plain results), and bfloat16 crosses as an int16 view
  because NumPy's DLPack import refuses bfloat16.  On CUDA everything runs on
  PyTorch's current stream, wrapped as a CuPy ``ExternalStream``, so the producer's
  work is ordered before the kernels and the results are ready on that stream.
* JAX: CPU arrays are read through ``__array__``, which is zero-copy and keeps
  bfloat16 (``np.from_dlpack`` refuses it); results go back with ``jax.device_put``,
  which aliases an aligned NumPy buffer rather than copying it.
* Anything else with ``__dlpack__``: ``numpy.from_dlpack`` or ``cupy.from_dlpack``
  in, and ``x.__array_namespace__().from_dlpack`` out where ``x`` has an array
  namespace; otherwise the NumPy or CuPy result itself.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

__all__ = ["Call", "native"]

# DLPack device types (DLDeviceType); the backends run on these two.
DL_CPU = 1
DL_CUDA = 2
_DEVICE_NAMES = {DL_CPU: "cpu", DL_CUDA: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                 10: "rocm", 13: "cuda_managed", 14: "oneapi"}


@dataclass(frozen=True)
class Call:
    """One call at the API boundary: the arrays as the backends see them, and how to go back.

    Attributes
    ----------
    arrays : dict
        The caller's arrays by name, each a NumPy (CPU) or CuPy (CUDA) array, ``None`` kept.
    kind : str
        The library of ``x``: ``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"`` or ``"dlpack"``.
    device : (int, int)
        The DLPack device ``(device_type, device_id)`` every array lives on.
    like : object
        ``x`` itself, whose type and device the results take.
    """

    arrays: Dict[str, object]
    kind: str
    device: Tuple[int, int]
    like: object

    def back(self, result):
        """Return ``result`` (a NumPy or CuPy array, or None) as the caller's array type, zero-copy where possible."""
        if result is None or self.kind in ("numpy", "cupy"):
            return result
        if self.kind == "torch":
            return _torch_from(result)
        if self.kind == "jax":
            return _jax_from(result, self.like)
        namespace = getattr(self.like, "__array_namespace__", None)
        return result if namespace is None else namespace().from_dlpack(result)


# The array class of each library recognised by name; a library not yet imported has no arrays.
_ARRAY_CLASSES = {"cupy": "ndarray", "torch": "Tensor", "jax": "Array"}


def _kind(array) -> Optional[str]:
    """The library an array comes from, or None for something that is not an array."""
    if isinstance(array, np.ndarray):
        return "numpy"
    for kind, class_name in _ARRAY_CLASSES.items():
        module = sys.modules.get(kind)
        if module is not None and isinstance(array, getattr(module, class_name)):
            return kind
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        return "dlpack"
    return None


def _device(name: str, array, kind: str) -> Tuple[int, int]:
    if kind == "numpy":
        return (DL_CPU, 0)
    if kind == "jax":
        _reject_tracer(name, array)
    device_type, device_id = array.__dlpack_device__()
    device = (int(device_type), int(device_id))
    if device[0] not in (DL_CPU, DL_CUDA):
        raise TypeError(f"{name} lives on a {_device_name(device)} device; deformcp runs on the CPU and on CUDA")
    return device


def _device_name(device: Tuple[int, int]) -> str:
    name = _DEVICE_NAMES.get(device[0], f"DLPack device type {device[0]}")
    return name if device[0] == DL_CPU else f"{name}:{device[1]}"


def _reject_tracer(name: str, array) -> None:
    jax = sys.modules["jax"]
    if isinstance(array, jax.core.Tracer):
        raise TypeError(
            f"{name} is a traced JAX value (inside jit, grad or vmap); use deformcp.jax.deform_conv2d there, "
            "the plain API needs concrete arrays"
        )


@contextlib.contextmanager
def native(**named) -> Iterator[Call]:
    """Check and convert the caller's arrays; the backend work runs inside the ``with`` block.

    Parameters
    ----------
    **named : array or None
        The arrays by argument name; the one named ``x`` decides the result type.

    Yields
    ------
    Call
        The converted arrays and the way back to the caller's type.

    Raises
    ------
    TypeError
        If an argument is not an array (naming it), if the arrays live on different
        devices, or on a device other than the CPU or CUDA.
    """
    kinds, devices = {}, {}
    for name, array in named.items():
        if array is None:
            continue
        kind = _kind(array)
        if kind is None:
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any array with __dlpack__), "
                f"got {type(array).__module__}.{type(array).__qualname__}"
            )
        kinds[name] = kind
        devices[name] = _device(name, array, kind)
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {_device_name(device)}" for name, device in devices.items())
        raise TypeError(f"all arrays must live on one device, got {listing}")
    device = next(iter(devices.values()), (DL_CPU, 0))
    kind = kinds.get("x", "numpy")
    with _caller_stream(kind, device):
        arrays = {name: None if array is None else _to_native(array, kinds[name], device)
                  for name, array in named.items()}
        yield Call(arrays, kind, device, named.get("x"))


@contextlib.contextmanager
def _caller_stream(kind: str, device: Tuple[int, int]) -> Iterator[None]:
    """Make the caller's stream CuPy's current stream for the call (CUDA only).

    Conversions pass CuPy's current stream to each producer's ``__dlpack__``, which
    orders the producer's pending work before it; the kernels then run on it, so the
    results are ready on the stream the caller is using.  For PyTorch that is
    ``torch.cuda.current_stream()``; for CuPy, JAX and others CuPy's own current stream
    (JAX's ``from_dlpack`` orders its reads after that stream on the way back).
    """
    if device[0] != DL_CUDA:
        yield
        return
    import cupy

    with cupy.cuda.Device(device[1]):
        if kind != "torch":
            yield
            return
        import torch

        stream = torch.cuda.current_stream(device[1])
        with cupy.cuda.ExternalStream(stream.cuda_stream, device[1]):
            yield


def _to_native(array, kind: str, device: Tuple[int, int]):
    if kind in ("numpy", "cupy"):
        return array
    if kind == "torch":
        return _torch_to(array, device)
    if kind == "jax" and device[0] == DL_CPU:
        # __array__ views the CPU buffer (read-only) and keeps bfloat16, unlike np.from_dlpack.
        return np.asarray(array)
    return _from_dlpack(array, device)


def _from_dlpack(array, device: Tuple[int, int]):
    if device[0] == DL_CPU:
        return np.from_dlpack(array)
    import cupy

    return cupy.from_dlpack(array)


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes comes with JAX and with deformcp[bf16]
        raise TypeError("bfloat16 arrays need the ml_dtypes package: pip install 'deformcp[bf16]'") from None
    return ml_dtypes.bfloat16


def _torch_to(tensor, device: Tuple[int, int]):
    import torch

    tensor = tensor.detach()
    if tensor.dtype != torch.bfloat16:
        return _from_dlpack(tensor, device)
    # DLPack consumers refuse bfloat16: cross as int16 bits, then view them as ml_dtypes.bfloat16.
    return _from_dlpack(tensor.view(torch.int16), device).view(_bfloat16())


def _torch_from(array):
    import torch

    if np.dtype(array.dtype).name != "bfloat16":
        return torch.from_dlpack(array)
    return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)


def _jax_from(array, like):
    import jax

    if isinstance(array, np.ndarray):
        # device_put aliases an aligned host buffer instead of copying, and takes bfloat16 as is.
        return jax.device_put(array, like.sharding)
    return jax.dlpack.from_dlpack(array)
