"""The side-by-side comparison (``python -m benchmarks.compare``) runs, its peers agree with deformcp, and it writes its files.

This is also a cross-check of deformcp's semantics against independent
implementations: ONNX Runtime's DeformConv, OpenVINO's DeformableConvolution and a
grid_sample version by autograd, on a tiny shape that has groups, offset groups,
stride, dilation and asymmetric padding.  The comparison lives in ``benchmarks/``
(not in the package) and its peers in the ``bench`` extra, which CI installs, so
these tests skip only where a peer is really absent, with the reason printed.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.compare import cli
from benchmarks.compare.agreement import compare_outputs
from benchmarks.compare.peers import peer_module, prepare_runner
from benchmarks.compare.runner import FORWARD, OUTPUT_NAMES, TRAINING, PeerUnavailable
from benchmarks.shapes import TINY, make_inputs

CPU_PEERS = [(name, task) for name in ("onnxruntime", "openvino", "grid_sample") for task in (FORWARD, TRAINING)
             if task in peer_module(name).TASKS]


def _require(name):
    reason = peer_module(name).missing("cpu")
    if reason:
        pytest.skip(f"{name} is absent here: {reason}")


@pytest.fixture(scope="module")
def tiny_inputs():
    return make_inputs(TINY, seed=3)


def _outputs(name, task, inputs):
    runner = prepare_runner(name, task, TINY, inputs, "cpu")
    return runner.fetch(runner())


@pytest.fixture(scope="module")
def reference(tiny_inputs):
    return {task: _outputs("deformcp", task, tiny_inputs) for task in (FORWARD, TRAINING)}


@pytest.mark.parametrize("name, task", CPU_PEERS)
def test_peer_agrees_with_deformcp(name, task, tiny_inputs, reference):
    _require(name)
    agreements = compare_outputs(name, task, reference[task], _outputs(name, task, tiny_inputs))
    assert [a.output for a in agreements] == list(OUTPUT_NAMES[task])
    for agreement in agreements:
        assert agreement.ok, f"{name} {task} {agreement.output}: {agreement.error:.3g} > {agreement.tolerance:.3g}"
    # Far tighter than the tolerance: on a tiny shape only rounding separates them.
    assert max(a.error for a in agreements) < 1e-5


def test_a_semantic_difference_is_caught(tiny_inputs, reference):
    """The check is not vacuous: shifting every offset by a fifth of a pixel is detected."""
    shifted = make_inputs(TINY, seed=3)
    shifted.offset[...] += 0.2
    (agreement,) = compare_outputs("deformcp", FORWARD, reference[FORWARD], _outputs("deformcp", FORWARD, shifted))
    assert not agreement.ok
    # A single NaN among correct values never agrees either.
    with_nan = reference[FORWARD][0].copy()
    with_nan.flat[0] = np.nan
    (agreement,) = compare_outputs("deformcp", FORWARD, reference[FORWARD], (with_nan,))
    assert agreement.error == float("inf") and not agreement.ok


def test_bench_runs_and_writes_json_and_png(tmp_path, capsys):
    for name in ("onnxruntime", "openvino", "grid_sample"):
        _require(name)
    status = cli.main(["--shapes", "tiny", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    record = json.loads((tmp_path / "comparison-cpu.json").read_text())
    png = (tmp_path / "comparison-cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000

    cases = {(c["task"], c["shape"]): c for c in record["cases"]}
    assert set(cases) == {(FORWARD, "tiny"), (TRAINING, "tiny")}
    assert set(cases[FORWARD, "tiny"]["peers"]) == {"deformcp", "onnxruntime", "openvino", "grid_sample"}
    assert set(cases[TRAINING, "tiny"]["peers"]) == {"deformcp", "grid_sample"}
    for case in record["cases"]:
        for name, peer in case["peers"].items():
            assert peer["median_s"] > 0 and len(peer["samples_s"]) == 1
            assert peer["ratio"] == pytest.approx(case["peers"]["deformcp"]["median_s"] / peer["median_s"])
            if name != "deformcp":
                assert peer["agrees"], peer["agreement"]
    memory = cases[FORWARD, "tiny"]["memory"]
    assert set(memory) == {"deformcp", "onnxruntime", "openvino"}
    for figure in memory.values():
        assert figure["peak_bytes"] >= figure["rss_before_bytes"] > 0, figure
    assert record["settings"]["cpu_threads"] >= 1
    assert "intra_op_num_threads" in record["settings"]["peers"]["onnxruntime"]
    assert "ratio = deformcp median time / peer median time" in captured.out
    assert "[1/2] forward tiny" in captured.err  # progress goes to stderr


def test_bench_fails_loudly_on_disagreement(tmp_path, capsys, monkeypatch):
    _require("onnxruntime")
    from benchmarks.compare import onnxruntime_peer

    real_prepare = onnxruntime_peer.prepare

    def wrong_padding(task, shape, inputs, device):
        # A peer that reads the padding in the other order (bottom/right first) must be caught.
        top, left, bottom, right = shape.padding
        return real_prepare(task, type(shape)(**{**shape.as_dict(), "padding": (bottom, right, top, left)}),
                            inputs, device)

    # The swap keeps top+bottom and left+right, so the output's size is unchanged; only its values move.
    monkeypatch.setattr(onnxruntime_peer, "prepare", wrong_padding)
    status = cli.main(["--shapes", "tiny", "--peers", "onnxruntime", "--task", "forward", "--repeats", "1",
                       "--warmup", "0", "--no-memory", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 1
    assert "DISAGREEMENT: onnxruntime forward tiny out" in captured.err
    assert "DISAGREES" in captured.out


def _refuse_to_measure(*args, **kwargs):
    raise AssertionError("the comparison measured although it could not write its results")


def test_bench_refuses_an_unwritable_output_folder_before_measuring(tmp_path, capsys, monkeypatch):
    # A path through a regular file: unwritable for every user, root included (unlike permission bits).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cli, "measure_interleaved", _refuse_to_measure)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--shapes", "tiny", "--task", "forward", "--no-memory", "--out", str(blocker / "results")])
    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert f"--out {blocker / 'results'}: the results cannot be written there" in captured.err
    assert "[1/" not in captured.err  # no case was started


def test_bench_without_matplotlib_writes_the_json_and_says_the_plot_was_skipped(tmp_path, capsys, monkeypatch):
    _require("onnxruntime")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    status = cli.main(["--shapes", "tiny", "--peers", "onnxruntime", "--task", "forward", "--repeats", "1",
                       "--warmup", "0", "--settle", "0", "--no-memory", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    # Said before measuring, and again with the result.
    warning = "matplotlib is not installed"
    assert warning in captured.err and captured.err.index(warning) < captured.err.index("[1/1] forward tiny")
    assert f"the plot was skipped: {warning}" in captured.out
    record = json.loads((tmp_path / "comparison-cpu.json").read_text())
    assert set(record["cases"][0]["peers"]) == {"deformcp", "onnxruntime"}
    assert not (tmp_path / "comparison-cpu.png").exists()


def test_prepare_runner_refuses_a_task_the_peer_does_not_run(tiny_inputs):
    _require("openvino")
    with pytest.raises(PeerUnavailable, match="does not run training"):
        prepare_runner("openvino", TRAINING, TINY, tiny_inputs, "cpu")


def test_prepare_runner_refuses_torchvision_on_the_cpu(tiny_inputs):
    with pytest.raises(PeerUnavailable, match="CUDA device only"):
        prepare_runner("torchvision", FORWARD, TINY, tiny_inputs, "cpu")


def test_asv_finds_only_the_suite_and_the_suite_needs_only_the_public_api():
    """asv imports every module under benchmarks/, the comparison's too, and takes any function
    named ``time_*``, ``track_*``, ... for a benchmark; its suite must run against older commits,
    so it may reach deformcp only through the public API (what ``import deformcp`` loads)."""
    discovery = pytest.importorskip("asv_runner.discovery", reason="asv (the bench extra) is not installed")
    root = pathlib.Path(__file__).resolve().parents[1]
    names = [b.name for b in discovery.disc_benchmarks(str(root / "benchmarks"))]
    assert names and all(name.startswith("deform_conv.") for name in names), names

    loaded = ("import sys, deformcp; before = {m for m in sys.modules if m.startswith('deformcp')}; "
              "import benchmarks.deform_conv; "
              "print(sorted(m for m in sys.modules if m.startswith('deformcp') and m not in before))")
    done = subprocess.run([sys.executable, "-c", loaded], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"the asv suite imports deformcp internals: {done.stdout}"
