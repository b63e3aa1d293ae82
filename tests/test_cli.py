"""The fastseq command through click's CliRunner: every command and option path."""

import csv
import importlib.util
import io
import json

import pytest
from click.testing import CliRunner

from fastseq import __version__
from fastseq.bench import harness, peers
from fastseq.cli import main

TINY = ["-N", "2", "-T", "3", "--hidden-size", "4", "--repeat", "1", "--warmup", "0"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version_and_help():
    assert __version__ in invoke("--version").stdout
    out = invoke("bench", "--help").stdout
    for option in ("--cell", "--mode", "--batch", "--seq-len", "--input-size", "--hidden-size", "--layers",
                   "--bidirectional", "--dtype", "--lengths", "--threads", "--repeat", "--warmup", "--compare",
                   "--format", "--output", "--quick"):  # fmt: skip
        assert option in out


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bench_table_every_mode(cell):
    result = invoke("bench", "--cell", cell, *TINY)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:8] == ["cell", "mode", "N", "T", "C", "H", "L", "D"]
    rows = [ln.split() for ln in lines[2:5]]
    assert [r[:2] for r in rows] == [[cell, "forward"], [cell, "train"], [cell, "stream"]]
    assert "sgemm rate" in result.stdout
    assert "[3/3]" in result.stderr  # progress goes to stderr


def test_bench_json_schema_and_options(tmp_path):
    out = tmp_path / "r.json"
    result = invoke("bench", "--cell", "gru", "--mode", "train", "--mode", "forward", "-N", "3", "-N", "2", "-T", "4",
                    "--input-size", "5", "--hidden-size", "4", "--layers", "2", "--bidirectional", "--dtype", "float64",
                    "--lengths", "random", "--threads", "1", "--repeat", "2", "--warmup", "1", "--format", "json",
                    "--output", str(out))  # fmt: skip
    assert result.exit_code == 0 and result.stdout == ""
    report = json.loads(out.read_text())
    assert report["schema"] == "fastseq-bench/1"
    assert {"model", "cores", "simd"} <= set(report["machine"])
    assert {"fastseq", "numba", "numpy", "scipy"} <= set(report["versions"])
    assert report["threads"] == 1 and report["sgemm_gflops"] > 0 and report["blas"]
    assert report["threading"]["numba_threads"] >= 1
    rows = report["results"]
    assert len(rows) == 4
    for row in rows:
        assert row["layers"] == 2 and row["directions"] == 2 and row["dtype"] == "float64"
        assert row["lengths"] == "random" and row["input_size"] == 5
        assert row["median_s"] > 0 and row["gflops"] > 0 and row["compile_s"] >= 0
        assert row["tokens_per_s"] <= row["batch"] * row["steps"] / row["median_s"] + 1e-9


def test_bench_csv():
    result = invoke("bench", "--cell", "rnn", "--mode", "forward", "--format", "csv", *TINY)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1
    assert rows[0]["cell"] == "rnn" and rows[0]["machine_model"] and float(rows[0]["sgemm_gflops"]) > 0


def test_bench_compare_torch_and_numpy():
    result = invoke("bench", "--cell", "lstm", "--compare", "torch", "--threads", "1", *TINY)
    assert result.exit_code == 0 and "ratio vs torch" in result.stdout and "torch 2.13.0" in result.stdout
    result = invoke("bench", "--cell", "gru", "--compare", "numpy", "--format", "json", *TINY)
    rows = json.loads(result.stdout)["results"]
    assert [r["ratio"] is None for r in rows] == [False, True, False]  # numpy has no training step
    assert rows[1]["peer_note"] == "numpy peer has no training step"


def test_bench_compare_onnxruntime_and_jax():
    result = invoke("bench", "--cell", "rnn", "--compare", "onnxruntime", "--format", "json", *TINY)
    report = json.loads(result.stdout)
    assert report["versions"]["onnxruntime"] and report["versions"]["onnx"]
    rows = report["results"]
    assert [r["ratio"] is None for r in rows] == [False, True, False]  # inference only
    assert rows[1]["peer_note"] == "onnxruntime runs inference only"
    result = invoke("bench", "--cell", "gru", "--compare", "jax", "--format", "markdown", *TINY)
    assert result.exit_code == 0 and "| jax | ratio |" in result.stdout and ", jax 0." in result.stdout
    result = invoke("bench", "--cell", "gru", "--mode", "forward", "--compare", "jax", "--threads", "1",
                    "--format", "json", *TINY)  # fmt: skip
    assert (
        json.loads(result.stdout)["results"][0]["peer_note"]
        == "jax's thread pool cannot be limited (--threads)"
    )


def test_bench_compare_several_peers_gives_each_and_the_fastest():
    result = invoke("bench", "--cell", "lstm", "--compare", "numpy", "--compare", "onnxruntime", "--compare",
                    "numpy", "--format", "json", *TINY)  # fmt: skip
    report = json.loads(result.stdout)
    assert report["versions"]["onnxruntime"] and "--compare" in report["command"]
    forward, train, stream = report["results"]
    for row in (forward, stream):
        assert [p["peer"] for p in row["peers"]] == ["numpy", "onnxruntime"]  # each once, in order
        fastest = min(row["peers"], key=lambda p: p["median_s"])
        assert row["peer"] == fastest["peer"] and row["peer_median_s"] == fastest["median_s"]
        assert row["ratio"] == pytest.approx(row["median_s"] / fastest["median_s"])
    assert train["ratio"] is None and train["peer_note"] == (
        "numpy peer has no training step; onnxruntime runs inference only"
    )
    table = invoke("bench", "--cell", "rnn", "--mode", "forward", "--compare", "numpy", "--compare", "onnxruntime",
                   *TINY).stdout  # fmt: skip
    assert "numpy median  onnxruntime median" in table and "ratio vs fastest" in table
    markdown = invoke("bench", "--cell", "rnn", "--mode", "train", "--compare", "numpy", "--compare",
                      "onnxruntime", "--format", "markdown", *TINY).stdout  # fmt: skip
    assert "| numpy | onnxruntime | fastest | ratio |" in markdown
    assert "| - | - | - | numpy peer has no training step; onnxruntime runs inference only |" in markdown
    rows = list(csv.DictReader(io.StringIO(invoke("bench", "--cell", "gru", "--mode", "stream", "--compare",
                                                  "numpy", "--compare", "onnxruntime", "--format", "csv",
                                                  *TINY).stdout)))  # fmt: skip
    assert float(rows[0]["numpy_ratio"]) > 0 and float(rows[0]["onnxruntime_median_s"]) > 0


@pytest.mark.parametrize(
    ("peer", "message"),
    [("torch", "needs torch, which is not installed: pip install torch==2.13.0"),
     ("onnxruntime", "needs onnx, which is not installed: pip install onnxruntime onnx"),
     ("jax", "needs jaxlib, which is not installed: pip install jax")],
)  # fmt: skip
def test_bench_compare_peer_missing(monkeypatch, peer, message):
    """One package missing (the message says "is"); then all of the peer's ("are")."""
    hidden = peers.PEER_PACKAGES[peer][-1]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hidden else real_find_spec(name, *a)
    )
    result = CliRunner().invoke(main, ["bench", "--compare", peer, *TINY])
    assert result.exit_code == 2
    assert f"--compare {peer} {message}" in result.stderr and "fastseq[peers]" in result.stderr
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    result = CliRunner().invoke(main, ["bench", "--compare", peer, *TINY])
    names = " and ".join(peers.PEER_PACKAGES[peer])
    assert (
        f"--compare {peer} needs {names}, which {'are' if ' and ' in names else 'is'} not installed"
        in result.stderr
    )


@pytest.mark.parametrize(
    ("block_seconds", "expected"),
    [
        (1.0, "f" + "f" * 6 + "p" * 6),  # microsecond calls: one block each, an untimed lead + 5
        (0.0, "f" + "ffpp" * 4),  # calls longer than a block: one by one, each after an untimed one
    ],
)
def test_run_case_alternates_with_its_peer_in_blocks(monkeypatch, block_seconds, expected):
    calls = []
    monkeypatch.setattr(harness, "build_fastseq", lambda case, inputs: (lambda: calls.append("f"), None))
    monkeypatch.setattr(harness, "BLOCK_SECONDS", block_seconds)

    class Peer:
        name = "fake"

        def __init__(self, case, module, inputs):
            pass

        def runner(self):
            return lambda: calls.append("p")

    case = harness.BenchCase(cell="rnn", mode="forward", batch=2, steps=3, input_size=4, hidden_size=4)
    repeat = 5 if block_seconds else 4
    row = harness.run_case(case, repeat=repeat, warmup=0, peer_factories=[Peer])
    assert "".join(calls) == expected  # the first call is the untimed compile call
    assert row["peer"] == "fake" and row["ratio"] > 0


def test_default_grid_and_quick():
    grid = harness.default_grid()
    assert len(grid) == 18
    assert {c.cell for c in grid} == {"rnn", "lstm", "gru"} and {c.mode for c in grid} == {
        "forward",
        "train",
        "stream",
    }
    assert all(c.batch == 1 for c in grid if c.mode == "stream")
    result = invoke("bench", "--quick", "--cell", "rnn", "--mode", "stream", "--format", "json")
    rows = json.loads(result.stdout)["results"]
    assert [(r["batch"], r["hidden_size"]) for r in rows] == [(1, 64), (1, 256)]


@pytest.mark.parametrize(
    "args,option",
    [
        (["--cell", "transformer"], "--cell"),
        (["--mode", "fast"], "--mode"),
        (["-N", "0"], "-N"),
        (["-T", "x"], "-T"),
        (["--hidden-size", "-3"], "--hidden-size"),
        (["--input-size", "0"], "--input-size"),
        (["--layers", "0"], "--layers"),
        (["--dtype", "int8"], "--dtype"),
        (["--lengths", "some"], "--lengths"),
        (["--threads", "0"], "--threads"),
        (["--threads", "4096"], "--threads"),
        (["--repeat", "0"], "--repeat"),
        (["--warmup", "-1"], "--warmup"),
        (["--compare", "tensorflow"], "--compare"),
        (["--format", "xml"], "--format"),
        (["--output", "/"], "--output"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_options_are_usage_errors(args, option):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert option in result.stderr


def test_info_text_and_json():
    result = invoke("info")
    assert result.exit_code == 0
    for part in (
        "versions:",
        "numba threading layer",
        "BLAS:",
        "CPU:",
        "SIMD",
        "kernel cache:",
        "compiled kernels on disk",
    ):
        assert part in result.stdout
    data = json.loads(invoke("info", "--json").stdout)
    assert set(data) == {"versions", "threading", "blas", "cpu", "kernel_cache"}
    assert "lstm_forward" in data["kernel_cache"]["cached_specialisations"]


def test_warmup_compiles_everything():
    # float32: the tests before this one compiled many of its kernels already (a fresh
    # cache of its own took 316 s of compiling, against the suite's 20 minutes)
    result = invoke("warmup", "--dtype", "float32")
    assert result.exit_code == 0
    assert "[3/3] gru float32" in result.stderr and "kernels ready" in result.stdout
    status = json.loads(invoke("info", "--json").stdout)["kernel_cache"]["cached_specialisations"]
    assert all(n for n in status.values())
    assert CliRunner().invoke(main, ["warmup", "--dtype", "float16"]).exit_code == 2


def test_preset_targets():
    grid = harness.target_grid()
    assert len(grid) == 3 * (4 * 2 + 1)
    assert {
        (c.batch, c.steps, c.hidden_size, c.layers, c.bidirectional) for c in grid if c.mode == "train"
    } == {
        (32, 100, 64, 1, False),
        (64, 100, 256, 1, False),
        (64, 50, 1024, 1, False),
        (64, 100, 256, 2, True),
    }
    result = CliRunner().invoke(main, ["bench", "--preset", "targets", "-N", "4"])
    assert result.exit_code == 2 and "--preset targets sets the shapes itself" in result.stderr
    result = invoke(
        "bench",
        "--preset",
        "targets",
        "--cell",
        "rnn",
        "--mode",
        "stream",
        "--repeat",
        "1",
        "--format",
        "json",
    )
    rows = json.loads(result.stdout)["results"]
    assert [(r["batch"], r["hidden_size"]) for r in rows] == [(1, 128)]


def test_markdown_format():
    result = invoke(
        "bench", "--cell", "gru", "--mode", "train", "--compare", "numpy", "--format", "markdown", *TINY
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| cell | mode | N, T, C=H |") and lines[1].startswith("|---|")
    assert (
        lines[2].startswith("| gru | train | 2, 3, 4 | 1 x 1 |")
        and "numpy peer has no training step" in lines[2]
    )
    assert "`fastseq bench" in result.stdout
