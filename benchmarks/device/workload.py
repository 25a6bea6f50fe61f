"""A small forward and backward in every dtype and index width, on the GPU: what compute-sanitizer watches.

``python -m benchmarks.device.workload`` runs ``deform_conv2d``, ``deform_conv2d_backward``
(all five gradients) and ``deform_im2col`` on CuPy arrays of the tiny benchmark shape
(groups, offset groups, stride, asymmetric padding and dilation, offsets reaching
outside the image) in float64, float32, float16 and bfloat16, once with the 32-bit
and once with the forced 64-bit kernel instances: every instance runs.  It checks that
every result is finite and exits 1 otherwise; the sanitizer reports the rest.

CuPy's memory pool is turned off first: every array is then its own ``cudaMalloc``, so
memcheck sees an access past an array's end instead of landing in a neighbour of the
same pooled block.
"""

from __future__ import annotations

import sys
from typing import List

import numpy as np

__all__ = ["main", "run_everything"]

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def run_everything() -> List[str]:
    """Run every dtype and index width; return the names of results that are not all finite."""
    import cupy

    import deformcp
    from deformcp.backends import cupy_backend

    from ..shapes import TINY, dtype_named, make_inputs

    cupy.cuda.set_allocator(None)
    if not hasattr(cupy_backend, "_MIN_INDEX_BITS"):
        raise RuntimeError("cupy_backend has no _MIN_INDEX_BITS switch: the 64-bit instances cannot be forced")
    bad = []
    for bits in (32, 64):
        # The backend's own switch for the 64-bit instances, which tests/test_gpu.py uses too.
        cupy_backend._MIN_INDEX_BITS = bits
        for name in DTYPE_NAMES:
            host = make_inputs(TINY, seed=0, dtype=dtype_named(name))
            x, offset, mask, weight, bias, grad_out = (cupy.asarray(a) for a in (*host.conv_args, host.grad_out))
            results = {"forward": deformcp.deform_conv2d(x, offset, mask, weight, bias, **TINY.kwargs),
                       "im2col": deformcp.deform_im2col(x, offset, mask, TINY.kernel, **TINY.kwargs)}
            grads = deformcp.deform_conv2d_backward(grad_out, x, offset, mask, weight, bias, **TINY.kwargs)
            results.update(zip(("grad_x", "grad_offset", "grad_mask", "grad_weight", "grad_bias"), grads))
            cupy.cuda.get_current_stream().synchronize()
            bad += [f"{name} {bits}-bit {what}" for what, value in results.items()
                    if not np.isfinite(cupy.asnumpy(value).astype(np.float64)).all()]
    return bad


def main(argv: List[str]) -> int:
    bad = run_everything()
    for what in bad:
        print(f"not finite: {what}")
    print(f"workload done: {len(DTYPE_NAMES)} dtypes x 2 index widths, {len(bad)} non-finite results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
