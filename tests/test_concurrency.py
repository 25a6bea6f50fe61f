"""Calls from several threads at once share the CPU backend's worker pool: each must get
exactly the result it gets alone (no state leaks between calls)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from problems import Spec, make_problem, relative_error, run_backward, run_forward, run_im2col

SPECS = {
    "bands": Spec(batch=1, in_channels=3, out_channels=4, height=9, width=7),          # one image: row bands
    "images": Spec(batch=5, in_channels=4, out_channels=6, height=6, width=5, groups=2, offset_groups=2),
    "strided": Spec(batch=2, in_channels=2, out_channels=3, height=11, width=8, stride=(2, 1), dilation=(1, 2),
                    padding=(0, 2, 1, 1), kernel=(3, 2), bias=False),
}
OPERATIONS = {
    "forward": lambda p: {"out": run_forward(p)},
    "backward": lambda p: {n: g for n, g in run_backward(p).items() if g is not None},
    "im2col": lambda p: {"columns": run_im2col(p)},
}


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_concurrent_calls_equal_serial_ones(threads, rng, monkeypatch):
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", threads)
    jobs = [(operation, make_problem(spec, rng, dtype=dtype))
            for spec in SPECS.values() for operation in OPERATIONS for dtype in (np.float32, np.float64)]
    alone = [OPERATIONS[operation](problem) for operation, problem in jobs]
    with ThreadPoolExecutor(max_workers=6) as callers:
        together = list(callers.map(lambda job: OPERATIONS[job[0]](job[1]), jobs * 3))
    for i, result in enumerate(together):
        expected = alone[i % len(jobs)]
        assert result.keys() == expected.keys()
        for name, value in expected.items():
            # Same tiles and sums in tile order; only BLAS may split a product differently when
            # another call holds it to one thread.  A leak between calls is far larger than this.
            tolerance = 1e-6 if value.dtype == np.float32 else 1e-14
            err = relative_error(result[name], value)
            assert err <= tolerance, f"job {i % len(jobs)}: {name} differs by {err:.3g}"
