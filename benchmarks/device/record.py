"""``record.md``: the device check's record (``record.json``) as a dated, readable page.

:func:`render` takes the record as it stands after any step, so a check stopped half-way
still gives a page: every section says what its step found, or why it has nothing.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

__all__ = ["render"]

from .speed import IMPLEMENTATIONS

_MIB = 2.0 ** 20


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _section(record: dict, name: str, heading: str) -> Tuple[List[str], Optional[dict]]:
    """A section's first lines (its heading, and why its step has no result if so) and the step's entry.

    The entry is ``None`` where there is nothing more to show.
    """
    step = record["steps"].get(name)
    lines = [heading, ""]
    if step is None:
        return lines + ["Not run (not among the steps asked for, or the check stopped before it).", ""], None
    if step.get("result") is None:
        return lines + [f"{step['status']}: {step.get('reason', 'no result')}".replace("\n", "  \n"), ""], None
    return lines, step


def _summary(record: dict) -> List[str]:
    environment = (record["steps"].get("environment") or {}).get("result") or {}
    cupy = environment.get("cupy", {})
    lines = [f"# deformcp device check, {record['started'][:10]}", ""]
    lines.append(f"- command: `{record['command']}`{' (quick)' if record['quick'] else ''}, "
                 f"{record['started']} to {record.get('finished', '?')}, budget {record['budget_s']:.0f} s")
    if environment:
        lines.append(f"- deformcp {environment.get('deformcp')}; {environment.get('python')}; "
                     f"{environment.get('machine')}, {environment.get('cpu_threads')} CPUs")
    if record["cuda_device"]:
        lines.append(f"- GPU: {cupy.get('name')}, compute capability {cupy.get('compute_capability')}, "
                     f"{cupy.get('multiprocessors')} multiprocessors, {cupy.get('memory_bytes', 0) / 2**30:.0f} GiB; "
                     f"driver {cupy.get('driver')}, CUDA runtime {cupy.get('runtime')}, NVRTC {cupy.get('nvrtc')}; "
                     f"CuPy {cupy.get('version')} (bfloat16: {cupy.get('bfloat16')})")
    else:
        lines.append(f"- **No CUDA device found**: {record['no_cuda_reason']}")
    lines.append("")
    rows = [[step["title"], f"**{step['status']}**", step.get("seconds", ""),
             "".join((step.get("reason") or step.get("note") or "").splitlines()[:1])[:160]]
            for step in record["steps"].values()]
    return lines + _table(["step", "status", "seconds", "note"], rows)


def _environment(record: dict) -> List[str]:
    lines, step = _section(record, "environment", "## 1. Environment")
    if step is None:
        return lines
    result = step["result"]
    for library in ("torch", "jax"):
        lines.append(f"- {library}: " + ", ".join(f"{k} {v}" for k, v in result.get(library, {}).items()))
    for tool, found in result.get("tools", {}).items():
        said = "; ".join(found.get("says", [])) or found.get("reason", "")
        lines.append(f"- {tool}: {found.get('path')}: {said}")
    lines.append("")
    versions = [[name, version] for name, version in result.get("versions", {}).items() if version]
    return lines + _table(["distribution", "version"], versions)


def _kernels(record: dict) -> List[str]:
    lines, step = _section(record, "kernels",
                           "## 1. Kernel instances: compile time (fresh cache), then load time (warm cache)")
    if step is None:
        return lines
    phases = {phase: {(r["stage"], r["instance"]): r["seconds"] for r in data["instances"]}
              for phase, data in step["result"].items() if data}
    keys = next(iter(phases.values()), {}).keys()
    rows = [[stage, f"`{instance}`", *(f"{phases[p].get((stage, instance), float('nan')):.3f}" for p in phases)]
            for stage, instance in keys]
    lines += _table(["stage", "instance", *(f"{p} s" for p in phases)], rows)
    totals = ", ".join(f"{p}: {data['total_s']:.1f} s" for p, data in step["result"].items() if data)
    return lines + [f"Totals: {totals}. The first instance of each process also loads NVRTC.", ""]


def _tests(record: dict) -> List[str]:
    lines, step = _section(record, "tests", "## 2. Tests")
    if step is None:
        return lines
    result = step["result"]
    if "gpu_tests_collected" in result:
        return lines + [f"{result['gpu_tests_collected']} GPU tests collected (not run: {step.get('reason')}).", ""]
    for part, counts in result.items():
        if not counts:
            continue
        lines.append(f"**{part}**: {counts.get('passed')} passed, {counts.get('failures')} failed, "
                     f"{counts.get('errors')} errors, {counts.get('skipped')} skipped "
                     f"(pytest exit status {counts.get('exit_status')})")
        lines += [f"- FAILED {name}" for name in counts.get("failed_tests", [])]
        lines += [f"- skipped {n}x: {reason}" for reason, n in list(counts.get("skip_reasons", {}).items())[:12]]
        lines.append("")
    return lines


def _sanitizer(record: dict) -> List[str]:
    lines, step = _section(record, "sanitizer",
                           "## 3. compute-sanitizer (small forward + backward, every dtype and index width)")
    if step is None:
        return lines
    rows = [[tool, r["errors"], r["exit_status"], "yes" if r["workload_done"] else "no", "; ".join(r["summary"])]
            for tool, r in step["result"].items()]
    return lines + _table(["tool", "errors", "exit status", "workload finished", "summary"], rows)


def _ms(entry: Optional[dict]) -> str:
    if not entry:
        return "-"
    if "skipped" in entry:
        return "n/a"
    return f"{entry['median_ms']:.3f} ({entry['q1_ms']:.3f}-{entry['q3_ms']:.3f})"


def _mib(entry: Optional[dict]) -> str:
    if not entry or "median_ms" not in entry:
        return "-"
    figures = [f"{entry[key] / _MIB:.0f}" for key in ("torch_peak_bytes", "cupy_pool_bytes") if key in entry]
    return " + ".join(figures) if figures else "-"


def _speed_run(name: str, run: dict) -> List[str]:
    settings = run.get("settings", {})
    lines = [f"### {name}", "", f"{settings.get('gpu', settings.get('device'))}; timer: {settings.get('timer')}; "
             f"median (quartiles) of {settings.get('repeats')} runs after {settings.get('warmup')} warm-up; "
             f"CUPY_TF32={settings.get('CUPY_TF32')}, torch allow_tf32={settings.get('torch_allow_tf32')}, "
             f"deformcp takes allow_tf32: {settings.get('deformcp_allow_tf32_keyword')}", ""]
    header = ["shape", "dtype", "task", *(f"{i} ms" for i in IMPLEMENTATIONS), "deformcp ÷ torchvision",
              *(f"{i} MiB" for i in IMPLEMENTATIONS), "largest error vs deformcp"]
    rows, skipped = [], {}
    for case in run.get("cases", []):
        results = case["results"]
        ours, theirs = results.get("deformcp", {}), results.get("torchvision", {})
        ratio = (f"{ours['median_ms'] / theirs['median_ms']:.2f}"
                 if "median_ms" in ours and "median_ms" in theirs else "-")
        errors = [r["error_vs_deformcp"] for r in results.values() if "error_vs_deformcp" in r]
        rows.append([case["shape"], case["dtype"], case["task"], *(_ms(results.get(i)) for i in IMPLEMENTATIONS),
                     ratio, *(_mib(results.get(i)) for i in IMPLEMENTATIONS),
                     f"{max(errors):.1e}" if errors else "-"])
        for implementation, entry in results.items():
            if "skipped" in entry:
                skipped.setdefault(f"{implementation}: {entry['skipped']}", []).append(
                    f"{case['shape']} {case['dtype']} {case['task']}")
    lines += _table(header, rows)
    lines += [f"- n/a {reason} ({len(cases)} cases)" for reason, cases in skipped.items()]
    return lines + [""]


def _speed(record: dict) -> List[str]:
    lines, step = _section(record, "speed", "## 4. Speed and memory")
    if step is None:
        return lines
    if step.get("note"):
        lines += [step["note"] + ".", ""]
    lines += ["Times are CUDA-event times of one call (deformcp.jax: wall clock with block_until_ready); "
              "'deformcp ÷ torchvision' is the ratio of the medians (below 1: deformcp is faster). MiB: PyTorch's "
              "peak allocation in the call + the growth of CuPy's pool (deformcp: the pool alone; deformcp.jax: "
              "the pool alone, XLA's buffers not counted).", ""]
    for name, run in step["result"].items():
        if run:
            lines += _speed_run(name, run)
    return lines


def _cpu(record: dict) -> List[str]:
    lines, step = _section(record, "cpu",
                           "## 5. CPU scaling (python -m benchmarks.compare, each run held to that many CPUs)")
    if step is None:
        return lines
    by_threads: Dict[str, dict] = {t: c for t, c in step["result"]["threads"].items() if c}
    columns = list(by_threads)
    table: Dict[tuple, Dict[str, str]] = {}
    left_out = {}
    for threads, comparison in by_threads.items():
        left_out.update(comparison["settings"].get("left_out", {}))
        for case in comparison["cases"]:
            for peer, entry in case["peers"].items():
                table.setdefault((case["task"], peer), {})[threads] = f"{1e3 * entry['median_s']:.2f}"
            for peer, reason in case.get("skipped", {}).items():
                left_out[peer] = reason
    rows = [[task, peer, *(cells.get(t, "-") for t in columns)] for (task, peer), cells in table.items()]
    lines.append(f"Shape {step['result']['shape']}; median ms.")
    lines.append("")
    lines += _table(["task", "implementation", *(f"{t} threads" for t in columns)], rows)
    return lines + [f"- not compared: {peer}: {reason}" for peer, reason in left_out.items()] + [""]


def render(record: dict) -> str:
    """The whole page, from the record as it stands."""
    lines = _summary(record)
    for section in (_environment, _kernels, _tests, _sanitizer, _speed, _cpu):
        lines += section(record)
    return "\n".join(lines)
