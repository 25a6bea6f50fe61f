"""The comparison's outputs: the text tables, the JSON file and the plot of the ratios.

All three are built from the same plain record (a dict, exactly what the JSON
holds): ``settings`` (machine, versions, threads, repeats) and one entry in
``cases`` per shape and task, with each peer's times, ratio, agreement and, for
the forward on the CPU, peak memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

__all__ = ["format_case", "format_summary", "write_json", "plot_ratios", "plotting_unavailable"]

_MIB = 2.0 ** 20


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:10.2f}"


def format_case(case: dict) -> str:
    """One case as a table: a row per peer with median and quartiles, ratio, largest error, peak memory."""
    lines = [f"== {case['task']} | {case['shape']} | {case['label']} =="]
    lines.append(f"{'peer':<13}{'median ms':>10} {'q1-q3 ms':>21} {'deformcp/peer':>14} "
                 f"{'max rel.err':>12} {'fwd peak MiB':>13}")
    for name, peer in case["peers"].items():
        errors = [a["error"] for a in peer.get("agreement", [])]
        error = f"{max(errors):12.1e}" if errors else f"{'-':>12}"
        memory = case.get("memory", {}).get(name, {})
        peak = f"{memory['forward_bytes'] / _MIB:13.1f}" if "forward_bytes" in memory else f"{'-':>13}"
        flag = "" if peer.get("agrees", True) else "  DISAGREES"
        lines.append(f"{name:<13}{_ms(peer['median_s'])} {_ms(peer['q1_s'])} -{_ms(peer['q3_s'])} "
                     f"{peer['ratio']:14.2f} {error} {peak}{flag}")
    for name, reason in case.get("skipped", {}).items():
        lines.append(f"  skipped {name}: {reason}")
    for name, memory in case.get("memory", {}).items():
        if "error" in memory:
            lines.append(f"  memory of {name} not measured: {memory['error']}")
    target = case.get("target")
    if target:
        verdict = "met" if target["met"] else "NOT MET"
        lines.append(f"  target: {target['description']}: {target['ratio']:.2f}x "
                     f"(against {target['against']}, limit {target['limit']}x) -> {verdict}")
    return "\n".join(lines)


def _peer_names(record: dict) -> List[str]:
    names = []
    for case in record["cases"]:
        names += [n for n in case["peers"] if n != "deformcp" and n not in names]
    return names


def format_summary(record: dict) -> str:
    """All cases in one table of ratios (deformcp's median time over each peer's), and the settings."""
    peers = _peer_names(record)
    lines = ["ratio = deformcp median time / peer median time (below 1: deformcp is faster)",
             f"{'task':<10}{'shape':<28}" + "".join(f"{p:>14}" for p in peers) + f"{'target':>10}"]
    for case in record["cases"]:
        cells = "".join(f"{case['peers'][p]['ratio']:14.2f}" if p in case["peers"] else f"{'-':>14}"
                        for p in peers)
        target = case.get("target")
        verdict = "" if not target else ("met" if target["met"] else "NOT MET")
        lines.append(f"{case['task']:<10}{case['shape']:<28}{cells}{verdict:>10}")
    settings = record["settings"]
    lines.append(f"\ndeformcp {settings.get('deformcp', '?')}; machine: {settings['machine']}; "
                 f"{settings['cpu_threads']} CPU threads available to this process; device {settings['device']}; "
                 f"warm-up {settings['warmup']}, median of {settings['repeats']} interleaved runs, "
                 f"{settings.get('settle_s', 0)} s pause before each")
    for name, text in settings["peers"].items():
        lines.append(f"  {name}: {text}")
    if settings.get("memory_method"):
        lines.append(f"  peak memory: {settings['memory_method']}, one fresh process per figure")
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> None:
    """Write the record as indented JSON."""
    path.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")


def plotting_unavailable() -> Optional[str]:
    """Why :func:`plot_ratios` cannot run here (matplotlib missing), or ``None``; asked before measuring."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    return None


def plot_ratios(path: Path, record: dict) -> None:
    """Grouped bars of deformcp/peer per shape, one panel per task, log scale, with the target limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(case["task"] for case in record["cases"]))
    figure, axes = plt.subplots(len(tasks), 1, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        cases = [c for c in record["cases"] if c["task"] == task]
        peers = _peer_names({"cases": cases})
        width = 0.8 / max(1, len(peers))
        for i, peer in enumerate(peers):
            xs = [j + (i - (len(peers) - 1) / 2) * width for j, c in enumerate(cases) if peer in c["peers"]]
            ys = [c["peers"][peer]["ratio"] for c in cases if peer in c["peers"]]
            if xs:
                # Bars grow from 1 (parity), up where deformcp is slower, down where it is faster.
                bars = ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=peer)
                ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        limits = {c["target"]["limit"] for c in cases if c.get("target")}
        for limit in sorted(limits):
            ax.axhline(limit, color="red", linestyle="--", linewidth=0.8, label=f"target {limit}x")
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), [c["shape"] for c in cases], rotation=15, fontsize=8)
        ax.set_ylabel("deformcp / peer (time)")
        ax.set_title(f"{task} on {record['settings']['device']}: below 1, deformcp is faster")
        ax.legend(fontsize=8)
        finite = [c["peers"][p]["ratio"] for c in cases for p in peers if p in c["peers"]]
        if finite and all(math.isfinite(r) and r > 0 for r in finite):
            ax.set_ylim(min(min(finite), *limits, 1.0) / 1.5, max(max(finite), *limits, 1.0) * 1.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
