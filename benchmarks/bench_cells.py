"""asv suites, one per cell (from fastseq's cell registry), over a grid of shapes.

Kernels are compiled (or loaded from numba's disk cache) in ``setup``, never in a timed
method; data are seeded. ``track_*_gflops`` report GEMM GFLOP/s of a training step.
"""

import os
import time

import numpy as np

import fastseq
from fastseq.registry import CELLS, gemm_flops

#: (N, T, C=H) shapes: the speed issue's targets (small, medium, large), and a small batch
#: with large weights (the LSTM's unit-split path).
SHAPES = {
    "small": (32, 100, 64),
    "medium": (64, 100, 256),
    "large": (64, 50, 1024),
    "small_batch": (4, 50, 512),
}
#: The shapes run: all, or those named in FASTSEQ_ASV_SHAPES (comma-separated). The test
#: suite's pass over every benchmark (tests/test_asv_benchmarks.py) runs "small" only: asv
#: starts a process per benchmark and shape, about 1.5 s each.
RUN_SHAPES = [s for s in os.environ.get("FASTSEQ_ASV_SHAPES", ",".join(SHAPES)).split(",") if s]
if not RUN_SHAPES or not set(RUN_SHAPES) <= set(SHAPES):
    raise ValueError(f"FASTSEQ_ASV_SHAPES: expected names from {list(SHAPES)}, got {RUN_SHAPES}")
STREAM_HIDDEN = 128
#: (N, H) of a batched stream whose steps split their hidden units across threads
#: (fastseq._threads.stream_parts) for every cell.
STREAM_BATCHED = (8, 256)
#: Pause before each call of ``track_forward_after_idle``.
IDLE_SECONDS = 0.05


class _CellSuite:
    cell = "rnn"
    params = (RUN_SHAPES, ["float32"])
    param_names = ["shape", "dtype"]
    timeout = 300

    def setup(self, shape, dtype):
        n, t, h = SHAPES[shape]
        rng = np.random.default_rng(0)
        spec = CELLS[self.cell]
        self.layer = getattr(fastseq, spec.torch_layer)(h, h, dtype=dtype, seed=0)
        self.x = rng.standard_normal((t, n, h)).astype(dtype)
        self.grad = rng.standard_normal((t, n, h)).astype(dtype)
        self.lengths = rng.integers(1, t + 1, size=n)
        self.flops = gemm_flops(self.cell, n, t, h, h)
        self.cell_step = getattr(fastseq, spec.torch_cell)(
            STREAM_HIDDEN, STREAM_HIDDEN, dtype=dtype, seed=0
        ).eval()
        self.x_step = rng.standard_normal((1, STREAM_HIDDEN)).astype(dtype)
        self.stream = self.cell_step.stream(batch=1)
        self.stream.step(self.x_step)
        n_stream, h_stream = STREAM_BATCHED
        cell = getattr(fastseq, spec.torch_cell)(h_stream, h_stream, dtype=dtype, seed=0).eval()
        self.stream_batched = cell.stream(batch=n_stream)
        self.x_batched = rng.standard_normal((n_stream, h_stream)).astype(dtype)
        self.stream_batched.step(self.x_batched)
        self.train_step()  # compiles (or loads) forward and backward kernels
        self.layer.eval()
        self.layer(self.x, lengths=self.lengths)
        self.layer.train()

    def train_step(self):
        self.layer.train()
        self.layer(self.x)
        self.layer.backward(self.grad)

    def time_forward(self, shape, dtype):
        self.layer.eval()
        self.layer(self.x)

    def time_forward_lengths(self, shape, dtype):
        self.layer.eval()
        self.layer(self.x, lengths=self.lengths)

    def time_train_step(self, shape, dtype):
        self.train_step()

    def time_stream_step(self, shape, dtype):
        self.stream.step(self.x_step)

    def time_stream_step_batched(self, shape, dtype):
        self.stream_batched.step(self.x_batched)

    def peakmem_train_step(self, shape, dtype):
        self.train_step()

    def track_train_gflops(self, shape, dtype):
        best = np.inf
        for _ in range(3):
            start = time.perf_counter()
            self.train_step()
            best = min(best, time.perf_counter() - start)
        return 3 * self.flops / best / 1e9

    track_train_gflops.unit = "GFLOP/s"

    def track_forward_after_idle(self, shape, dtype):
        """Median time of an eval forward made 50 ms after the previous call: a call after
        idle time paid about 8 ms more for waking numba's worker onto the caller's CPU
        (fastseq._threads.keep_workers_off_caller)."""
        self.layer.eval()
        times = []
        for _ in range(5):
            time.sleep(IDLE_SECONDS)
            start = time.perf_counter()
            self.layer(self.x)
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3

    track_forward_after_idle.unit = "ms"


for _name in CELLS:
    _cls = type(f"{_name.upper()}Suite", (_CellSuite,), {"cell": _name})
    globals()[_cls.__name__] = _cls
del _name, _cls


def timeraw_import():
    """Cold import of fastseq in a fresh interpreter (compiles nothing)."""
    return "import fastseq"
