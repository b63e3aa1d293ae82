"""Peak memory of one training step, fastseq vs torch.nn, each in a fresh process.

    python benchmarks/peak_memory.py        (needs torch==2.13.0 for the comparison)

Each process first compiles/warms up on a tiny shape, then reports how much its peak RSS
grew during one forward + backward at N=64, T=100, C=H=256 (float32).
"""

import resource
import subprocess
import sys

N, T, H = 64, 100, 256


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fastseq(cell):
    import numpy as np

    import fastseq

    cls = getattr(fastseq, cell.upper())
    small = cls(4, 4)
    out, _ = small(np.zeros((3, 2, 4), np.float32))
    small.backward(np.ones_like(out))
    layer = cls(H, H, seed=0)
    x = np.random.default_rng(0).standard_normal((T, N, H)).astype(np.float32)
    grad = np.ones((T, N, H), np.float32)
    base = _rss_mib()
    layer(x)
    layer.backward(grad)
    return _rss_mib() - base


def _torch(cell):
    import torch

    cls = getattr(torch.nn, cell.upper())
    small = cls(4, 4)
    small(torch.zeros(3, 2, 4, requires_grad=True))[0].sum().backward()
    layer = cls(H, H)
    x = torch.randn(T, N, H, requires_grad=True)
    base = _rss_mib()
    layer(x)[0].backward(torch.ones(T, N, H))
    return _rss_mib() - base


def main():
    if len(sys.argv) == 3:  # child process
        print(f"{(_fastseq if sys.argv[1] == 'fastseq' else _torch)(sys.argv[2]):.0f}")
        return
    print("| cell | fastseq peak growth | torch peak growth |")
    print("|---|---|---|")
    for cell in ("rnn", "lstm", "gru"):
        row = [subprocess.run([sys.executable, __file__, lib, cell], capture_output=True, text=True).stdout.strip() or "n/a"
               for lib in ("fastseq", "torch")]  # fmt: skip
        print(f"| {cell} | {row[0]} MiB | {row[1]} MiB |")


if __name__ == "__main__":
    main()
