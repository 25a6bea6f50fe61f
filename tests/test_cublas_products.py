"""The cuBLAS products of the CUDA backend, against NumPy, through the strict cuBLAS stand-in.

``deformcp.backends.cublas_products.matmul`` turns strided CuPy views into
``cublasGemmStridedBatchedEx`` calls; here CuPy is the NumPy stand-in and cuBLAS
``tests/emulation/fake_cublas.py``, which checks every pointer, leading dimension,
stride, transpose and type against the arrays and computes the product as cuBLAS does.
"""

from __future__ import annotations

import importlib
import itertools

import ml_dtypes
import numpy as np
import pytest

from deformcp.testing import relative_error
from emulation import fake_cublas, fake_cupy

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
# One rounding of operands (half types) and of the result, float32 accumulation.
TOLERANCE = {"float64": 1e-14, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.5e-2}


def device(values, dtype=None) -> fake_cupy.ndarray:
    """A stand-in device array (it has ``data.ptr``), C-contiguous."""
    return np.array(values, dtype=dtype, copy=True, order="C").view(fake_cupy.ndarray)


@pytest.fixture
def products():
    with fake_cupy.installed():  # also stands in for CuPy's cuBLAS binding
        module = importlib.import_module("deformcp.backends.cublas_products")
        fake_cublas.calls.clear()
        yield module


def _operand(rng, batch: int, rows: int, cols: int, dtype, transposed: bool, broadcast: bool) -> fake_cupy.ndarray:
    """A (batch, rows, cols) view: row-major, or the transpose of a row-major array; repeated if ``broadcast``."""
    shape = (1 if broadcast else batch, cols, rows) if transposed else (1 if broadcast else batch, rows, cols)
    array = device(rng.standard_normal(shape), dtype)
    view = array.transpose(0, 2, 1) if transposed else array
    return np.broadcast_to(view, (batch, rows, cols), subok=True) if broadcast else view


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_layout_against_numpy(products, dtype, rng):
    batch, m, n, k = 3, 5, 4, 7
    for a_t, b_t, out_t, a_bc, b_bc, accumulate in itertools.product((False, True), repeat=6):
        a = _operand(rng, batch, m, k, dtype, a_t, a_bc)
        b = _operand(rng, batch, k, n, dtype, b_t, b_bc)
        start = rng.standard_normal((batch, m, n))
        out = device(start.transpose(0, 2, 1) if out_t else start, dtype)
        out = out.transpose(0, 2, 1) if out_t else out
        before = out.astype(np.float64)
        products.matmul(a, b, out, accumulate=accumulate)
        expected = np.matmul(a.astype(np.float64), b.astype(np.float64)) + (before if accumulate else 0)
        what = f"a_t={a_t} b_t={b_t} out_t={out_t} a_bc={a_bc} b_bc={b_bc} accumulate={accumulate}"
        assert relative_error(out, expected) <= TOLERANCE[dtype.name], what
        call = fake_cublas.calls[-1]
        assert (call.a_type, call.c_type) == (dtype.name, dtype.name), what
        assert call.compute == ("64F" if dtype.name == "float64" else "32F"), what
        assert call.beta == (1.0 if accumulate else 0.0) and call.alpha == 1.0, what
    assert len(fake_cublas.calls) == 64  # one call per product


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)], ids=lambda d: d.name)
def test_half_operands_accumulate_into_float32(products, dtype, rng):
    a = _operand(rng, 2, 6, 300, dtype, False, False)
    b = _operand(rng, 2, 300, 5, dtype, True, False)
    out = device(np.zeros((2, 6, 5)), np.float32)
    products.matmul(a, b, out)
    products.matmul(a, b, out, accumulate=True)
    call = fake_cublas.calls[-1]
    assert (call.a_type, call.b_type, call.c_type, call.compute) == (dtype.name, dtype.name, "float32", "32F")
    expected = 2 * np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert relative_error(out, expected) <= 1e-6  # float32 accumulation of exact half products


def test_result_written_into_a_slice_of_nchw(products, rng):
    """The forward product's shape: (images, C_out/g, pixels) slices of NCHW, leading dimension H*W."""
    images, c_out, h, w, k = 2, 6, 4, 5, 9
    out = device(np.full((images, c_out, h, w), np.nan), np.float32)
    weight = device(rng.standard_normal((3, k)), np.float32)                # one group's (C_out/g, K)
    columns = device(rng.standard_normal((images, 2 * w, k)), np.float32)   # (images, pixels of rows 1-2, K)
    target = out.reshape(images, c_out, h * w)[:, 3:6, w:3 * w]
    products.matmul(np.broadcast_to(weight, (images, 3, k), subok=True), columns.transpose(0, 2, 1), target)
    expected = np.einsum("ok,bpk->bop", weight.astype(np.float64), columns.astype(np.float64))
    assert relative_error(out[:, 3:6, 1:3].reshape(images, 3, 2 * w), expected) <= 1e-6
    untouched = np.ones(out.shape, bool)
    untouched[:, 3:6, 1:3] = False
    assert np.isnan(out[untouched]).all()
    call = fake_cublas.calls[-1]
    assert (call.ldc, call.stride_c, call.stride_b) == (h * w, c_out * h * w, 0)


def test_tf32_only_on_request(products, rng):
    a = _operand(rng, 1, 8, 64, np.float32, False, False)
    b = _operand(rng, 1, 64, 8, np.float32, False, False)
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    strict, fast = device(np.zeros((1, 8, 8)), np.float32), device(np.zeros((1, 8, 8)), np.float32)
    products.matmul(a, b, strict)
    assert fake_cublas.calls[-1].compute == "32F"
    products.matmul(a, b, fast, allow_tf32=True)
    assert fake_cublas.calls[-1].compute == "32F_FAST_TF32"
    assert relative_error(strict, expected) <= 1e-6
    assert 1e-5 < relative_error(fast, expected) <= 2e-3  # operands rounded to a 10-bit mantissa
    half = _operand(rng, 1, 8, 64, np.float16, False, False)
    products.matmul(half, half.transpose(0, 2, 1).copy(), device(np.zeros((1, 8, 8)), np.float16), allow_tf32=True)
    assert fake_cublas.calls[-1].compute == "32F"  # TF32 concerns float32 operands only


def test_refuses_what_cublas_cannot_do(products, rng):
    a = _operand(rng, 1, 4, 4, np.float16, False, False)
    with pytest.raises(TypeError, match="float16 operands into a float64"):
        products.matmul(a, a, device(np.zeros((1, 4, 4)), np.float64))
    with pytest.raises(TypeError, match="different dtypes"):
        products.matmul(a, a.astype(np.float32), device(np.zeros((1, 4, 4)), np.float32))
    strided = device(rng.standard_normal((1, 8, 8)), np.float32)[:, ::2, ::2]
    with pytest.raises(ValueError, match="no unit stride"):
        products.matmul(strided, strided, device(np.zeros((1, 4, 4)), np.float32))
    with pytest.raises(ValueError, match="do not multiply"):
        products.matmul(a, a[:, :3], device(np.zeros((1, 4, 4)), np.float16))
    assert fake_cublas.calls == []


def test_stand_in_catches_a_wrong_leading_dimension(products, rng):
    """The checks the backend relies on: a wrong lda reads past the array, or the wrong type is named."""
    a = device(rng.standard_normal((4, 6)), np.float32)
    c = device(np.zeros((4, 4)), np.float32)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)
    args = dict(handle=fake_cublas.HANDLE, transa=0, transb=0, m=4, n=4, k=6, alpha=one.ctypes.data,
                A=a.data.ptr, Atype=fake_cublas.CUDA_R_32F, lda=4, strideA=0, B=a.data.ptr,
                Btype=fake_cublas.CUDA_R_32F, ldb=6, strideB=0, beta=zero.ctypes.data, C=c.data.ptr,
                Ctype=fake_cublas.CUDA_R_32F, ldc=4, strideC=0, batchCount=1,
                computeType=fake_cublas.CUBLAS_COMPUTE_32F, algo=fake_cublas.CUBLAS_GEMM_DEFAULT)
    fake_cublas.gemmStridedBatchedEx(**args)  # A as 4 x 6 column-major, lda 4: exactly the 24 elements
    with pytest.raises(fake_cublas.CublasError, match="reach past the end"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "lda": 5})
    with pytest.raises(fake_cublas.CublasError, match="less than"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "ldc": 3})
    with pytest.raises(fake_cublas.CublasError, match="holds float32"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "Atype": fake_cublas.CUDA_R_16F, "Btype": fake_cublas.CUDA_R_16F,
                                            "Ctype": fake_cublas.CUDA_R_32F})
    with pytest.raises(fake_cublas.CublasError, match="NOT_SUPPORTED"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "computeType": fake_cublas.CUBLAS_COMPUTE_64F})
    with pytest.raises(fake_cublas.CublasError, match="overlaps"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "C": a.data.ptr, "ldc": 4, "n": 4, "m": 4})
    with pytest.raises(fake_cublas.CublasError, match="overlap"):
        fake_cublas.gemmStridedBatchedEx(**{**args, "batchCount": 2, "strideC": 3, "m": 2, "n": 2, "ldc": 2,
                                            "strideA": 0})
