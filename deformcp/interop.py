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
  PyTorch's current stream (made CuPy's current stream by :func:`on_stream`), so the
  producer's work is ordered before the kernels and the results are ready on that
  stream; and CuPy allocates the outputs and the scratch space from PyTorch's caching
  allocator (:func:`allocator_from_torch`), so one pool holds the card's memory.
* JAX: CPU arrays are read through ``__array__``, which is zero-copy and keeps
  bfloat16 (``np.from_dlpack`` refuses it); results go back with ``jax.device_put``,
  which aliases an aligned NumPy buffer rather than copying it.
* Anything else with ``__dlpack__``: ``numpy.from_dlpack`` or ``cupy.from_dlpack``
  in, and ``x.__array_namespace__().from_dlpack`` out where ``x`` has an array
  namespace; otherwise the NumPy or CuPy result itself.

bfloat16 arrays on CUDA need a CuPy that has bfloat16 (CuPy >= 14, with NumPy >= 2.1.2
and ml_dtypes): elsewhere they are refused with a ``TypeError`` before anything is
read (:func:`cupy_bfloat16_missing`), and the other dtypes still run.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

__all__ = ["Call", "allocator_from_torch", "cupy_bfloat16_missing", "native", "on_stream"]

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
    if device[0] == DL_CUDA:
        _check_cupy_takes_dtypes(named)
    kind = kinds.get("x", "numpy")
    with _caller_stream(kind, device):
        arrays = {name: None if array is None else _to_native(array, kinds[name], device)
                  for name, array in named.items()}
        yield Call(arrays, kind, device, named.get("x"))


def _dtype_name(array) -> str:
    """``bfloat16`` for a NumPy, CuPy or JAX dtype and for ``torch.bfloat16`` alike; '' without a dtype."""
    return str(getattr(array, "dtype", "")).rsplit(".", 1)[-1]


def cupy_bfloat16_missing() -> Optional[str]:
    """Why CuPy cannot hold bfloat16 arrays in this environment, or ``None`` where it can.

    CuPy has bfloat16 (as ``ml_dtypes.bfloat16``) from version 14, and turns it on only
    when NumPy is 2.1.2 or newer (older NumPy crashes on its bfloat16 loops) and
    ml_dtypes can be imported.  Imports CuPy.

    Returns
    -------
    str or None
        What is missing, e.g. ``"CuPy 13.6.0 (bfloat16 needs CuPy >= 14)"``; ``None`` when nothing is.
    """
    import cupy

    missing = []
    major = re.match(r"\d+", cupy.__version__)
    if major is None or int(major.group()) < 14:
        missing.append(f"CuPy {cupy.__version__} (bfloat16 needs CuPy >= 14)")
    if np.lib.NumpyVersion(np.__version__) < "2.1.2":
        missing.append(f"NumPy {np.__version__} (CuPy enables bfloat16 from NumPy 2.1.2)")
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        missing.append("no ml_dtypes")
    return "; ".join(missing) or None


def _check_cupy_takes_dtypes(named: Dict[str, object]) -> None:
    """Refuse bfloat16 CUDA arrays, naming the first, where CuPy has no bfloat16; read nothing."""
    for name, array in named.items():
        if array is not None and _dtype_name(array) == "bfloat16":
            reason = cupy_bfloat16_missing()
            if reason is not None:
                raise TypeError(
                    f"{name} is a bfloat16 array on CUDA, which needs CuPy >= 14 with NumPy >= 2.1.2 and "
                    f"ml_dtypes; found {reason}. pip install 'deformcp[cuda13]' (or [cuda12]) brings them; "
                    "float16, float32 and float64 run as they are")
            return


class _StreamPointer:
    """A raw ``cudaStream_t`` (an int) that speaks the CUDA stream protocol, for ``Stream.from_external``."""

    def __init__(self, pointer: int):
        self.pointer = int(pointer)

    def __cuda_stream__(self) -> Tuple[int, int]:
        return (0, self.pointer)


@contextlib.contextmanager
def on_stream(stream) -> Iterator[None]:
    """Make a stream CuPy does not own CuPy's current stream inside the block.

    Parameters
    ----------
    stream : object or int
        Anything with ``__cuda_stream__`` (a ``torch.cuda.Stream``, a CuPy stream), a
        PyTorch stream older than that protocol, or a raw ``cudaStream_t`` pointer (the
        stream XLA hands a ``buffer_callback``).

    Notes
    -----
    Uses ``cupy.cuda.Stream.from_external``; ``cupy.cuda.ExternalStream`` is deprecated
    from CuPy 14 (it warns on every call) and is used only by a CuPy that has nothing else.
    The caller selects the stream's device first (``cupy.cuda.Device``).
    """
    import cupy

    if not hasattr(stream, "__cuda_stream__"):
        # A torch.cuda.Stream from before the protocol has cuda_stream; XLA's stream is an int.
        stream = _StreamPointer(getattr(stream, "cuda_stream", stream))
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        wrapped = from_external(stream)
    else:  # CuPy 13
        wrapped = cupy.cuda.ExternalStream(stream.__cuda_stream__()[1], cupy.cuda.Device().id)
    with wrapped:
        yield


def allocator_from_torch():
    """A CuPy allocator that takes device memory from PyTorch's caching allocator.

    Each block is allocated for CuPy's current stream (inside a call with PyTorch
    tensors, PyTorch's current stream) and handed back to PyTorch when CuPy frees it,
    so memory freed by one library is reused by the other instead of being held twice.
    Use it for a scope with ``cupy.cuda.using_allocator(allocator_from_torch())``.
    Imports CuPy and PyTorch.

    Returns
    -------
    callable
        ``malloc(size) -> cupy.cuda.MemoryPointer``, the form CuPy's allocators take.
    """
    import cupy
    import torch

    alloc, delete = torch.cuda.caching_allocator_alloc, torch.cuda.caching_allocator_delete
    current_stream = cupy.cuda.get_current_stream

    def malloc(size: int, device_id: int) -> int:
        return alloc(size, device_id, current_stream().ptr)

    def free(pointer: int, device_id: int) -> None:
        # An output can outlive the interpreter's teardown of torch; the driver frees it then.
        if not sys.is_finalizing():
            delete(pointer)

    return cupy.cuda.PythonFunctionAllocator(malloc, free).malloc


@contextlib.contextmanager
def _caller_stream(kind: str, device: Tuple[int, int]) -> Iterator[None]:
    """Make the caller's stream CuPy's current stream for the call (CUDA only).

    Conversions pass CuPy's current stream to each producer's ``__dlpack__``, which
    orders the producer's pending work before it; the kernels then run on it, so the
    results are ready on the stream the caller is using.  For PyTorch that is
    ``torch.cuda.current_stream()``, and CuPy allocates from PyTorch's caching allocator
    for the call; for CuPy, JAX and others it is CuPy's own current stream and memory
    pool (JAX's ``from_dlpack`` orders its reads after that stream on the way back).
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

        with on_stream(torch.cuda.current_stream(device[1])), cupy.cuda.using_allocator(allocator_from_torch()):
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
