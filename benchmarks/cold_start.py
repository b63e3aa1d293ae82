"""Cold and warm start of fastseq, each in fresh interpreters.

    python benchmarks/cold_start.py

Prints the time of ``import fastseq`` and of each cell's first layer, built and run
forward (eval mode, float32), once with an empty numba cache (cold: kernels compile) and once with
the cache that run filled (warm: kernels load from disk). Uses a temporary
NUMBA_CACHE_DIR, so the package's own cache is neither used nor changed.
"""

import json
import os
import subprocess
import sys
import tempfile

PROBE = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import fastseq
t_import = time.perf_counter() - t0
firsts = {}
for name in ("RNN", "LSTM", "GRU"):
    t = time.perf_counter()  # the layer built too: its aligned parameters start numba
    layer = getattr(fastseq, name)(16, 32).eval()
    layer(np.zeros((10, 4, 16), np.float32))
    firsts[name] = time.perf_counter() - t
print(json.dumps({"import": t_import, "first_forward": firsts, "total": time.perf_counter() - t0}))
"""


def run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    with tempfile.TemporaryDirectory() as cache:
        cold = run(cache)
        warm = min((run(cache) for _ in range(3)), key=lambda r: r["total"])
    print("| start | import fastseq | + first forward RNN / LSTM / GRU | total |")
    print("|---|---|---|---|")
    for label, r in (("cold (empty kernel cache)", cold), ("warm (kernels cached)", warm)):
        f = r["first_forward"]
        print(
            f"| {label} | {r['import']:.2f} s | {f['RNN']:.2f} / {f['LSTM']:.2f} / {f['GRU']:.2f} s | {r['total']:.2f} s |"
        )


if __name__ == "__main__":
    main()
