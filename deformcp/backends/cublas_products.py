"""Batched matrix products through cuBLAS, on strided views, in the operands' own types.

``cupy.matmul`` cannot do what the CUDA backend needs: it takes no bfloat16 batches, it
writes a fresh contiguous result (so the output would be copied into NCHW afterwards), it
cannot accumulate into an existing array, and for float16 it rounds to float16 between
products.  This module calls ``cublasGemmStridedBatchedEx`` through CuPy's own binding
(``cupy_backends.cuda.libs.cublas``, the call CuPy's ``matmul`` makes) on *views*: any
3-D CuPy view whose last two axes have one unit stride (row-major, or transposed) is a
batch of matrices cuBLAS can read with a leading dimension, so slices of the column
matrix, the weight broadcast over images (batch stride 0) and the NCHW output itself
(leading dimension ``H_out * W_out``) are operands as they are, with no copies.

Types (``cublasGemmStridedBatchedEx``'s table of supported combinations):

==========  ===========================  ============================  =========================
operands    result                       compute type                  alpha, beta
==========  ===========================  ============================  =========================
float16     float16 or float32           ``CUBLAS_COMPUTE_32F``        float32
bfloat16    bfloat16 or float32          ``CUBLAS_COMPUTE_32F``        float32
float32     float32                      ``CUBLAS_COMPUTE_32F``, or    float32
                                         ``..._32F_FAST_TF32`` on
                                         request (``allow_tf32``)
float64     float64                      ``CUBLAS_COMPUTE_64F``        float64
==========  ===========================  ============================  =========================

The half types run on tensor cores with float32 accumulation and one rounding of the
result; TF32 (float32 operands rounded to a 10-bit mantissa, float32 accumulation) only
when asked for, as in PyTorch.  cuBLAS reads alpha and beta from host memory (CuPy's
handles use ``CUBLAS_POINTER_MODE_HOST``) and runs on CuPy's current stream (the binding
sets it before every call).

This module imports CuPy; :mod:`deformcp.backends.cupy_backend` is its only user.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np
from cupy.cuda import device, runtime
from cupy_backends.cuda.libs import cublas

__all__ = ["INT32_MAX", "matmul"]

INT32_MAX = 2**31 - 1

# NumPy dtype name -> cudaDataType of an operand or result.
_DATA_TYPES = {
    "float16": runtime.CUDA_R_16F,
    "bfloat16": runtime.CUDA_R_16BF,
    "float32": runtime.CUDA_R_32F,
    "float64": runtime.CUDA_R_64F,
}


class _Matrices(NamedTuple):
    """One operand as cuBLAS sees it: a column-major matrix (possibly to be transposed) per batch entry."""

    pointer: int
    data_type: int
    transpose: int  # CUBLAS_OP_N or CUBLAS_OP_T, applied to the stored column-major matrix
    ld: int         # leading dimension of the stored column-major matrix, in elements
    stride: int     # elements between batch entries; 0 repeats one matrix over the batch


def _layout(view, name: str, prefer_column_major: bool) -> Tuple[bool, int]:
    """``(column_major, ld)``: how a ``(batch, rows, cols)`` view's matrices lie in memory.

    Column-major means a unit row stride (``ld`` the column stride), row-major a unit
    column stride (``ld`` the row stride).  A matrix with one row or one column is both;
    ``prefer_column_major`` picks, with the smallest legal leading dimension.
    """
    item = view.itemsize
    if any(stride % item for stride in view.strides):
        raise ValueError(f"{name} has strides {view.strides} that are not multiples of its itemsize {item}")
    _, rows, cols = view.shape
    row_stride, col_stride = view.strides[1] // item, view.strides[2] // item
    candidates = []
    if rows == 1 or row_stride == 1:  # column-major
        ld = col_stride if cols > 1 else rows
        if ld >= rows:
            candidates.append((True, ld))
    if cols == 1 or col_stride == 1:  # row-major
        ld = row_stride if rows > 1 else cols
        if ld >= cols:
            candidates.append((False, ld))
    if not candidates:
        raise ValueError(f"{name} (shape {view.shape}, strides {view.strides}) has no unit stride on its last "
                         "two axes with a leading dimension cuBLAS can use")
    for column_major, ld in candidates:
        if column_major == prefer_column_major:
            return column_major, ld
    return candidates[0]


def _operand(view, name: str, column_major_result: bool) -> _Matrices:
    """``view`` as an operand of a product whose result is stored column-major or (transposed) row-major."""
    column_major, ld = _layout(view, name, column_major_result)
    # A product with a column-major result reads each operand as it is; one with a row-major
    # result computes out^T = b^T a^T, reading each operand transposed.  Either way the
    # operand needs no transpose exactly when its storage matches the result's.
    transpose = cublas.CUBLAS_OP_N if column_major == column_major_result else cublas.CUBLAS_OP_T
    stride = view.strides[0] // view.itemsize if view.shape[0] > 1 else 0
    return _Matrices(int(view.data.ptr), _DATA_TYPES[view.dtype.name], transpose, ld, stride)


def _compute_type(operand_dtype: np.dtype, result_dtype: np.dtype, allow_tf32: bool) -> Tuple[int, np.dtype]:
    """``(cublasComputeType_t, scale dtype)`` for a product of ``operand_dtype`` into ``result_dtype``."""
    name, result = operand_dtype.name, result_dtype.name
    if name == "float64" and result == "float64":
        return cublas.CUBLAS_COMPUTE_64F, np.dtype(np.float64)
    if name == "float32" and result == "float32":
        compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if allow_tf32 else cublas.CUBLAS_COMPUTE_32F
        return compute, np.dtype(np.float32)
    if name in ("float16", "bfloat16") and result in (name, "float32"):
        return cublas.CUBLAS_COMPUTE_32F, np.dtype(np.float32)
    raise TypeError(f"no cuBLAS product of {name} operands into a {result} result")


def matmul(a, b, out, *, accumulate: bool = False, allow_tf32: bool = False) -> None:
    """``out[i] = a[i] @ b[i]`` (``+= ...`` with ``accumulate``) for every batch entry ``i``, in one cuBLAS call.

    Parameters
    ----------
    a, b : cupy.ndarray, shape (batch or 1, M, K) and (batch or 1, K, N)
        Views whose last two axes have one unit stride (row-major, or a transposed view);
        a batch stride of 0 (``cupy.broadcast_to``) or a batch of 1 repeats one matrix.
        Both of one dtype: float16, bfloat16, float32 or float64.
    out : cupy.ndarray, shape (batch, M, N)
        Written in place (any view with a unit stride on a last axis, e.g. a slice of an
        NCHW array); its dtype is the operands' or, for half operands, float32.  When
        ``accumulate`` is false its previous contents are never read (cuBLAS ignores C
        when beta is 0), so it may be uninitialised.
    accumulate : bool
        Add to ``out`` (beta = 1) instead of overwriting it (beta = 0).
    allow_tf32 : bool
        For float32, let cuBLAS round the operands to TF32 on tensor cores.

    Raises
    ------
    ValueError
        If the shapes disagree, a view has no usable leading dimension, or a size exceeds
        cuBLAS's 32-bit ``int`` (the caller tiles the work below that).
    TypeError
        If the dtypes have no cuBLAS product.
    """
    if a.ndim != 3 or b.ndim != 3 or out.ndim != 3:
        raise ValueError(f"matmul takes 3-D views, got shapes {a.shape}, {b.shape}, {out.shape}")
    batch, m, n = out.shape
    k = a.shape[2]
    if a.shape[1] != m or b.shape[1:] != (k, n) or a.shape[0] not in (1, batch) or b.shape[0] not in (1, batch):
        raise ValueError(f"shapes do not multiply: {a.shape} @ {b.shape} -> {out.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"operands of different dtypes: {a.dtype} and {b.dtype}")
    if batch == 0 or m == 0 or n == 0:
        return
    if max(batch, m, n, k) > INT32_MAX:
        raise ValueError(f"a product of {batch} x ({m} x {k}) @ ({k} x {n}) exceeds cuBLAS's 32-bit sizes")
    compute, scale = _compute_type(a.dtype, out.dtype, allow_tf32)
    if out.strides[0] % out.itemsize or out.strides[0] == 0 and batch > 1:
        raise ValueError(f"out's batch stride {out.strides[0]} does not give each batch entry its own matrix")
    column_major, ldc = _layout(out, "out", prefer_column_major=False)
    if column_major:  # C = A B
        first, second, rows, cols = _operand(a, "a", True), _operand(b, "b", True), m, n
    else:  # cuBLAS is column-major: a row-major result is stored as its transpose, out^T = b^T a^T
        first, second, rows, cols = _operand(b, "b", False), _operand(a, "a", False), n, m
    if max(first.ld, second.ld, ldc) > INT32_MAX:
        raise ValueError("a leading dimension exceeds cuBLAS's 32-bit int")
    alpha = np.ones((), dtype=scale)
    beta = np.array(1 if accumulate else 0, dtype=scale)
    cublas.gemmStridedBatchedEx(
        device.get_cublas_handle(), first.transpose, second.transpose, rows, cols, k,
        alpha.ctypes.data,
        first.pointer, first.data_type, first.ld, first.stride,
        second.pointer, second.data_type, second.ld, second.stride,
        beta.ctypes.data,
        int(out.data.ptr), _DATA_TYPES[out.dtype.name], ldc, out.strides[0] // out.itemsize,
        batch, compute, cublas.CUBLAS_GEMM_DEFAULT)
