"""Time two builds of fastseq against each other in one process (an A/B of a change).

    python benchmarks/ab_builds.py A B CASE [CASE ...] [--rounds 21] [--reps 300]

A and B: git revisions of this repository (anything ``git archive`` takes: ``HEAD``,
``main~2``, a commit) or directories holding a ``fastseq/`` package (``.``: the working
tree). CASE: ``cell:mode:N:T:H[:lengths]`` with mode ``forward`` (eval) or ``train``
(forward + backward) and lengths ``full`` (default) or ``random`` (``fastseq bench``'s
data, C = H).

Each build's ``fastseq`` package is copied under a temporary directory as a package of
its own name (``fastseq_a``, ``fastseq_b``: every ``fastseq`` word in its Python files
renamed), so both import side by side and their layers run alternately, in blocks of
``--reps`` calls, the first build first in even rounds; each round gives one ratio of
medians B / A. Prints the median ratio over the rounds with its quartiles.

Why in one process: between processes of the same build the median time of a small
layer varied by up to 1.5x (RNN forward at N=32, T=100, H=64, random lengths: 0.108-0.169
ms over seven processes, Zen 5), far more than the changes measured. In one process two
copies of the same build (A/A) read 0.985-1.006 over five cases (21 rounds of 300 calls):
code placement alone moves a case by about 1.5%, the floor below which a ratio says
nothing. The machine's noise comes in bursts (blocks of 300 calls at 125-134 us among
blocks at 109-111 us), which the alternation spreads over both builds but which still
move a ratio by a few percent over a few rounds: one pair of builds read 1.019 (q1-q3
1.010-1.065) over 21 rounds and 0.968 (0.931-0.996) over 9. Both builds compile from an empty numba cache (their sources are new files, the
cache a temporary directory): a minute or more per build and case family.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

#: Words ``fastseq`` in a build's Python files (imports, module paths), not ``fastseq_x``.
_PACKAGE_WORD = re.compile(r"\bfastseq\b")


def parse_case(text: str):
    """``cell:mode:N:T:H[:lengths]`` -> (cell, mode, N, T, H, lengths)."""
    parts = text.split(":")
    if len(parts) not in (5, 6):
        raise ValueError(f"case {text!r}: expected cell:mode:N:T:H[:lengths]")
    cell, mode = parts[0], parts[1]
    if mode not in ("forward", "train"):
        raise ValueError(f"case {text!r}: mode must be forward or train, not {mode!r}")
    lengths = parts[5] if len(parts) == 6 else "full"
    return cell, mode, int(parts[2]), int(parts[3]), int(parts[4]), lengths


def export_package(source: str, dest: str, repo: str = ".") -> str:
    """Write build ``source`` (a git revision of ``repo``, or a directory with a ``fastseq/``
    package) to ``dest``/fastseq; returns that path."""
    target = os.path.join(dest, "fastseq")
    if os.path.isdir(os.path.join(source, "fastseq")):
        shutil.copytree(os.path.join(source, "fastseq"), target, ignore=shutil.ignore_patterns("__pycache__"))
        return target
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", source, "fastseq"],
                             capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return target


def rename_package(package_dir: str, name: str) -> str:
    """Rename the package at ``package_dir`` to ``name`` (a sibling directory), with every
    ``fastseq`` word in its Python files replaced; returns the new directory."""
    new_dir = os.path.join(os.path.dirname(package_dir), name)
    os.rename(package_dir, new_dir)
    for root, _dirs, files in os.walk(new_dir):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(root, file)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(_PACKAGE_WORD.sub(name, text))
    return new_dir


def build_case(package: str, case):
    """A callable running one timed unit of ``case`` with the renamed ``package``."""
    harness = importlib.import_module(package + ".bench.harness")
    cell, mode, n, t, h, lengths = case
    bench_case = harness.BenchCase(cell, mode, n, t, h, h, lengths=lengths)
    return harness.build_fastseq(bench_case, harness.Inputs(bench_case))[0]


def _median_seconds(fn, reps: int) -> float:
    fn()  # untimed: the other build ran just before
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(fns_a, fns_b, rounds: int, reps: int):
    """Per case: (median A s, median B s, median ratio B / A, q1, q3) over ``rounds``."""
    results = []
    for fn_a, fn_b in zip(fns_a, fns_b, strict=True):
        fn_a(), fn_b()  # compile / load and warm up
        a_s, b_s = [], []
        for r in range(rounds):
            if r % 2 == 0:
                a_s.append(_median_seconds(fn_a, reps))
                b_s.append(_median_seconds(fn_b, reps))
            else:
                b_s.append(_median_seconds(fn_b, reps))
                a_s.append(_median_seconds(fn_a, reps))
        ratios = sorted(b / a for a, b in zip(a_s, b_s, strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        results.append((statistics.median(a_s), statistics.median(b_s), statistics.median(ratios), q1, q3))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="git revision or directory with fastseq/ (the base)")
    parser.add_argument("b", help="git revision or directory with fastseq/ (the change)")
    parser.add_argument("cases", nargs="+", help="cell:mode:N:T:H[:lengths]")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--reps", type=int, default=300, help="calls per block")
    args = parser.parse_args(argv)
    cases = [parse_case(c) for c in args.cases]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="fastseq-ab-") as work:
        if "numba" not in sys.modules:  # the builds' kernels cache there, removed after
            os.environ["NUMBA_CACHE_DIR"] = os.path.join(work, "numba-cache")
        packages = []
        for label, source in (("a", args.a), ("b", args.b)):
            build_dir = os.path.join(work, label)
            os.makedirs(build_dir)
            rename_package(export_package(source, build_dir, repo), f"fastseq_{label}")
            sys.path.insert(0, build_dir)
            packages.append(f"fastseq_{label}")
        fns = [[build_case(p, case) for case in cases] for p in packages]
        results = compare(fns[0], fns[1], args.rounds, args.reps)
    print(f"| case | A ({args.a}) | B ({args.b}) | B / A (q1-q3) |")
    print("|---|---|---|---|")
    for text, (a_s, b_s, ratio, q1, q3) in zip(args.cases, results, strict=True):
        print(f"| {text} | {a_s * 1e3:.4f} ms | {b_s * 1e3:.4f} ms | {ratio:.3f} ({q1:.3f}-{q3:.3f}) |")
    return results


if __name__ == "__main__":
    main()
