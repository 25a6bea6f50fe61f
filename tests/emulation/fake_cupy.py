"""A stand-in for the part of CuPy that ``deformcp.backends.cupy_backend`` uses, built on
NumPy, whose ``RawModule`` runs the real kernel sources through the CPU emulation.

With it, the CuPy backend's own code (tiling, layouts, strides, argument lists, index
width, launch sizes) runs unchanged on a machine without a GPU.  It is stricter than
CuPy where CuPy would fail silently on a GPU:

* every kernel argument is checked against the kernel's parameter: a pointer must be a
  C-contiguous array of the parameter's element size, a scalar a NumPy scalar of the
  parameter's exact size (CuPy passes a Python int as ``long long`` whatever the kernel
  takes, which corrupts the arguments after it);
* a launch needs a non-empty grid and block, as CUDA does;
* ``empty`` fills with NaN, so an output element a kernel fails to write shows up;
* launches run their blocks, and the threads of a block between barriers, in a shuffled
  order (:data:`SCHEDULE_SEED`; see ``launcher.h``), so a result that depends on the
  schedule changes from run to run;
* cuBLAS (``cupy_backends.cuda.libs.cublas``, through ``ndarray.data.ptr``) is
  :mod:`fake_cublas`, which checks every product's pointers, leading dimensions, strides
  and types and computes it with NumPy.

For the interop layer and the JAX adapter it also has what they use of CuPy 14.2 around
the arrays, as strictly: ``__version__`` (:data:`VERSION`; :func:`pretending` answers as
an older CuPy), ``from_dlpack`` (of a :class:`CudaArray`, an array that says it lives on
CUDA device 0), current streams with ``Stream.from_external`` (the CUDA stream
protocol, checked as CuPy checks it) and a deprecated ``ExternalStream`` that warns as
CuPy 14 does, and thread-local allocators (``using_allocator``,
``PythonFunctionAllocator``) through which ``empty`` and ``zeros`` allocate.

Use :func:`installed` to swap it in for ``cupy`` while importing the backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np

from . import build, fake_cublas

MULTIPROCESSORS = 2
DEVICE_MEMORY = 16 * 2**30  # what the pretend device says it has (the GPU workspace default follows it)
# The CuPy version the stand-in answers as, unless a test is :func:`pretending` to be another.
VERSION = "14.2.0"


class ndarray(np.ndarray):
    """A NumPy array that says which (pretend) device it lives on, and where (``data.ptr``, for cuBLAS)."""

    data = property(fake_cublas.memory_pointer)

    @property
    def device(self) -> "Device":
        return Device(0)


class Device:
    """``cupy.cuda.Device``: a context manager that selects a device (there is only 0)."""

    def __init__(self, device: int = 0):
        if device != 0:
            raise ValueError(f"the emulation has one device, 0; got {device}")
        self.id = device

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        return None


def _wrap(array) -> ndarray:
    return array if type(array) is ndarray else np.asarray(array).view(ndarray)


def asarray(array, dtype=None) -> ndarray:
    return _wrap(np.array(array, dtype=dtype, copy=True))


def empty(shape, dtype=np.float64) -> ndarray:
    out = np.empty(shape, dtype=dtype)
    if out.dtype.kind == "f" or out.dtype.name == "bfloat16":
        out.fill(np.nan)
    return _allocated(out)


def zeros(shape, dtype=np.float64) -> ndarray:
    return _allocated(np.zeros(shape, dtype=dtype))


def _allocated(values: np.ndarray) -> ndarray:
    """``values`` as a device array, its memory taken from the allocator in use, if one is set."""
    array = _wrap(values)
    if _allocators:
        array.memory = _allocators[-1](array.nbytes)  # held as long as the array (and its views)
    return array


class CudaArray:
    """A DLPack producer that says it lives on CUDA device 0; ``from_dlpack`` turns it into an ``ndarray``.

    NumPy would refuse its capsule (CUDA memory), so the stand-in's ``from_dlpack`` reads
    the host array directly; ``dlpack_calls`` counts the times anything asked for it.
    """

    def __init__(self, values: np.ndarray):
        self.values = values
        self.dlpack_calls = 0

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def shape(self) -> tuple:
        return self.values.shape

    def __dlpack_device__(self) -> tuple:
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, **kwargs):
        self.dlpack_calls += 1
        raise BufferError("the stand-in's CUDA arrays are read by cupy.from_dlpack only")


def from_dlpack(array) -> ndarray:
    """``cupy.from_dlpack``: a view of a :class:`CudaArray`; bfloat16 only where this CuPy has it."""
    if not isinstance(array, CudaArray):
        raise TypeError(f"the stand-in imports CudaArray only, got {type(array).__name__}")
    array.dlpack_calls += 1
    if array.dtype.name == "bfloat16" and _major() < 14:
        raise NotImplementedError("CuPy does not support bfloat16 yet")  # CuPy 13's words
    return _wrap(array.values)


def _major() -> int:
    """The major version of the stand-in in ``sys.modules`` (the one deformcp sees)."""
    return int(sys.modules["cupy"].__version__.split(".")[0])


@contextlib.contextmanager
def pretending(version: str) -> Iterator[None]:
    """Inside :func:`installed`, answer as CuPy ``version`` (e.g. ``"13.6.0"``, which has no bfloat16)."""
    fake = sys.modules["cupy"]
    saved, fake.__version__ = fake.__version__, version
    try:
        yield
    finally:
        fake.__version__ = saved


class Stream:
    """``cupy.cuda.Stream``, as far as deformcp uses it: a pointer, ``from_external``, ``with``."""

    def __init__(self, ptr: int = 0):
        self.ptr = ptr
        self.foreign = None

    @classmethod
    def from_external(cls, obj) -> "Stream":
        """CuPy 14's checks, in its order: the protocol, a 2-tuple of ints, version 0."""
        try:
            version, pointer = obj.__cuda_stream__()
        except AttributeError as exc:
            raise TypeError(f"Object of type {type(obj).__name__} does not implement the CUDA stream protocol "
                            "(__cuda_stream__ method)") from exc
        if not isinstance(version, int) or not isinstance(pointer, int):
            raise TypeError("__cuda_stream__() must return (int, int)")
        if version != 0:
            raise TypeError(f"__cuda_stream__() returned unsupported version {version}")
        stream = cls(pointer)
        stream.foreign = obj
        return stream

    def __enter__(self) -> "Stream":
        _streams.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _streams.pop()


class ExternalStream(Stream):
    """``cupy.cuda.ExternalStream``, which CuPy 14 deprecates with a warning on every construction."""

    def __init__(self, ptr: int, device_id: int = -1):
        if _major() >= 14:
            warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead to interoperate with "
                          "external streams that implement the CUDA stream protocol.", DeprecationWarning,
                          stacklevel=2)
        super().__init__(ptr)


_NULL_STREAM = Stream(0)
_streams: List[Stream] = []
_allocators: List[Callable] = []


def get_current_stream() -> Stream:
    return _streams[-1] if _streams else _NULL_STREAM


@contextlib.contextmanager
def using_allocator(allocator: Callable) -> Iterator[None]:
    """``cupy.cuda.using_allocator``: ``allocator(size)`` serves this thread's allocations in the block."""
    _allocators.append(allocator)
    try:
        yield
    finally:
        _allocators.pop()


class _ExternalMemory:
    """What ``PythonFunctionAllocator`` hands out: ``malloc(size, device)`` now, ``free(ptr, device)`` on release."""

    def __init__(self, size: int, malloc: Callable, free: Callable):
        self.size, self._free = size, free
        self.ptr = malloc(size, 0) if size > 0 else 0

    def __del__(self):
        if self.ptr:
            self._free(self.ptr, 0)


class PythonFunctionAllocator:
    """``cupy.cuda.PythonFunctionAllocator(malloc, free)``; its ``malloc`` is the allocator."""

    def __init__(self, malloc_func: Callable, free_func: Callable):
        self._malloc, self._free = malloc_func, free_func

    def malloc(self, size: int) -> _ExternalMemory:
        return _ExternalMemory(size, self._malloc, self._free)


def ascontiguousarray(array) -> ndarray:
    return _wrap(np.ascontiguousarray(array))


def matmul(a, b) -> ndarray:
    return _wrap(np.matmul(a, b))


def argsort(array) -> ndarray:
    """``cupy.argsort``: always a stable sort (CuPy's only kind), int64 indices."""
    return _wrap(np.argsort(array, kind="stable").astype(np.int64))


def searchsorted(sorted_values, values) -> ndarray:
    return _wrap(np.searchsorted(sorted_values, values).astype(np.int64))


def arange(*args, dtype=None) -> ndarray:
    return _wrap(np.arange(*args, dtype=dtype))


@dataclass
class Launch:
    """One recorded kernel launch."""

    name: str
    grid: tuple
    block: tuple
    seed: int  # the emulation's schedule: order of the blocks, and of threads between barriers


launches: List[Launch] = []
# Launches run their blocks, and the threads of a block between barriers, in an order drawn
# from SCHEDULE_SEED and the launch's number (0: the natural order, every launch).
SCHEDULE_SEED = 1
_launch_numbers = itertools.count()


class RawKernel:
    """A compiled template instance; calling it runs the kernel on the CPU."""

    def __init__(self, library: build.EmulatedLibrary, name: str):
        self.name = name
        self._library = library
        self._entry = library.find(name)
        if self._entry < 0:
            raise RuntimeError(f"{name} is not an instance in the compiled source")
        self._sizes, self._element_sizes = library.describe(self._entry)

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"block {block} has more than 1024 threads")
        if shared_mem:
            raise ValueError("the emulation does not provide shared memory")
        if len(args) != len(self._sizes):
            raise TypeError(f"{self.name} takes {len(self._sizes)} arguments, got {len(args)}")
        keep = []  # the ctypes objects must live until the launch returns
        pointers = (ctypes.c_void_p * len(args))()
        for i, (arg, size, element_size) in enumerate(zip(args, self._sizes, self._element_sizes)):
            value = _argument(self.name, i, arg, size, element_size)
            keep.append(value)
            pointers[i] = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
        seed = 0 if SCHEDULE_SEED == 0 else hash((SCHEDULE_SEED, next(_launch_numbers))) % 2**64 or 1
        launches.append(Launch(self.name, grid, block, seed))
        self._library.launch(self._entry, grid, block, pointers, seed)


def _dims(dims, what: str) -> tuple:
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{what} must have 1 to 3 positive sizes (CUDA rejects an empty launch), got {dims}")
    return dims


def _argument(kernel: str, i: int, arg, size: int, element_size: int):
    where = f"{kernel} argument {i}"
    if element_size:
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{where} is a pointer to {element_size}-byte elements, got {type(arg).__name__}")
        if arg.dtype.itemsize != element_size:
            raise TypeError(f"{where} points to {element_size}-byte elements, got an array of {arg.dtype}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{where} is a non-contiguous array; a raw pointer cannot describe it")
        return ctypes.c_void_p(arg.ctypes.data)
    if isinstance(arg, np.ndarray):
        raise TypeError(f"{where} is a {size}-byte scalar, got an array")
    if not isinstance(arg, np.generic):
        raise TypeError(f"{where} is a {size}-byte scalar, got Python {type(arg).__name__} "
                        "(CuPy would pass it as a 64-bit value whatever the kernel expects)")
    if arg.dtype.itemsize != size:
        raise TypeError(f"{where} is a {size}-byte scalar, got {arg.dtype} ({arg.dtype.itemsize} bytes)")
    return ctypes.create_string_buffer(arg.tobytes(), size)


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)`` over the emulation."""

    def __init__(self, code: Optional[str] = None, *, options=(), name_expressions=None, **kwargs):
        if code is None or kwargs:
            raise TypeError("the emulated RawModule takes code, options and name_expressions only")
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())

    def get_function(self, name: str) -> RawKernel:
        if name not in self.name_expressions:
            raise KeyError(f"{name} was not among the name_expressions {self.name_expressions}")
        library = build.load(self.code, tuple(build.template_instances(name)))
        return RawKernel(library, name)


def _device_properties(device: int) -> dict:
    Device(device)
    return {"multiProcessorCount": MULTIPROCESSORS, "totalGlobalMem": DEVICE_MEMORY, "name": "CPU emulation"}


def module() -> types.ModuleType:
    """A fresh module object that can stand in for ``cupy``."""
    fake = types.ModuleType("cupy")
    fake.__dict__.update(
        __version__=VERSION, ndarray=ndarray, asarray=asarray, empty=empty, zeros=zeros,
        ascontiguousarray=ascontiguousarray, matmul=matmul, argsort=argsort,
        searchsorted=searchsorted, arange=arange, from_dlpack=from_dlpack, RawModule=RawModule, RawKernel=RawKernel,
        cuda=types.SimpleNamespace(
            Device=Device, is_available=lambda: True, Stream=Stream, ExternalStream=ExternalStream,
            get_current_stream=get_current_stream, using_allocator=using_allocator,
            PythonFunctionAllocator=PythonFunctionAllocator,
            runtime=types.SimpleNamespace(getDeviceProperties=_device_properties, getDeviceCount=lambda: 1)),
    )
    return fake


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Import ``deformcp.backends.cupy_backend`` against the fake ``cupy``; undo it all on exit.

    Yields the backend module.  The loader's kernel cache is cleared on entry and exit so
    that emulated kernels never leak into a session that has real CuPy.
    """
    from deformcp import backends
    from deformcp.backends import cuda_kernels

    names = ("cupy", "deformcp.backends.cupy_backend", "deformcp.backends.cublas_products")
    saved = {name: sys.modules.get(name) for name in names}
    had_attribute = hasattr(backends, "cupy_backend")
    saved_attribute = getattr(backends, "cupy_backend", None)
    sys.modules["cupy"] = module()
    sys.modules.pop("deformcp.backends.cupy_backend", None)
    sys.modules.pop("deformcp.backends.cublas_products", None)
    cuda_kernels.get_kernel.cache_clear()
    try:
        with fake_cublas.installed():  # cupy.cuda.{device,runtime} and cupy_backends' cuBLAS binding
            yield importlib.import_module("deformcp.backends.cupy_backend")
    finally:
        cuda_kernels.get_kernel.cache_clear()
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        if had_attribute:
            backends.cupy_backend = saved_attribute
        elif hasattr(backends, "cupy_backend"):
            del backends.cupy_backend
