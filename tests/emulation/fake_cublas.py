"""A strict stand-in for the cuBLAS binding CuPy offers, computing each product with NumPy.

``deformcp.backends.cublas_products`` calls ``cublasGemmStridedBatchedEx`` through
``cupy_backends.cuda.libs.cublas`` with raw device pointers, leading dimensions, batch
strides, data types and a compute type.  On the CPU emulation those pointers are host
addresses of the stand-in's NumPy arrays (``ndarray.data.ptr``, :func:`memory_pointer`),
so this module can do what cuBLAS does and check what cuBLAS would not:

* every pointer must lie inside one live array (the allocation), aligned to its element,
  whose dtype is the ``cudaDataType`` passed for it, and every element the call would
  read or write must lie inside that allocation (a wrong ``lda`` or stride fails here,
  or computes the wrong numbers the tests then see);
* ``lda``/``ldb``/``ldc`` at least the stored matrix's rows, sizes and batch count within
  cuBLAS's ``int``, the result's batch entries disjoint and the result disjoint from the
  operands (cuBLAS's undefined cases);
* the (operand, result, compute) types must be a combination of cuBLAS's table, alpha
  and beta host scalars of the compute type's scale type;
* the product is computed as cuBLAS computes it: operands widened to the compute type
  (float32 for ``CUBLAS_COMPUTE_32F``, rounded to TF32 first for ``..._FAST_TF32``), summed
  in that type, ``alpha * product + beta * C`` with C not read when beta is 0, and the
  result rounded once to its type.

Every call is recorded in :data:`calls` (types, sizes, transposes, strides), so tests can
count the products of a forward or backward pass and check their types.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List

import ml_dtypes
import numpy as np

# cudaDataType (CUDA's library_types.h), as cupy.cuda.runtime exposes it.
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = 0, 1, 2, 14
DATA_TYPES = {CUDA_R_16F: np.dtype(np.float16), CUDA_R_16BF: np.dtype(ml_dtypes.bfloat16),
              CUDA_R_32F: np.dtype(np.float32), CUDA_R_64F: np.dtype(np.float64)}

# cublasOperation_t, cublasComputeType_t, cublasGemmAlgo_t (cublas_api.h), as CuPy's binding exposes them.
CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C = 0, 1, 2
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 69, 77
CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC = 70, 71
CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99

COMPUTE_NAMES = {CUBLAS_COMPUTE_32F: "32F", CUBLAS_COMPUTE_32F_PEDANTIC: "32F_PEDANTIC",
                 CUBLAS_COMPUTE_32F_FAST_TF32: "32F_FAST_TF32", CUBLAS_COMPUTE_64F: "64F",
                 CUBLAS_COMPUTE_64F_PEDANTIC: "64F_PEDANTIC"}

# (A/B type, C type) -> compute types cuBLAS accepts (cublasGemmEx's table, which its batched forms share).
_FLOAT32_COMPUTE = {CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC}
SUPPORTED = {
    (CUDA_R_16F, CUDA_R_16F): _FLOAT32_COMPUTE,
    (CUDA_R_16F, CUDA_R_32F): _FLOAT32_COMPUTE,
    (CUDA_R_16BF, CUDA_R_16BF): _FLOAT32_COMPUTE,
    (CUDA_R_16BF, CUDA_R_32F): _FLOAT32_COMPUTE,
    (CUDA_R_32F, CUDA_R_32F): _FLOAT32_COMPUTE | {CUBLAS_COMPUTE_32F_FAST_TF32},
    (CUDA_R_64F, CUDA_R_64F): {CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC},
}

HANDLE = 0x0C0B1A5  # the one handle of the one emulated device
_INT_MAX = 2**31 - 1


class CublasError(RuntimeError):
    """What the binding raises for a failed status; here also for what cuBLAS would silently get wrong."""


# ---------------------------------------------------------------------------------------
# Device pointers of the stand-in's arrays
# ---------------------------------------------------------------------------------------

_allocations: Dict[int, "weakref.ref"] = {}


class MemoryPointer:
    """``cupy.cuda.MemoryPointer``, as far as deformcp uses it: ``ptr``, the address of a view's first element."""

    def __init__(self, ptr: int):
        self.ptr = ptr


def _owner(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def memory_pointer(array: np.ndarray) -> MemoryPointer:
    """``array.data`` of a device array: its address, with the allocation it lies in remembered."""
    owner = _owner(array)
    start = owner.__array_interface__["data"][0]
    _allocations[start] = weakref.ref(owner)
    return MemoryPointer(array.__array_interface__["data"][0])


def _allocation_at(pointer: int, what: str) -> np.ndarray:
    for start, ref in list(_allocations.items()):
        owner = ref()
        if owner is None:
            _allocations.pop(start, None)
        elif start <= pointer < start + max(owner.nbytes, 1):
            return owner
    raise CublasError(f"{what}: pointer {pointer:#x} is in no live device array")


# ---------------------------------------------------------------------------------------
# The product
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmCall:
    """One recorded ``gemmStridedBatchedEx``; types by NumPy name, compute type by its cuBLAS suffix."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    a_type: str
    b_type: str
    c_type: str
    compute: str
    lda: int
    ldb: int
    ldc: int
    stride_a: int
    stride_b: int
    stride_c: int
    batch: int
    alpha: float
    beta: float


calls: List[GemmCall] = []


def _check_int(name: str, value, low: int = 0, high: int = _INT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"gemmStridedBatchedEx: {name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise CublasError(f"gemmStridedBatchedEx: {name} = {value} outside [{low}, {high}]")
    return int(value)


def _matrices(name: str, pointer: int, data_type: int, rows: int, cols: int, ld: int, stride: int,
              batch: int) -> np.ndarray:
    """The ``(batch, rows, cols)`` view of column-major matrices cuBLAS would address; checks bounds and type."""
    dtype = DATA_TYPES[data_type]
    owner = _allocation_at(pointer, name)
    if owner.dtype != dtype:
        raise CublasError(f"{name}: passed as {dtype} but the array holds {owner.dtype}")
    start = owner.__array_interface__["data"][0]
    if (pointer - start) % dtype.itemsize:
        raise CublasError(f"{name}: pointer not aligned to its {dtype.itemsize}-byte elements")
    if stride < 0:
        raise CublasError(f"{name}: negative batch stride {stride}")
    item = dtype.itemsize
    flat = owner.reshape(-1).view(np.uint8) if owner.flags.c_contiguous else None
    if flat is None:
        raise CublasError(f"{name}: lies in a non-contiguous allocation")
    try:
        stored = np.ndarray((batch, cols, rows), dtype=dtype, buffer=flat, offset=pointer - start,
                            strides=(stride * item, ld * item, item))
    except (ValueError, TypeError) as exc:
        raise CublasError(f"{name}: {batch} matrices of {rows} x {cols}, ld {ld}, stride {stride} reach past the "
                          f"end of their array ({owner.nbytes} bytes from {start:#x}; pointer {pointer:#x}): {exc}")
    return stored.transpose(0, 2, 1)  # element (b, r, c) at b*stride + c*ld + r


def _extent(view: np.ndarray) -> tuple:
    """Byte range [first, last] a view touches (all its strides are non-negative)."""
    first = view.__array_interface__["data"][0]
    last = first + sum((n - 1) * s for n, s in zip(view.shape, view.strides)) + view.itemsize - 1
    return first, last


def _results_overlap(m: int, n: int, ldc: int, stride: int, batch: int) -> bool:
    """Whether two of ``batch`` column-major m x n results, ``stride`` apart, share an element.

    Result j holds the elements ``j*stride + c*ldc + r`` (0 <= r < m, 0 <= c < n), so results
    ``d = k*stride`` apart share one exactly when ``|d - t*ldc| < m`` for some ``|t| < n``.
    Interleaved results (a group's columns of a wider row) do not overlap.
    """
    for k in range(1, batch):
        d = k * stride
        nearest = min(max(round(d / ldc), -(n - 1)), n - 1)
        if any(abs(d - t * ldc) < m for t in (nearest - 1, nearest, nearest + 1) if abs(t) < n):
            return True
    return False


def _to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32's 10-bit mantissa (round to nearest even), as tensor cores read it."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = (bits + np.uint32(0x0FFF) + ((bits >> 13) & 1)) & np.uint32(0xFFFFE000)
    return np.where(finite, rounded, bits).view(np.float32)


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
                         beta, C, Ctype, ldc, strideC, batchCount, computeType, algo) -> None:
    """``cupy_backends.cuda.libs.cublas.gemmStridedBatchedEx``: its signature, cuBLAS's semantics, stricter checks."""
    if handle != HANDLE:
        raise CublasError(f"gemmStridedBatchedEx: unknown handle {handle!r}")
    transa, transb = _check_int("transa", transa), _check_int("transb", transb)
    if transa not in (CUBLAS_OP_N, CUBLAS_OP_T) or transb not in (CUBLAS_OP_N, CUBLAS_OP_T):
        raise CublasError(f"gemmStridedBatchedEx: transposes must be N or T for real types, got {transa}, {transb}")
    m, n, k = _check_int("m", m), _check_int("n", n), _check_int("k", k)
    batch = _check_int("batchCount", batchCount, 1)
    lda, ldb, ldc = _check_int("lda", lda, 1), _check_int("ldb", ldb, 1), _check_int("ldc", ldc, 1)
    strides = [_check_int(name, s, 0, 2**63 - 1) for name, s in (("strideA", strideA), ("strideB", strideB),
                                                                  ("strideC", strideC))]
    if algo not in (CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP):
        raise CublasError(f"gemmStridedBatchedEx: unexpected algo {algo}")
    if Atype != Btype or (Atype, Ctype) not in SUPPORTED or computeType not in SUPPORTED[(Atype, Ctype)]:
        raise CublasError(f"gemmStridedBatchedEx: CUBLAS_STATUS_NOT_SUPPORTED for A {Atype}, B {Btype}, C {Ctype}, "
                          f"compute {computeType}")
    scale = ctypes.c_double if computeType in (CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC) else ctypes.c_float
    alpha_value, beta_value = scale.from_address(alpha).value, scale.from_address(beta).value
    rows_a, cols_a = (m, k) if transa == CUBLAS_OP_N else (k, m)
    rows_b, cols_b = (k, n) if transb == CUBLAS_OP_N else (n, k)
    for name, ld, rows in (("lda", lda, rows_a), ("ldb", ldb, rows_b), ("ldc", ldc, m)):
        if ld < max(1, rows):
            raise CublasError(f"gemmStridedBatchedEx: {name} = {ld} is less than the stored matrix's {rows} rows")
    a = _matrices("A", A, Atype, rows_a, cols_a, lda, strides[0], batch)
    b = _matrices("B", B, Btype, rows_b, cols_b, ldb, strides[1], batch)
    c = _matrices("C", C, Ctype, m, n, ldc, strides[2], batch)
    if m and n and _results_overlap(m, n, ldc, strides[2], batch):
        raise CublasError(f"gemmStridedBatchedEx: strideC {strides[2]} makes the {batch} results overlap")
    if m and n:
        c_first, c_last = _extent(c)
        for name, operand in (("A", a), ("B", b)):
            if operand.size:
                first, last = _extent(operand)
                if first <= c_last and c_first <= last:
                    raise CublasError(f"gemmStridedBatchedEx: C overlaps {name}")
    compute = np.float64 if scale is ctypes.c_double else np.float32
    left, right = a.astype(compute), b.astype(compute)
    if transa == CUBLAS_OP_T:
        left = left.transpose(0, 2, 1)
    if transb == CUBLAS_OP_T:
        right = right.transpose(0, 2, 1)
    if computeType == CUBLAS_COMPUTE_32F_FAST_TF32:
        left, right = _to_tf32(left), _to_tf32(right)
    with np.errstate(all="ignore"):
        result = compute(alpha_value) * np.matmul(left, right)
        if beta_value != 0:
            result = result + compute(beta_value) * c.astype(compute)
        c[...] = result.astype(c.dtype)
    calls.append(GemmCall(transa, transb, m, n, k, a.dtype.name, b.dtype.name, c.dtype.name,
                          COMPUTE_NAMES[computeType], lda, ldb, ldc, *strides, batch, alpha_value, beta_value))


def get_cublas_handle() -> int:
    """``cupy.cuda.device.get_cublas_handle``: the current device's handle."""
    return HANDLE


def cublas_module() -> types.ModuleType:
    """A module object standing in for ``cupy_backends.cuda.libs.cublas``."""
    module = types.ModuleType("cupy_backends.cuda.libs.cublas")
    module.__dict__.update(
        {name: value for name, value in globals().items() if name.startswith("CUBLAS_")},
        gemmStridedBatchedEx=gemmStridedBatchedEx, CUBLASError=CublasError)
    return module


def runtime_constants() -> dict:
    """The ``cudaDataType`` constants of ``cupy.cuda.runtime``."""
    return dict(CUDA_R_32F=CUDA_R_32F, CUDA_R_64F=CUDA_R_64F, CUDA_R_16F=CUDA_R_16F, CUDA_R_16BF=CUDA_R_16BF)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Make ``from cupy.cuda import device, runtime`` and ``from cupy_backends.cuda.libs import cublas`` find
    the stand-ins, on top of a fake ``cupy`` already in ``sys.modules``; undo it all on exit."""
    cupy = sys.modules["cupy"]
    cuda = types.ModuleType("cupy.cuda")
    cuda.__dict__.update(vars(cupy.cuda))
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.__dict__.update(vars(cupy.cuda.runtime), **runtime_constants())
    device = types.ModuleType("cupy.cuda.device")
    device.get_cublas_handle = get_cublas_handle
    cuda.runtime, cuda.device = runtime, device
    cublas = cublas_module()
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    backends_cuda = types.ModuleType("cupy_backends.cuda")
    backends_cuda.libs = libs
    backends = types.ModuleType("cupy_backends")
    backends.cuda = backends_cuda
    modules = {"cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupy.cuda.device": device,
               "cupy_backends": backends, "cupy_backends.cuda": backends_cuda, "cupy_backends.cuda.libs": libs,
               "cupy_backends.cuda.libs.cublas": cublas}
    saved = {name: sys.modules.get(name) for name in modules}
    saved_cuda = cupy.cuda
    sys.modules.update(modules)
    cupy.cuda = cuda
    try:
        yield
    finally:
        cupy.cuda = saved_cuda
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
