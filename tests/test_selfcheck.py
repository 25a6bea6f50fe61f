"""``python -m deformcp``: the self-check passes, and its command line refuses bad options before any work."""

import subprocess
import sys

import pytest

import deformcp
from deformcp import selfcheck


def _exit(argv, capsys):
    """Run the command line, expecting it to exit; return (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        selfcheck.main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.mark.parametrize("repeats", ["0", "-1", "-20", "two", "1.5"])
def test_repeats_below_one_or_not_a_whole_number_is_refused_before_any_work(repeats, capsys):
    # A median of no runs printed as "nan ms" beside "all checks passed" is what this prevents.
    status, out, err = _exit(["--repeats", repeats], capsys)
    assert status == 2
    assert "argument --repeats:" in err and "at least 1" in err
    assert out == ""  # nothing checked, nothing timed


def test_repeats_of_one_is_accepted():
    assert selfcheck.parser().parse_args(["--repeats", "1"]).repeats == 1


def test_version(capsys):
    status, out, _ = _exit(["--version"], capsys)
    assert status == 0
    assert out.strip() == f"deformcp {deformcp.__version__}"


def test_help_names_the_options_and_says_where_the_comparison_is(capsys):
    status, out, _ = _exit(["--help"], capsys)
    assert status == 0
    for option in ("--version", "--repeats", "--no-timing"):
        assert option in out
    text = " ".join(out.split())  # argparse wraps the epilog
    assert "There are no subcommands" in text
    assert "python -m benchmarks.compare" in text


def test_bench_points_at_the_comparison_in_benchmarks(capsys):
    status, out, err = _exit(["bench", "--shapes", "tiny"], capsys)
    assert status == 2 and out == ""
    assert "python -m benchmarks.compare" in err and "clone" in err


def test_the_self_check_passes_as_a_module():
    done = subprocess.run([sys.executable, "-m", "deformcp", "--no-timing"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    assert "FAIL" not in done.stdout
