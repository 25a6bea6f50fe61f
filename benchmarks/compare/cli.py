"""``python -m benchmarks.compare``: deformcp and the installed peers, side by side, in one process.

For each shape and task, every peer runs on the same random float32 inputs; each
peer's outputs are compared with deformcp's (a disagreement beyond tolerance is
reported loudly and makes the exit status 1); then all are timed, interleaved
(warm-up, median of the runs).  On the CPU the forward's peak memory is measured
for deformcp and the inference runtimes, each in a fresh process.  Progress goes
to stderr; the tables to stdout; ``comparison-<device>.json`` and
``comparison-<device>.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from ..shapes import SHAPES, TARGET_SHAPES, TINY, BenchShape, make_inputs, shape_named
from .agreement import DEFAULT_TOLERANCE, compare_outputs
from .machine import cpu_threads, deformcp_version
from .memory import forward_peak_memory
from .peers import PEER_MODULES, REFERENCE, peer_module, prepare_runner
from .report import format_case, format_summary, plot_ratios, plotting_unavailable, write_json
from .runner import FORWARD, TASKS, TRAINING, PeerUnavailable
from .targets import evaluate_target
from .timing import measure_interleaved

__all__ = ["main"]

# The forward's peak memory is shown for deformcp next to the inference runtimes'.
MEMORY_PEERS = ("deformcp", "onnxruntime", "openvino")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.splitlines()[0],
        epilog=f"shapes: {', '.join(SHAPES)}, {TINY.name}; 'targets' = {', '.join(TARGET_SHAPES)}; "
               "'all' = every shape but tiny")
    parser.add_argument("--shapes", nargs="+", default=["targets"], metavar="SHAPE",
                        help="shape names, 'targets' (default) or 'all'")
    parser.add_argument("--peers", nargs="+", default=None, choices=[p for p in PEER_MODULES if p != REFERENCE],
                        metavar="PEER", help=f"peers to compare (default: every installed one of "
                                             f"{', '.join(p for p in PEER_MODULES if p != REFERENCE)})")
    parser.add_argument("--task", choices=[*TASKS, "both"], default="both",
                        help="forward only, training (forward + all five gradients), or both (default)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each peer per case (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    parser.add_argument("--settle", type=float, default=0.2,
                        help="seconds to pause before each timed run, so that the previous peer's worker "
                             "threads stop spinning (default 0.2)")
    parser.add_argument("--out", type=Path, default=Path("deformcp-bench"),
                        help="folder for the JSON and PNG (default ./deformcp-bench)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"relative error allowed against deformcp (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser


def _shapes(names: List[str]) -> List[BenchShape]:
    chosen: List[str] = []
    for name in names:
        expanded = {"targets": list(TARGET_SHAPES), "all": list(SHAPES)}.get(name, [name])
        chosen += [n for n in expanded if n not in chosen]
    return [shape_named(name) for name in chosen]


def _available_peers(requested: Optional[List[str]], device: str) -> tuple:
    """(peers to run, with deformcp first; {peer: why it is left out})."""
    names = [REFERENCE] + (requested if requested is not None else [p for p in PEER_MODULES if p != REFERENCE])
    chosen, left_out = [], {}
    for name in names:
        reason = peer_module(name).missing(device)
        if reason is None:
            chosen.append(name)
        else:
            left_out[name] = reason
    return chosen, left_out


def _run_case(shape: BenchShape, task: str, peers: List[str], args, inputs) -> dict:
    """Prepare, check and time every peer on one case; return its record."""
    case = {"shape": shape.name, "label": shape.label, "geometry": shape.as_dict(), "task": task,
            "peers": {}, "skipped": {}}
    runners = {}
    for name in peers:
        if task not in peer_module(name).TASKS:
            continue
        _progress(f"  preparing {name}")
        try:
            runners[name] = prepare_runner(name, task, shape, inputs, args.device)
        except PeerUnavailable as reason:
            case["skipped"][name] = str(reason)
    if REFERENCE not in runners:
        raise RuntimeError(f"deformcp could not run {shape.name} {task}: {case['skipped'].get(REFERENCE)}")

    reference = runners[REFERENCE].fetch(runners[REFERENCE]())
    agreements = {}
    for name, runner in runners.items():
        if name == REFERENCE:
            continue
        _progress(f"  checking {name} against deformcp")
        agreements[name] = compare_outputs(name, task, reference, runner.fetch(runner()), args.tolerance)
        for bad in (a for a in agreements[name] if not a.ok):
            _progress(f"  DISAGREEMENT: {name} {task} {shape.name} {bad.output}: relative error "
                      f"{bad.error:.3g} > tolerance {bad.tolerance:.3g}")
    del reference

    _progress(f"  timing {', '.join(runners)}: warm-up {args.warmup}, {args.repeats} runs")
    timings = measure_interleaved(runners, args.warmup, args.repeats, args.settle,
                               progress=lambda m: _progress(f"    {m}"))
    ours = timings[REFERENCE].median
    for name, timing in timings.items():
        entry = {"settings": runners[name].settings, **timing.as_dict(), "ratio": ours / timing.median}
        if name in agreements:
            entry["agreement"] = [dict(output=a.output, error=a.error, tolerance=a.tolerance, ok=a.ok)
                                  for a in agreements[name]]
            entry["agrees"] = all(a.ok for a in agreements[name])
        case["peers"][name] = entry
    case["target"] = evaluate_target(task, shape.name, {n: t.median for n, t in timings.items()}, args.device)
    return case


def _measure_memory(case: dict, args) -> None:
    if args.no_memory or args.device != "cpu" or case["task"] != FORWARD:
        return
    case["memory"] = {}
    for name in (p for p in MEMORY_PEERS if p in case["peers"]):
        _progress(f"  peak memory of {name}'s forward (fresh process)")
        case["memory"][name] = forward_peak_memory(name, case["shape"], args.seed)


def _settings(args, left_out: Dict[str, str], cases: List[dict]) -> dict:
    described = {}
    for case in cases:
        for name, entry in case["peers"].items():
            described.setdefault(name, entry["settings"])
    methods = {m.get("method") for c in cases for m in c.get("memory", {}).values() if "method" in m}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "deformcp": deformcp_version(),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, "
                   f"Python {platform.python_version()}",
        "cpu_threads": cpu_threads(), "device": args.device, "dtype": "float32",
        "warmup": args.warmup, "repeats": args.repeats, "settle_s": args.settle, "seed": args.seed,
        "tolerance": args.tolerance,
        "peers": described, "left_out": left_out,
        "memory_method": "; ".join(sorted(methods)) if methods else None,
    }


def _unwritable(folder: Path) -> Optional[str]:
    """Why the results cannot be written to ``folder`` (created if missing), or ``None``.

    Tried by writing, not by permission bits, which neither a read-only file system nor
    a path through a regular file shows.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def main(argv: List[str]) -> int:
    """Run the comparison; return 0, or 1 if any peer disagreed with deformcp beyond tolerance.

    Everything that would stop it from writing its results is checked before anything
    is measured: the options (argparse's exit, status 2) and the output folder; without
    matplotlib it measures, writes the JSON and says that the plot was skipped.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.settle < 0:
        parser.error("--repeats must be at least 1, --warmup and --settle at least 0")
    try:
        shapes = _shapes(args.shapes)
    except KeyError as error:
        parser.error(str(error.args[0]))
    unwritable = _unwritable(args.out)
    if unwritable:
        parser.error(f"--out {args.out}: the results cannot be written there ({unwritable})")
    no_plot = plotting_unavailable()
    if no_plot:
        _progress(f"{no_plot}: the plot will be skipped and the JSON written (the bench extra brings matplotlib)")
    tasks = list(TASKS) if args.task == "both" else [args.task]
    peers, left_out = _available_peers(args.peers, args.device)
    if REFERENCE in left_out:
        print(f"deformcp cannot run on {args.device}: {left_out[REFERENCE]}", file=sys.stderr)
        return 2
    for name, reason in left_out.items():
        _progress(f"not compared: {name} ({reason})")

    cases = []
    total = len(shapes) * len(tasks)
    for shape in shapes:
        inputs = make_inputs(shape, args.seed, with_grad_out=TRAINING in tasks)
        for task in tasks:
            _progress(f"[{len(cases) + 1}/{total}] {task} {shape.name} ({shape.label})")
            case = _run_case(shape, task, peers, args, inputs)
            _measure_memory(case, args)
            cases.append(case)
            print(format_case(case) + "\n", flush=True)

    record = {"settings": _settings(args, left_out, cases), "cases": cases}
    print(format_summary(record))
    json_path, png_path = args.out / f"comparison-{args.device}.json", args.out / f"comparison-{args.device}.png"
    write_json(json_path, record)
    if no_plot:
        print(f"\nwrote {json_path}; the plot was skipped: {no_plot}")
    else:
        plot_ratios(png_path, record)
        print(f"\nwrote {json_path} and {png_path}")

    failures = [(c["task"], c["shape"], name) for c in cases for name, p in c["peers"].items()
                if not p.get("agrees", True)]
    if failures:
        print("\nFAILED: these peers disagree with deformcp beyond tolerance (see DISAGREEMENT above): "
              + "; ".join(" ".join(f) for f in failures), file=sys.stderr)
        return 1
    return 0
