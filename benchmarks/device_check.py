"""The one command to run first on a machine lent a GPU: every GPU check, time-boxed, recorded as it goes.

Run from the root of a clone::

    PYTHONPATH=. python benchmarks/device_check.py --out DIR

Steps, each a process of its own with its own time box, all under one overall budget
(``--budget``, 345 s by default: the whole command fits in 6 minutes on an H200):

1. ``environment``: GPU, driver, CUDA runtime, NVRTC, library versions, CUDA tools
   (:mod:`benchmarks.device.environment`); then ``kernels``: the compile time of every
   kernel instance into a fresh CuPy kernel cache, and the load time from that cache in a
   second process (:mod:`benchmarks.device.kernels`).  Every later step uses that cache.
2. ``tests``: the GPU tests (``-m gpu``) of the files in :data:`TEST_FILES`, then the
   other tests of the torch, JAX and interop files on the same machine (they must hold
   where JAX's default backend is the GPU); JUnit XML files and counts.
3. ``sanitizer``: compute-sanitizer's memcheck and racecheck on a small forward and
   backward in every dtype and index width (:mod:`benchmarks.device.workload`).
4. ``speed``: deformcp against ``torchvision.ops.deform_conv2d`` and through its PyTorch
   and JAX adapters, CUDA events, peak memory; TF32 off, then on
   (:mod:`benchmarks.device.speed`).
5. ``cpu``: ``python -m benchmarks.compare`` on the CPU (deformcp next to ONNX Runtime and
   OpenVINO where installed) at 1, 4 and 16 threads, each run held to that many CPUs.

Without a CUDA device (as in CI) the command still runs: the environment is recorded
with the reason no device was found, the GPU tests are collected but not run (so a
missing or broken GPU suite still shows), the speed harness runs once on the CPU as a
check of its code, and the CPU step runs; ``--quick`` keeps that under a minute.

``DIR`` receives ``record.json`` and ``record.md`` (rewritten after every step, so a
step that runs out of time leaves the earlier ones' results), ``log.txt`` (every
command and its output) and the tests' JUnit XML files.  The exit status is 0 when
every step passed or was skipped with its reason, 1 when one failed or ran out of time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and str(ROOT) not in sys.path:  # run as a script: benchmarks/ is not a package there
    sys.path.insert(0, str(ROOT))

__all__ = ["STEPS", "TEST_FILES", "main"]

STEPS = ("environment", "kernels", "tests", "sanitizer", "speed", "cpu")
# The files whose GPU tests run on the device; the others in them run there too (step 2).
TEST_FILES = ("tests/test_gpu.py", "tests/test_torch.py", "tests/test_jax.py", "tests/test_interop.py")
CPU_SIDE_TEST_FILES = ("tests/test_torch.py", "tests/test_jax.py", "tests/test_interop.py")
SANITIZER_TOOLS = ("memcheck", "racecheck")

# Time boxes in seconds: (full run, --quick).  A step gets the smaller of its box and what is
# left of the budget (less a reserve for writing the record); under MIN_STEP_S it is skipped.
BOXES = {
    "environment": (60, 60), "kernels cold": (120, 120), "kernels warm": (45, 45),
    "tests gpu": (170, 170), "tests cpu side": (90, 90), "tests collect": (60, 60),
    "sanitizer": (75, 75), "speed": (130, 60), "speed tf32": (50, 50), "cpu": (40, 45),
}
DEFAULT_BUDGET_S = {False: 345.0, True: 180.0}
RESERVE_S = 5.0
MIN_STEP_S = 10.0
CPU_THREADS = {False: (1, 4, 16), True: (1, 2)}
CPU_SHAPE = {False: "b8_c64_64x64", True: "tiny"}


@dataclass
class Finished:
    """How a command ended: its exit status (None when it was stopped), its output and its time."""

    command: List[str]
    exit_status: Optional[int]
    output: str
    seconds: float
    stopped: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class StepFailed(Exception):
    """A step's command failed or ran out of time; the message says which."""


class Run:
    """One device check: the budget, the folders, the record and the log."""

    def __init__(self, out: Path, budget: float, quick: bool, kernel_cache: Path, argv: List[str]):
        self.out, self.quick = out, quick
        self.deadline = time.monotonic() + budget
        self.work = Path(tempfile.mkdtemp(prefix="deformcp-device-check-"))
        self.log = out / "log.txt"
        self.log.write_text("")
        self.env = dict(os.environ)
        self.env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                        PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false", CUPY_CACHE_DIR=str(kernel_cache))
        self.record: Dict[str, object] = {
            "command": "python benchmarks/device_check.py " + " ".join(argv),
            "started": _now(), "quick": quick, "budget_s": budget, "kernel_cache": str(kernel_cache),
            "cuda_device": None, "no_cuda_reason": None, "steps": {},
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def box(self, name: str) -> float:
        return BOXES[name][self.quick]

    def command(self, argv: List[str], box: str, cpus: Optional[List[int]] = None,
                env: Optional[Dict[str, str]] = None) -> Finished:
        """Run ``argv`` from the clone's root, stopped (with its children) past its time box or the budget."""
        timeout = min(self.box(box), self.remaining())
        if timeout < MIN_STEP_S:
            return Finished(argv, None, "", 0.0, f"not started: {self.remaining():.0f} s of the budget left")
        start = time.monotonic()
        process = subprocess.Popen(
            argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        stopped = None
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole session: pytest's workers, the sanitizer's target
            output, _ = process.communicate()
            stopped = f"stopped after {timeout:.0f} s (time box {self.box(box)} s)"
        finished = Finished(argv, None if stopped else process.returncode, output, time.monotonic() - start, stopped)
        with self.log.open("a") as log:
            status = stopped or f"exit status {process.returncode}"
            log.write(f"$ {' '.join(argv)}\n{output}\n[{status}, {finished.seconds:.1f} s]\n\n")
        return finished

    def python(self, *args: str, **kwargs) -> Finished:
        return self.command([sys.executable, *args], **kwargs)

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[dict]:
        """Record one step: the body fills the yielded entry (``result``, and ``status``/``reason`` when skipped)."""
        entry = {"title": title, "status": "ok"}
        self.record["steps"][name] = entry
        print(f"[device_check] {title} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            yield entry
        except StepFailed as failure:
            entry.update(status="timed out" if "stopped" in str(failure) or "not started" in str(failure)
                         else "failed", reason=str(failure))
        except Exception:  # a bug in this script: recorded, the other steps still run
            entry.update(status="failed", reason="device_check itself failed:\n" + traceback.format_exc())
        entry["seconds"] = round(time.monotonic() - start, 1)
        print(f"[device_check] {title}: {entry['status']} ({entry['seconds']} s)"
              + (f": {entry['reason'].splitlines()[0]}" if entry.get("reason") else ""), file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        from benchmarks.device.record import render

        self.record["finished"] = _now()
        (self.out / "record.json").write_text(json.dumps(self.record, indent=1, allow_nan=True) + "\n")
        (self.out / "record.md").write_text(render(self.record))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _require(finished: Finished, what: str) -> None:
    if finished.stopped:
        raise StepFailed(f"{what}: {finished.stopped}")
    if not finished.ok:
        tail = "\n".join(finished.output.strip().splitlines()[-15:])
        raise StepFailed(f"{what}: exit status {finished.exit_status}\n{tail}")


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- steps


def step_environment(run: Run) -> None:
    with run.step("environment", "1. environment") as entry:
        target = run.work / "environment.json"
        _require(run.python("-m", "benchmarks.device.environment", str(target), box="environment"), "environment")
        entry["result"] = _json(target)
        run.record["cuda_device"] = entry["result"]["cuda_device"]
        run.record["no_cuda_reason"] = entry["result"]["no_cuda_reason"]
    if run.record["steps"]["environment"]["status"] != "ok":
        run.record["no_cuda_reason"] = "the environment step did not finish, so no device is assumed"


def _no_device(entry: dict, run: Run) -> bool:
    if run.record["cuda_device"]:
        return False
    entry.update(status="skipped", reason=f"no CUDA device found: {run.record['no_cuda_reason']}")
    return True


def step_kernels(run: Run) -> None:
    with run.step("kernels", "1. kernel instances: compile, then load from CuPy's disk cache") as entry:
        if _no_device(entry, run):
            return
        result = entry["result"] = {}
        for phase in ("cold", "warm"):
            target = run.work / f"kernels-{phase}.json"
            _require(run.python("-m", "benchmarks.device.kernels", str(target), box=f"kernels {phase}"),
                     f"kernels ({phase} cache)")
            result[phase] = _json(target)


def _junit_counts(path: Path) -> dict:
    """Counts, failures (with their first message line) and skip reasons from a JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for problem in [*case.findall("failure"), *case.findall("error")]:
            message = (problem.get("message") or problem.tag).strip().splitlines()
            failed.append(f"{name}: {message[0][:300] if message else problem.tag}")
        for skip in case.findall("skipped"):
            reason = (skip.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
    counts["failed_tests"] = failed
    counts["skip_reasons"] = dict(sorted(skips.items(), key=lambda item: -item[1]))
    return counts


def _pytest_workers() -> List[str]:
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]


def step_tests(run: Run) -> None:
    with run.step("tests", "2. tests on the device") as entry:
        if not run.record["cuda_device"]:
            # Collected, not run: the GPU suite must exist and import wherever this runs.
            finished = run.python("-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  *TEST_FILES, box="tests collect")
            _require(finished, "collecting the GPU tests")
            collected = re.search(r"(\d+)(?:/\d+)? tests? collected", finished.output)
            if collected is None or int(collected.group(1)) == 0:
                raise StepFailed("no GPU test was collected from " + ", ".join(TEST_FILES))
            entry["result"] = {"gpu_tests_collected": int(collected.group(1))}
            _no_device(entry, run)
            return
        result = entry["result"] = {}
        problems = []
        for part, marker, files in (("gpu", "gpu", TEST_FILES), ("cpu side", "not gpu", CPU_SIDE_TEST_FILES)):
            junit = run.out / f"tests-{part.replace(' ', '-')}.xml"
            finished = run.python("-m", "pytest", "-m", marker, "-q", "-rfE", "-p", "no:cacheprovider",
                                  f"--junitxml={junit}", *_pytest_workers(), *files, box=f"tests {part}")
            result[part] = _junit_counts(junit) if junit.is_file() else {}
            result[part]["exit_status"] = finished.exit_status
            if finished.stopped:
                problems.append(f"{part}: {finished.stopped}")
            elif not finished.ok:
                problems.append(f"{part}: pytest exit status {finished.exit_status}")
        if problems:
            raise StepFailed("; ".join(problems))


def step_sanitizer(run: Run) -> None:
    with run.step("sanitizer", "3. compute-sanitizer") as entry:
        if _no_device(entry, run):
            return
        from benchmarks.device.environment import find_cuda_tool

        sanitizer = find_cuda_tool("compute-sanitizer")
        if sanitizer is None:
            entry.update(status="skipped", reason="compute-sanitizer is not on the PATH nor in the CUDA toolkit's bin")
            return
        result = entry["result"] = {}
        problems = []
        for tool in SANITIZER_TOOLS:
            finished = run.command([sanitizer, "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "86",
                                    sys.executable, "-m", "benchmarks.device.workload"], box="sanitizer")
            summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:error|hazard)", finished.output)
            errors = sum(int(n) for n in summary) if summary else None
            result[tool] = {"errors": errors, "exit_status": finished.exit_status, "stopped": finished.stopped,
                            "workload_done": "workload done" in finished.output,
                            "summary": [line for line in finished.output.splitlines() if "SUMMARY" in line]}
            if finished.stopped or not finished.ok or errors != 0 or not result[tool]["workload_done"]:
                problems.append(f"{tool}: {finished.stopped or f'exit status {finished.exit_status}'}, "
                                f"{errors} errors reported")
        if problems:
            raise StepFailed("; ".join(problems))


def step_speed(run: Run) -> None:
    with run.step("speed", "4. speed and memory next to torchvision") as entry:
        runs = entry["result"] = {}
        if not run.record["cuda_device"]:
            target = run.work / "speed-cpu.json"
            finished = run.python("-m", "benchmarks.device.speed", str(target), "--device", "cpu", "--repeats", "2",
                                  "--warmup", "1", box="speed")
            runs["cpu smoke"] = _json(target)
            _require(finished, "the speed harness on the CPU")
            entry["note"] = ("no CUDA device: the harness ran once on the CPU, on a small shape, as a check of "
                             "its code; these are no figures to quote")
            return
        for name, extra, env in (("tf32 off", [], {}), ("tf32 on", ["--tf32"], {"CUPY_TF32": "1"})):
            target = run.work / f"speed-{name.replace(' ', '-')}.json"
            finished = run.python("-m", "benchmarks.device.speed", str(target), *extra,
                                  box="speed" if not extra else "speed tf32", env=env)
            runs[name] = _json(target)  # what it measured before any stop
            _require(finished, f"speed ({name})")


def _cpu_sets(run: Run) -> Dict[int, List[int]]:
    """Thread count -> the CPUs a run at that count is held to (the first ones this process may use)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    counts = [n for n in CPU_THREADS[run.quick] if n <= len(available)]
    if not run.quick and available and len(available) not in counts and len(available) < max(CPU_THREADS[False]):
        counts.append(len(available))  # a smaller machine: its whole width instead of 16
    return {n: available[:n] for n in counts}


def step_cpu(run: Run) -> None:
    with run.step("cpu", "5. CPU scaling next to ONNX Runtime and OpenVINO") as entry:
        cpu_sets = _cpu_sets(run)
        if not cpu_sets:
            entry.update(status="skipped", reason="this platform cannot hold a process to a set of CPUs")
            return
        result = entry["result"] = {"shape": CPU_SHAPE[run.quick], "threads": {}}
        repeats, warmup = ("2", "1") if run.quick else ("3", "1")
        for threads, cpus in cpu_sets.items():
            folder = run.work / f"cpu-{threads}"
            finished = run.python("-m", "benchmarks.compare", "--device", "cpu", "--shapes", CPU_SHAPE[run.quick],
                                  "--task", "both", "--peers", "onnxruntime", "openvino", "--no-memory",
                                  "--repeats", repeats, "--warmup", warmup, "--settle", "0.05", "--out", str(folder),
                                  box="cpu", cpus=cpus, env={"DEFORMCP_NUM_THREADS": str(threads)})
            result["threads"][str(threads)] = _json(folder / "comparison-cpu.json")
            _require(finished, f"the comparison at {threads} threads")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/device_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for record.md, record.json, log.txt, JUnit XML")
    parser.add_argument("--quick", action="store_true", help="small CPU steps (what CI runs: under a minute)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S[False]:.0f}, "
                             f"{DEFAULT_BUDGET_S[True]:.0f} with --quick)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), metavar="STEP",
                        help=f"run only these ({', '.join(STEPS)}); environment always runs")
    parser.add_argument("--kernel-cache", type=Path, default=None,
                        help="CuPy's kernel cache folder for every step (default: a fresh one, so the compile "
                             "times are cold)")
    return parser


def main(argv: List[str]) -> int:
    """Run the steps; return 0 when each passed or was skipped with its reason, else 1."""
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.kernel_cache or Path(tempfile.mkdtemp(prefix="deformcp-kernel-cache-"))
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[args.quick]
    run = Run(args.out, budget, args.quick, cache, argv)
    step_environment(run)
    for name, function in (("kernels", step_kernels), ("tests", step_tests), ("sanitizer", step_sanitizer),
                           ("speed", step_speed), ("cpu", step_cpu)):
        if name in args.steps:
            function(run)
    run.save()
    bad = [name for name, step in run.record["steps"].items() if step["status"] in ("failed", "timed out")]
    print(f"[device_check] wrote {args.out / 'record.md'} and record.json"
          + (f"; not passed: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
