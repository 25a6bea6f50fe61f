"""
Reading the benchmark results
=============================

``python -m benchmarks.compare`` times deformcp against other implementations of the
same operation on the same inputs, in one process, and writes everything it measured to
``comparison-<device>.json``; the runs recorded for the project are in
``benchmarks/results/`` of a source checkout (``docs/benchmarks.md`` says how they are
taken). This example reads those files: what was run where, each peer's ratio with the
spread of the timings, the targets, and the memory.
"""

# %%
# The files
# ---------
# One JSON file per device. ``settings`` says where and how it was measured; ``cases``
# holds one entry per shape and task.
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter

try:
    RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
except NameError:  # run as a notebook: from the examples folder of the checkout
    RESULTS = Path.cwd().parent / "benchmarks" / "results"

records = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("comparison-*.json"))}
for name, record in records.items():
    settings = record["settings"]
    print(f"{name}: deformcp {settings['deformcp']}, {settings['device']} {settings['dtype']}, "
          f"{settings['cpu_threads']} threads, {settings['date'][:10]}")
    print(f"  {settings['machine']}")
    for peer, description in settings["peers"].items():
        print(f"  {peer:12} {description}")

# %%
# Ratios, with their spread
# -------------------------
# A peer's ``ratio`` is deformcp's median time over the peer's: below 1, deformcp is
# faster. Each timing also has its quartiles (``q1_s``, ``q3_s``); the error bars run
# from the most favourable to the least favourable pairing of them, deformcp's first
# quartile over the peer's third, and its third over the peer's first. Where a case has a
# target, its limit is drawn as a dashed line in the colour of the peer it is set against.


def ratio_with_spread(ours, theirs):
    """Median ratio, and the ratios of the quartiles paired both ways."""
    return (ours["median_s"] / theirs["median_s"], ours["q1_s"] / theirs["q3_s"], ours["q3_s"] / theirs["q1_s"])


for name, record in records.items():
    tasks = sorted({case["task"] for case in record["cases"]})
    peers = sorted({peer for case in record["cases"] for peer in case["peers"] if peer != "deformcp"})
    colors = dict(zip(peers, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cases = [case for case in record["cases"] if case["task"] == task]
        for n, peer in enumerate(peers):
            shift = (n - (len(peers) - 1) / 2) * 0.15
            for position, case in enumerate(cases):
                if peer not in case["peers"]:
                    continue
                ratio, low, high = ratio_with_spread(case["peers"]["deformcp"], case["peers"][peer])
                assert np.isclose(ratio, case["peers"][peer]["ratio"])  # the file's ratio is this one
                ax.errorbar(position + shift, ratio, yerr=[[ratio - low], [high - ratio]], fmt="o",
                            color=colors[peer], capsize=3, label=peer if position == 0 else None)
        for position, case in enumerate(cases):
            target = case.get("target")
            if target:
                ax.hlines(target["limit"], position - 0.4, position + 0.4, colors=colors[target["against"]],
                          linestyles="dashed")
        ax.axhline(1, color="0.5", linewidth=0.8)
        ax.set_yscale("log")
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FormatStrFormatter("%g"))
        ax.set_xticks(range(len(cases)), [case["shape"] for case in cases], rotation=20)
        ax.set_ylabel("deformcp time / peer time")
        ax.set_title(f"{name}: {task}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()

# %%
# The targets, as the file states them:
for name, record in records.items():
    for case in record["cases"]:
        target = case.get("target")
        if target:
            verdict = "met" if target["met"] else "NOT met"
            print(f"{case['shape']:16} {case['task']:9} {target['ratio']:5.2f} (limit {target['limit']:g}): "
                  f"{verdict} -- {target['description']}")

# %%
# Agreement and memory
# --------------------
# Before timing, every peer's results are compared with deformcp's (``agreement``: the
# relative error of each output; ``agrees``: all within the tolerance). For the CPU
# forward, ``memory`` holds what one call needed beyond its inputs, measured in a fresh
# process per peer.
for name, record in records.items():
    compared = [peer for case in record["cases"] for name_, peer in case["peers"].items() if name_ != "deformcp"]
    print(f"{name}: {sum(peer['agrees'] for peer in compared)} of {len(compared)} (case, peer) pairs agree")
    measured = [case for case in record["cases"] if case.get("memory")]
    if not measured:
        continue
    peers = sorted({peer for case in measured for peer in case["memory"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(peers)
    for n, peer in enumerate(peers):
        mib = [case["memory"].get(peer, {}).get("forward_bytes", np.nan) / 2**20 for case in measured]
        ax.bar(np.arange(len(measured)) + (n - (len(peers) - 1) / 2) * width, mib, width, label=peer)
    ax.set_xticks(range(len(measured)), [f"{case['shape']}\n{case['task']}" for case in measured])
    ax.set_ylabel("MiB beyond the inputs, one forward call")
    ax.set_title(f"{name}: peak memory of the forward")
    ax.legend()
    fig.tight_layout()
    plt.show()
