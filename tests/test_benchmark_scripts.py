"""The measurement scripts in benchmarks/ that are not asv suites still run."""

from benchmarks import lengths_ratio


def test_lengths_ratio_reports_each_case(capsys):
    rows = lengths_ratio.main(["--cell", "rnn", "--cell", "gru", "--mode", "forward", "--mode", "train",
                               "--shape", "4,6,3", "--rounds", "3"])  # fmt: skip
    assert [(r["cell"], r["mode"]) for r in rows] == [("rnn", "forward"), ("rnn", "train"), ("gru", "forward"),
                                                      ("gru", "train")]  # fmt: skip
    for row in rows:
        assert 0 < row["q1"] <= row["ratio"] <= row["q3"]
        assert 0 < row["valid"] < 1  # the bench's seeded lengths: one sample at T, the others shorter
        assert row["random_s"] > 0 and row["full_s"] > 0
    out = capsys.readouterr().out
    assert out.count("| rnn | ") == 2 and out.count("| gru | ") == 2


def test_perf_map_names_the_compiled_kernels(tmp_path):
    import numpy as np

    import fastseq
    from benchmarks import perf_map
    from fastseq.kernels.rnn import rnn_forward

    fastseq.RNN(3, 3).eval()(np.zeros((6, 4, 3), np.float32))
    path = tmp_path / "perf.map"
    count = perf_map.write_perf_map(str(path))
    rows = [line.split() for line in path.read_text().splitlines()]
    assert len(rows) == count > 0
    addresses = [int(a, 16) for a, _, _ in rows]
    assert addresses == sorted(addresses) and all(int(size, 16) > 0 for _, size, _ in rows)
    entries = {result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
               for result in rnn_forward.overloads.values()}  # fmt: skip
    named = {int(a, 16) for a, _, name in rows if name.startswith("rnn.rnn_forward.v")}
    assert entries and entries <= named


def test_perf_map_short_names():
    from benchmarks.perf_map import short_name

    assert (
        short_name("_ZN7fastseq7kernels4gemm11gemm_packedB3v56B126c8tJTIeFIjxB2IE5Arr")
        == "gemm.gemm_packed.v56"
    )
    assert short_name("cfunc._ZN7fastseq7kernels3rnn8rnn_stepB2v9B1xE") == "cfunc.rnn.rnn_step.v9"
    assert short_name("_ZN13_3cdynamic_3e36__numba_parfor_gufunc_0x7fd2be2027d0B3v97B1E") == (
        "__numba_parfor_gufunc_0x7fd2be2027d0.v97"
    )
    assert short_name("NRT_decref") == "NRT_decref"


def test_ab_builds_cases_parse():
    import pytest

    from benchmarks.ab_builds import parse_case

    assert parse_case("rnn:forward:32:100:64") == ("rnn", "forward", 32, 100, 64, "full")
    assert parse_case("gru:train:4:5:6:random") == ("gru", "train", 4, 5, 6, "random")
    with pytest.raises(ValueError, match="cell:mode:N:T:H"):
        parse_case("rnn:forward:32")
    with pytest.raises(ValueError, match="forward or train"):
        parse_case("rnn:stream:1:5:8")


def test_ab_builds_exports_renamed_packages(tmp_path, monkeypatch):
    """A git revision and a directory both give a package of the new name that imports
    beside fastseq, with no ``fastseq`` module name left in its Python files."""
    import importlib
    import os
    import pathlib
    import re

    from benchmarks.ab_builds import export_package, rename_package

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for label, source in (("a", "HEAD"), ("b", repo)):
        dest = tmp_path / label
        dest.mkdir()
        package = rename_package(export_package(source, str(dest), repo), f"fastseq_{label}")
        assert os.path.isfile(os.path.join(package, "kernels", "rnn.py"))
        assert not (dest / "fastseq").exists() and not any("__pycache__" in d for d, _, _ in os.walk(package))
        for root, _, files in os.walk(package):
            for file in files:
                if file.endswith(".py"):
                    text = pathlib.Path(root, file).read_text(encoding="utf-8")
                    assert not re.search(r"\bfastseq\b", text), file
        monkeypatch.syspath_prepend(str(dest))
        module = importlib.import_module(f"fastseq_{label}.bench.harness")
        assert module.__name__ == f"fastseq_{label}.bench.harness" and callable(module.build_fastseq)
        assert importlib.import_module(f"fastseq_{label}.kernels.rnn").rnn_forward.__module__ == (
            f"fastseq_{label}.kernels.rnn"
        )
