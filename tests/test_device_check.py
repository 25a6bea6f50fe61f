"""benchmarks/device_check.py: time boxes that hold, a record written as it goes, and a page for every result.

CI also runs the whole command (``--quick``, no GPU); these tests hold what that run
cannot show: a step past its box is stopped with its children and the earlier results
stay on disk, and the record page renders what a GPU run produces.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from benchmarks import device_check
from benchmarks.device.record import render


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its reaper is dead too
        return stat.read().split(") ")[1][0] != "Z"


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setitem(device_check.BOXES, "short", (2, 2))
    monkeypatch.setattr(device_check, "MIN_STEP_S", 1.0)
    return device_check.Run(tmp_path, budget=30, quick=True, kernel_cache=tmp_path / "cache", argv=["--quick"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc to see the child's state")
def test_a_step_past_its_box_is_stopped_with_its_children_and_recorded(run, tmp_path):
    with run.step("first", "a step that passes") as entry:
        entry["result"] = {"value": 1}
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print(p.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    with run.step("second", "a step that hangs"):
        finished = run.python("-c", child, box="short")
        device_check._require(finished, "hanging")
    assert time.monotonic() - start < 15
    grandchild = int(finished.output.split()[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the step's child process outlived its time box"
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["steps"]["first"] == {"title": "a step that passes", "status": "ok", "result": {"value": 1},
                                        "seconds": record["steps"]["first"]["seconds"]}
    assert record["steps"]["second"]["status"] == "timed out"
    assert "stopped after 2 s" in record["steps"]["second"]["reason"]
    assert "a step that hangs | **timed out**" in (tmp_path / "record.md").read_text()


def test_nothing_starts_once_the_budget_is_spent(run):
    run.deadline = time.monotonic()
    finished = run.python("-c", "print('ran')", box="short")
    assert finished.stopped.startswith("not started") and finished.output == ""


def test_without_a_gpu_the_environment_is_recorded_and_the_exit_status_is_0(tmp_path):
    status = device_check.main(["--steps", "environment", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "record.json").read_text())
    assert status == 0 and record["steps"]["environment"]["status"] == "ok"
    versions = record["steps"]["environment"]["result"]["versions"]
    assert versions["numpy"] and "cupy-cuda13x" in versions
    if record["cuda_device"] is None:
        assert record["no_cuda_reason"]
        assert f"**No CUDA device found**: {record['no_cuda_reason']}" in (tmp_path / "record.md").read_text()


def test_junit_counts(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><skipped message="no torchvision"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_d"><skipped message="no torchvision"/></testcase>'
        '</testsuite></testsuites>')
    counts = device_check._junit_counts(junit)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (4, 1, 1, 2)
    assert counts["failed_tests"] == ["tests.test_gpu::test_b: assert 1 == 2"]
    assert counts["skip_reasons"] == {"no torchvision": 2}


def _gpu_record() -> dict:
    """A record as a GPU run leaves it: every step with a result."""
    instances = [{"stage": "im2col", "instance": "deform_im2col_kernel<float, int>", "seconds": 1.25}]
    timing = dict(q1_ms=1.9, q3_ms=2.1, runs=20)
    speed = {"settings": {"gpu": "NVIDIA H200", "timer": "CUDA events", "repeats": 20, "warmup": 3},
             "cases": [{"shape": "b8_c64_64x64", "dtype": "float32", "task": "forward", "tf32": False, "results": {
                 "deformcp": {"median_ms": 2.0, **timing, "cupy_pool_bytes": 3 * 2**20},
                 "torchvision": {"median_ms": 4.0, **timing, "torch_peak_bytes": 5 * 2**20, "cupy_pool_bytes": 0,
                                 "error_vs_deformcp": 2e-7},
                 "deformcp.torch": {"median_ms": 2.5, **timing, "torch_peak_bytes": 3 * 2**20, "cupy_pool_bytes": 0,
                                    "error_vs_deformcp": 0.0},
                 "deformcp.jax": {"skipped": "RuntimeError: no GPU"}}}]}
    comparison = {"settings": {"left_out": {"openvino": "OpenVINO is not installed"}}, "cases": [
        {"task": "forward", "peers": {"deformcp": {"median_s": 0.0125}, "onnxruntime": {"median_s": 0.025}}}]}
    return {
        "command": "python benchmarks/device_check.py --out x", "started": "2026-11-28T10:00:00+00:00",
        "finished": "2026-11-28T10:05:00+00:00", "quick": False, "budget_s": 345, "cuda_device": "NVIDIA H200",
        "no_cuda_reason": None,
        "steps": {
            "environment": {"title": "1. environment", "status": "ok", "seconds": 3, "result": {
                "cupy": {"name": "NVIDIA H200", "version": "14.2.0", "bfloat16": "yes"}, "versions": {"numpy": "2.5"},
                "tools": {}, "torch": {}, "jax": {}}},
            "kernels": {"title": "1. kernels", "status": "ok", "seconds": 40, "result": {
                "cold": {"instances": instances, "total_s": 1.25},
                "warm": {"instances": [{**instances[0], "seconds": 0.0625}], "total_s": 0.0625}}},
            "tests": {"title": "2. tests", "status": "failed", "seconds": 90, "reason": "gpu: pytest exit status 1",
                      "result": {"gpu": {"tests": 3, "passed": 2, "failures": 1, "errors": 0, "skipped": 0,
                                         "failed_tests": ["tests.test_gpu::test_b: boom"], "skip_reasons": {},
                                         "exit_status": 1}}},
            "sanitizer": {"title": "3. sanitizer", "status": "ok", "seconds": 50, "result": {
                "memcheck": {"errors": 0, "exit_status": 0, "workload_done": True,
                             "summary": ["========= ERROR SUMMARY: 0 errors"]}}},
            "speed": {"title": "4. speed", "status": "ok", "seconds": 60, "result": {"tf32 off": speed}},
            "cpu": {"title": "5. cpu", "status": "ok", "seconds": 30,
                    "result": {"shape": "b8_c64_64x64", "threads": {"1": comparison}}},
        },
    }


def test_the_record_page_shows_a_gpu_run():
    page = render(_gpu_record())
    assert "- GPU: NVIDIA H200" in page and "No CUDA device" not in page
    assert "| im2col | `deform_im2col_kernel<float, int>` | 1.250 | 0.062 |" in page
    assert "**gpu**: 2 passed, 1 failed" in page and "- FAILED tests.test_gpu::test_b: boom" in page
    assert "| memcheck | 0 | 0 | yes |" in page
    # deformcp 2.0 ms, torchvision 4.0 ms: ratio 0.50; peaks 3 MiB (pool), 5 + 0 and 3 + 0 MiB; the
    # deterministic variant has no entry in this case ("-").
    assert ("| b8_c64_64x64 | float32 | forward | 2.000 (1.900-2.100) | 4.000 (1.900-2.100) | 2.500 (1.900-2.100) "
            "| n/a | - | 0.50 | 3 | 5 + 0 | 3 + 0 | - | - | 2.0e-07 |") in page
    assert "- n/a deformcp.jax: RuntimeError: no GPU (1 cases)" in page
    assert "| forward | onnxruntime | 25.00 |" in page and "- not compared: openvino: OpenVINO is not installed" in page


def test_the_record_page_of_a_check_stopped_after_its_first_step():
    record = _gpu_record()
    record["steps"] = {"environment": record["steps"]["environment"]}
    page = render(record)
    assert page.count("Not run (not among the steps asked for, or the check stopped before it).") == 5
