"""asv cannot rot: a quick pass over every benchmark, then the dashboard is built.

At the "small" shape only (FASTSEQ_ASV_SHAPES, see benchmarks/bench_cells.py): asv starts
a process per benchmark and shape, and all four shapes took 160-200 s of the suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASV = [sys.executable, "-m", "asv"]
pytestmark = pytest.mark.after_compiles  # asv's processes load the kernels from the cache


def test_asv_quick_run_and_publish(tmp_path):
    # CI may have no HOME: asv keeps machine info there
    env = dict(os.environ, HOME=str(tmp_path), FASTSEQ_ASV_SHAPES="small")
    run = lambda *args: subprocess.run(ASV + list(args), cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: E731
    assert run("machine", "--yes").returncode == 0
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = run("run", "--python=same", "--quick", "--set-commit-hash", commit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted((ROOT / ".asv" / "results").glob(f"*/{commit[:8]}-existing-*.json"))
    assert files, "asv wrote no results"
    results = json.loads(files[0].read_text())["results"]
    expected = {f"bench_cells.{c}Suite.{b}" for c in ("RNN", "LSTM", "GRU") for b in (
        "time_forward", "time_train_step", "time_stream_step", "time_stream_step_batched", "time_forward_lengths",
        "peakmem_train_step", "track_train_gflops")}  # fmt: skip
    assert expected <= set(results)
    failed = [name for name, value in results.items() if value[0] is None or None in value[0]]
    assert all(len(value[0]) == 1 for name, value in results.items() if name in expected)  # one shape
    assert not failed, f"benchmarks failed: {failed}"
    published = run("publish")
    assert published.returncode == 0, published.stderr[-3000:]
    assert (ROOT / ".asv" / "html" / "index.html").exists()
