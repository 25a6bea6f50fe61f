"""asv suites: deform_conv2d, deform_conv2d_backward (all five gradients) and deform_im2col.

Parameters: backend (``numpy`` on the CPU, ``cupy`` on a CUDA device), dtype and
shape (:data:`benchmarks.shapes.SHAPES`, all 3x3 with a mask and a bias).
A combination that cannot run here (no CuPy or no GPU, float64 on the GPU,
bfloat16 without ml_dtypes) is skipped by ``setup`` raising ``NotImplementedError``.

asv re-runs ``setup`` before every timed sample, so it only fetches inputs drawn
once per process (:func:`_inputs`).  On the GPU, ``setup`` moves them to the device
and runs the operation once (compiling its kernels); each timed call ends with a
synchronisation, and the ``Device*`` classes add ``track_*`` figures: device time
from CUDA events and device memory from CuPy's pool.
"""

import functools

import numpy as np

import deformcp

# Only deformcp's public API and benchmarks/: asv runs this suite against older commits too.
from .shapes import SHAPES, dtype_named, make_inputs

BACKENDS = ["numpy", "cupy"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
SHAPE_NAMES = list(SHAPES)
DEVICE_DTYPES = ["float32", "float16", "bfloat16"]
OPERATIONS = ("forward", "backward", "im2col")


@functools.lru_cache(maxsize=1)
def _inputs(shape_name, dtype_name):
    """Random inputs (NumPy), drawn once per process for the combination being measured."""
    dtype = dtype_named(dtype_name)
    if dtype is None:
        raise NotImplementedError("bfloat16 needs ml_dtypes, which is not installed")
    return make_inputs(SHAPES[shape_name], seed=0, dtype=dtype)


def _cupy():
    """CuPy, or NotImplementedError (a skip) when it or a CUDA device is missing."""
    try:
        import cupy
    except ImportError:
        raise NotImplementedError("CuPy is not installed") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise NotImplementedError("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as error:
        raise NotImplementedError(f"no CUDA device ({error})") from None
    return cupy


class _Case:
    """One operation on one shape and dtype, with its arrays on the backend's device."""

    def __init__(self, operation, backend, dtype_name, shape_name):
        shape = SHAPES[shape_name]
        host = _inputs(shape_name, dtype_name)
        if backend == "numpy":
            arrays = host
            self.synchronize = _no_wait
        else:
            if dtype_name == "float64":
                raise NotImplementedError("float64 is benchmarked on the CPU only")
            cupy = _cupy()
            try:
                arrays = type(host)(*(cupy.asarray(getattr(host, f)) for f in host.__dataclass_fields__))
            except (TypeError, ValueError) as error:
                raise NotImplementedError(f"CuPy cannot hold {dtype_name}: {error}") from None
            self.synchronize = cupy.cuda.get_current_stream().synchronize
        args, kwargs = arrays.conv_args, shape.kwargs
        if operation == "forward":
            self.run = functools.partial(deformcp.deform_conv2d, *args, **kwargs)
        elif operation == "backward":
            self.run = functools.partial(deformcp.deform_conv2d_backward, arrays.grad_out, *args, **kwargs)
        else:
            self.run = functools.partial(deformcp.deform_im2col, arrays.x, arrays.offset, arrays.mask,
                                         shape.kernel, **kwargs)
        if backend == "cupy":
            # Warm up: compile the kernels and grow the memory pool outside the timing.
            self.run()
            self.synchronize()

    def __call__(self):
        self.run()
        self.synchronize()


def _no_wait():
    return None


class _HostSuite:
    """time_ and peakmem_ of one operation over backend x dtype x shape."""

    operation = "forward"
    params = [BACKENDS, DTYPES, SHAPE_NAMES]
    param_names = ["backend", "dtype", "shape"]
    number = 1
    repeat = (2, 5, 20.0)
    rounds = 2
    # Untimed calls for half a second (at least one) in each process: the first call pays
    # for thread pools and page faults that later calls do not.  --quick skips it.
    warmup_time = 0.5
    timeout = 600

    def setup(self, backend, dtype, shape):
        self.case = _Case(self.operation, backend, dtype, shape)

    def time_run(self, backend, dtype, shape):
        self.case()

    def peakmem_run(self, backend, dtype, shape):
        self.case()


class Forward(_HostSuite):
    operation = "forward"


class Backward(_HostSuite):
    operation = "backward"


class Im2col(_HostSuite):
    operation = "im2col"


class _DeviceSuite:
    """Device time (CUDA events, median of 10 calls) and device memory of one operation on CuPy."""

    operation = "forward"
    params = [DEVICE_DTYPES, SHAPE_NAMES]
    param_names = ["dtype", "shape"]
    timeout = 600
    calls = 10

    def setup(self, dtype, shape):
        self.cupy = _cupy()
        self.case = _Case(self.operation, "cupy", dtype, shape)

    def track_device_time(self, dtype, shape):
        cupy = self.cupy
        times = []
        for _ in range(self.calls):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            self.case.run()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
        return float(np.median(times))

    track_device_time.unit = "ms"

    def track_device_memory(self, dtype, shape):
        """Bytes the pool grew to during one call beyond the live inputs: the call's device memory."""
        pool = self.cupy.get_default_memory_pool()
        self.case.synchronize()
        pool.free_all_blocks()
        live = pool.used_bytes()
        self.case()
        return pool.total_bytes() - live

    track_device_memory.unit = "bytes"


class DeviceForward(_DeviceSuite):
    operation = "forward"


class DeviceBackward(_DeviceSuite):
    operation = "backward"


class DeviceIm2col(_DeviceSuite):
    operation = "im2col"
