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
