"""Benchmark cases, timing and reports for ``fastseq bench``.

Time ratios are fastseq / peer (lower is better), each case timed alternately with its peer
in the same process, in blocks of calls (:func:`run_case`). GFLOP/s counts only GEMM work:
``2 * tokens * G * H * (C_k + H)`` per layer k and direction, ``tokens`` = valid
(unpadded) steps summed over the batch; a training step counts three times that. Compile time is the first call's latency minus the
steady-state median, never mixed into throughput.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from fastseq.registry import CELLS, gemm_flops

MODES = ("forward", "train", "stream")
SMALL = (32, 100, 64, 64)  # N, T, C, H
MEDIUM = (64, 100, 256, 256)


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: a cell, a mode and a shape.

    ``forward``: a layer in eval mode over (T, N, C). ``train``: forward + backward in
    training mode. ``stream``: T steps of ``cell.stream().step(x_t)``, one call per step.
    """

    cell: str
    mode: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    lengths: str = "full"

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def label(self) -> str:
        return (f"{self.cell} {self.mode} N={self.batch} T={self.steps} C={self.input_size} "
                f"H={self.hidden_size} L={self.layers} D={self.directions}")  # fmt: skip


def default_grid(cells=None, modes=None) -> list[BenchCase]:
    """The three cells, a small and a medium shape, forward / train / stream (N=1)."""
    out = []
    for cell in cells or CELLS:
        for mode in modes or MODES:
            for n, t, c, h in (SMALL, MEDIUM):
                out.append(BenchCase(cell, mode, 1 if mode == "stream" else n, t, c, h))
    return out


#: The speed targets: (N, T, C=H, layers, bidirectional) for forward and training steps.
TARGET_SHAPES = (
    (32, 100, 64, 1, False),
    (64, 100, 256, 1, False),
    (64, 50, 1024, 1, False),
    (64, 100, 256, 2, True),
)
#: Streaming target: one Cell call per step at N=1, H=128.
TARGET_STREAM = (1, 100, 128)


def target_grid(cells=None, modes=None, dtype="float32") -> list[BenchCase]:
    """The speed targets of every cell: four shapes forward and train, streaming N=1 H=128."""
    out = []
    for cell in cells or CELLS:
        for mode in modes or MODES:
            if mode == "stream":
                n, t, h = TARGET_STREAM
                out.append(BenchCase(cell, mode, n, t, h, h, dtype=dtype))
                continue
            for n, t, h, layers, bidirectional in TARGET_SHAPES:
                out.append(BenchCase(cell, mode, n, t, h, h, layers, bidirectional, dtype))
    return out


def grid(cells, modes, batches, steps, inputs, hiddens, **options) -> list[BenchCase]:
    """Cartesian product of the given values (C defaults to H when no input size given)."""
    out = []
    for cell, mode, n, t, h in itertools.product(cells, modes, batches, steps, hiddens):
        for c in inputs or (h,):
            out.append(BenchCase(cell, mode, n, t, c, h, **options))
    return out


class Inputs:
    """Seeded data for a case: x (T, N, C), lengths (N,) or None, grad_out."""

    def __init__(self, case: BenchCase, seed: int = 0):
        rng = np.random.default_rng(seed)
        dt = np.dtype(case.dtype)
        t, n = case.steps, case.batch
        self.x = rng.standard_normal((t, n, case.input_size)).astype(dt)
        self.lengths = None
        if case.lengths == "random" and case.mode != "stream":
            self.lengths = rng.integers(1, t + 1, size=n)
            self.lengths[0] = t
        self.grad_out = rng.standard_normal((t, n, case.directions * case.hidden_size)).astype(dt)
        self.tokens = int(t * n if self.lengths is None else self.lengths.sum())


def case_flops(case: BenchCase, tokens: int) -> float:
    """GEMM FLOPs of one timed call of the case."""
    total = 0.0
    for k in range(case.layers):
        c = case.input_size if k == 0 else case.directions * case.hidden_size
        total += case.directions * gemm_flops(case.cell, tokens, 1, c, case.hidden_size)
    return 3 * total if case.mode == "train" else total


def build_fastseq(case: BenchCase, inputs: Inputs):
    """(callable running one timed unit, the layer or cell holding the weights)."""
    import fastseq

    dt = np.dtype(case.dtype)
    spec = CELLS[case.cell]
    if case.mode == "stream":
        cell = getattr(fastseq, spec.torch_cell)(case.input_size, case.hidden_size, dtype=dt, seed=0).eval()
        x = inputs.x

        def stream():
            steps = cell.stream(batch=case.batch)
            for t in range(x.shape[0]):
                steps.step(x[t])

        return stream, cell
    layer = getattr(fastseq, spec.torch_layer)(case.input_size, case.hidden_size, case.layers,
                                               bidirectional=case.bidirectional, dtype=dt, seed=0)  # fmt: skip
    if case.mode == "forward":
        layer.eval()
        return (lambda: layer(inputs.x, lengths=inputs.lengths)), layer

    def train():
        layer(inputs.x, lengths=inputs.lengths)
        return layer.backward(inputs.grad_out)

    return train, layer


def sgemm_gflops(size: int = 1024, repeat: int = 5) -> float:
    """The machine's float32 GEMM rate through the BLAS the kernels call (best of repeat)."""
    from fastseq.bench.sgemm import matmul_into

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    out = np.empty((size, size), np.float32)
    matmul_into(a, b, out)
    best = min(_timed(lambda: matmul_into(a, b, out)) for _ in range(repeat))
    time.sleep(0.3)  # let BLAS's worker threads stop spinning before anything else is timed
    return 2.0 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def thread_limits(threads):
    """Run with ``threads`` numba and BLAS threads (None: leave as is); restores both."""
    if threads is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits

    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with threadpool_limits(threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(old)


def summarise(times) -> tuple[float, float]:
    """(median seconds, spread = interquartile range / median)."""
    arr = np.asarray(times)
    median = float(np.median(arr))
    q1, q3 = np.percentile(arr, [25, 75])
    return median, float((q3 - q1) / median) if median > 0 else 0.0


#: Seconds of calls each side runs in turn when a case alternates with its peer (see
#: :func:`run_case`).
BLOCK_SECONDS = 0.02


def run_case(case: BenchCase, repeat: int, warmup: int, peer_factories=(), min_time: float = 0.0) -> dict:
    """Time one case (and its peers, in turn); returns one result row.

    Runs ``repeat`` timed calls, more if needed to spend at least ``min_time`` seconds
    timing fastseq (so sub-millisecond cases get enough samples; at most 500 calls). With
    peers, fastseq and each peer take turns in blocks of about BLOCK_SECONDS of calls each
    (one call, for calls longer than BLOCK_SECONDS / 2), each block led by an untimed call. The
    first call after the other library's measures that library's leftovers (its threads
    still spinning on the cores, the caches it left), not the code timed: RNN forward at
    N=32, T=100, C=H=64 took 0.35 ms right after each torch call against 0.22 ms in blocks,
    while torch's times moved by 3% either way (Zen 5, 2 cores); ONNX Runtime's LSTM at
    N=64, T=100, H=256 took 25-31 ms right after each fastseq call against 21-22 ms after
    its own (numba's OpenMP workers spin for about 5 ms after a region). So calls longer
    than a block alternate one by one, each after an untimed call of its own.

    The row's ``peer``, ``peer_median_s``, ``peer_spread`` and ``ratio`` are the fastest
    peer's (with one peer, its own; ``peer_note`` when none could run the case); with
    several, ``peers`` lists each one's {peer, median_s, spread, ratio, note}.
    """
    inputs = Inputs(case)
    fn, module = build_fastseq(case, inputs)
    first = _timed(fn)  # compiles, or loads the kernels from the disk cache
    peers = [factory(case, module, inputs) for factory in peer_factories]
    runners = [peer.runner() for peer in peers]
    ours = []
    theirs = [[] for _ in runners]
    sides = [(fn, ours)] + [
        (run, times) for run, times in zip(runners, theirs, strict=True) if run is not None
    ]
    for _ in range(warmup):
        for run, _times in sides:
            run()
    estimate = max(first if warmup == 0 else _timed(fn), 1e-6)
    calls = min(max(repeat, int(min_time / estimate)), max(repeat, 500))
    block = max(1, int(BLOCK_SECONDS / estimate)) if len(sides) > 1 else calls
    lead = len(sides) > 1
    while len(ours) < calls:
        n = min(block, calls - len(ours))
        for run, times in sides:
            if lead:
                run()
            times.extend(_timed(run) for _ in range(n))
    median, spread = summarise(ours)
    flops = case_flops(case, inputs.tokens)
    row = asdict(case)
    row.update(directions=case.directions, median_s=median, spread=spread,
               us_per_step=median / case.steps * 1e6,
               sequences_per_s=case.batch / median, tokens_per_s=inputs.tokens / median,
               gflops=flops / median / 1e9, compile_s=max(first - median, 0.0))  # fmt: skip
    if not peers:
        return row
    results = []
    for peer, run, times in zip(peers, runners, theirs, strict=True):
        if run is None:
            results.append(
                {"peer": peer.name, "median_s": None, "spread": None, "ratio": None, "note": peer.note}
            )
            continue
        peer_median, peer_spread = summarise(times)
        results.append({"peer": peer.name, "median_s": peer_median, "spread": peer_spread,
                        "ratio": median / peer_median, "note": ""})  # fmt: skip
    ran = [r for r in results if r["ratio"] is not None]
    # The row's own peer fields: the fastest peer that ran (the only one, with one peer).
    best = min(ran, key=lambda r: r["median_s"]) if ran else results[0]
    row.update(
        peer=best["peer"], peer_median_s=best["median_s"], peer_spread=best["spread"], ratio=best["ratio"]
    )
    if best["ratio"] is None:
        row["peer_note"] = "; ".join(r["note"] for r in results)
    if len(results) > 1:
        row["peers"] = results
    return row
