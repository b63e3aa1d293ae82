"""Cost of a batch at random lengths against the same batch at full length (goal <= 0.6x).

    python benchmarks/lengths_ratio.py [--cell rnn] [--mode forward] [--shape N,T,H] [--rounds 41]

For each cell, mode (``forward``: eval; ``train``: forward + backward) and shape (default:
32,100,64, 64,100,256 and 64,50,1024, the one-layer target shapes; C = H), two layers with
the same weights run the data of ``fastseq bench`` (``fastseq.bench.harness.Inputs``:
lengths uniform in [1, T], one sample at T) at random and at full length. The two are
timed in alternating blocks of about ``harness.BLOCK_SECONDS`` of calls, each block led by
an untimed call, the way the bench alternates fastseq with torch; each round gives one
ratio random / full. Prints the median ratio over the rounds with its quartiles, and the
share of valid steps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastseq.bench.harness import BLOCK_SECONDS, BenchCase, Inputs, build_fastseq

DEFAULT_SHAPES = ((32, 100, 64), (64, 100, 256), (64, 50, 1024))


def _block(fn, calls):
    """Seconds per call of ``calls`` calls after one untimed call."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(cell: str, mode: str, shape, rounds: int) -> dict:
    """Random / full for one case: median and quartiles over ``rounds`` rounds."""
    n, t, h = shape
    runs = {}
    for lengths in ("random", "full"):
        case = BenchCase(cell, mode, n, t, h, h, lengths=lengths)
        inputs = Inputs(case)
        runs[lengths] = build_fastseq(case, inputs)[0]
        if lengths == "random":
            valid = inputs.tokens / (n * t)
    for fn in runs.values():  # compile / load, and warm up
        fn()
        fn()
    calls = max(1, int(BLOCK_SECONDS / max(min(_block(fn, 1) for fn in runs.values()), 1e-6)))
    ratios, random_s, full_s = [], [], []
    for r in range(rounds):
        order = ("random", "full") if r % 2 == 0 else ("full", "random")
        seconds = {lengths: _block(runs[lengths], calls) for lengths in order}
        random_s.append(seconds["random"])
        full_s.append(seconds["full"])
        ratios.append(seconds["random"] / seconds["full"])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"cell": cell, "mode": mode, "shape": shape, "valid": valid, "ratio": median, "q1": q1, "q3": q3,
            "random_s": float(np.median(random_s)), "full_s": float(np.median(full_s))}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", action="append", choices=("rnn", "lstm", "gru"))
    parser.add_argument("--mode", action="append", choices=("forward", "train"))
    parser.add_argument("--shape", action="append", help="N,T,H (C = H); repeatable")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else DEFAULT_SHAPES
    print("| cell | mode | N, T, C=H | valid steps | random | full | random / full (q1-q3) |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for cell in args.cell or ("rnn", "lstm", "gru"):
        for mode in args.mode or ("forward", "train"):
            for shape in shapes:
                row = measure(cell, mode, shape, args.rounds)
                results.append(row)
                print(f"| {cell} | {mode} | {', '.join(map(str, shape))} | {row['valid']:.3f} | "
                      f"{row['random_s'] * 1e3:.3f} ms | {row['full_s'] * 1e3:.3f} ms | "
                      f"{row['ratio']:.3f} ({row['q1']:.3f}-{row['q3']:.3f}) |", flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
