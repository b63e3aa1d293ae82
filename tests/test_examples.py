"""The three examples in examples/, each run end to end on a small slice (the default runs'
figures are in the README), plus their --help."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.after_compiles  # the examples' processes load the kernels from the cache

SMALL = {
    "char_lm.py": [
        "--chars",
        "20000",
        "--hidden",
        "32",
        "--epochs",
        "1",
        "--bptt",
        "50",
        "--sample-length",
        "40",
    ],
    "forecast.py": ["--limit", "700", "--epochs", "3", "--hidden", "16"],
    "vowels.py": ["--limit", "60", "--epochs", "3", "--hidden", "16"],
}
EXPECT = {
    "char_lm.py": ["validation bits/char:", "--- sample, temperature 0.5 ---"],
    "forecast.py": ["LSTM ", "seasonal naive ", "LSTM beats both baselines:"],
    "vowels.py": ["test accuracy:"],
}


def run_example(script, *args, launcher=()):
    """Run examples/<script> with ``args`` (under ``launcher``, e.g. mpiexec, if given)."""
    return subprocess.run(
        [*launcher, sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("script", sorted(SMALL))
def test_example_runs_on_a_small_slice_and_plots(script, tmp_path):
    plot = tmp_path / "out.png"
    result = run_example(script, *SMALL[script], "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECT[script]:
        assert text in result.stdout, result.stdout
    assert "loss" in result.stderr  # the progress bar shows the loss
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script", sorted(SMALL))
def test_example_help(script):
    result = run_example(script, "--help")
    assert result.returncode == 0 and "--plot" in result.stdout and "Usage:" in result.stdout
