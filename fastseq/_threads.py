"""Threading policy: batch chunks on numba threads, each chunk with single-threaded BLAS.

Every layer kernel runs one ``prange`` over a fixed number of batch chunks; each chunk runs
its whole sequence, calling BLAS (``np.dot``) for its own GEMMs. Two thread pools must not
compete for the cores, so while a kernel runs (:func:`kernel_threads`) either BLAS is held
at one thread (several chunks; restored after, with a reference count that makes this
correct when several Python threads run kernels), or, with a single chunk (a batch of
one) and recurrent weights larger than a core's L2, numba's team is one thread and BLAS
keeps its threads for the per-step products: the numba worker left without a chunk would
otherwise spin at the region's barrier on the core BLAS's second thread needs (measured:
50 steps of a 1 x 512 x 2048 product, 3.98 ms inside a one-chunk prange against 1.70 ms
outside it; 3.3 ms with BLAS at one thread).

A small batch with W_hh in a size range that depends on the batch and on the core's L2
cache (:func:`unit_parts`: batches of 1-4 on AMD's Zen, 1-16 elsewhere) runs as one chunk
split across the threads by hidden units instead: numba's team works on every step, BLAS
is held at one thread.

The number of chunks is numba's thread count at start-up (``NUMBA_NUM_THREADS``), not the
current ``numba.set_num_threads`` value, so results are bitwise identical whatever thread
count is active: the chunks, and the order in which per-chunk gradients are summed (when
they are), do not change with it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager

import numba
import numpy as np
from numba import prange, types
from numba.np.ufunc import parallel as numba_parallel

from fastseq._jit import jit
from fastseq.kernels.common import SPREAD_STEP_BYTES, STEPS_BLAS, step_products
from fastseq.kernels.gemm import BLAS_FOR_LARGE, FEW_ROWS, NARROW_BLAS_ROWS, ON_ZEN, panel_columns

_lock = threading.Lock()
_active = 0
_controller = None
_switches = None
_saved = None


def num_chunks(batch: int) -> int:
    """Batch chunks for a batch of N samples (independent of the active thread count)."""
    return max(1, min(batch, numba.config.NUMBA_NUM_THREADS))


def _blas_controller():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls)
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController().select(user_api="blas")
        # SciPy's own copy (scipy.libs/ in its wheel), not NumPy's (numpy.libs/libscipy_openblas64_)
        scipy_blas = [lib for lib in blas.lib_controllers if "scipy.libs" in (lib.filepath or "")]
        _controller = scipy_blas or blas.lib_controllers
    return _controller


def _blas_switches():
    """(get, set) of the thread count of each of the kernels' BLAS libraries: OpenBLAS's own
    C functions where it runs its own threads (found through threadpoolctl once), else
    threadpoolctl's calls. Why: threadpoolctl's per-call Python took 3.5 us to set one and
    back (:func:`single_threaded_blas`, entered on every call of a layer whose chunks hold
    one sample, and of a cell), the C functions 0.37 us (Zen 5)."""
    global _switches
    if _switches is None:
        switches = []
        for lib in _blas_controller():
            symbol = getattr(lib, "_get_symbol", None)  # threadpoolctl's, for OpenBLAS's affixes
            raw = None
            if symbol is not None and lib.internal_api == "openblas" and lib.threading_layer == "pthreads":
                raw = symbol("openblas_get_num_threads"), symbol("openblas_set_num_threads")
            if raw is None or None in raw:
                raw = (lambda lib=lib: lib.num_threads), lib.set_num_threads
            switches.append(raw)
        _switches = switches
    return _switches


#: A batch of one splits by units while W_hh's bytes lie in this range: above it BLAS takes
#: both cores for each step's product; below it the step is too short for a parallel region
#: each step. Measured (float32, Zen 5, in process, T=100, C=H, split / one chunk on the
#: micro-kernel, eval forward / training step): H=160 0.94 / 1.23; H=192 0.82-0.89 /
#: 1.02-1.08; H=208 0.87 / 0.93; H=224 0.84 / 0.86; H=256 0.74-0.96 / 0.76-0.83; H=288 0.67
#: / 0.75; H=320 0.61 / 0.67-0.69. Against BLAS on both cores (one process per policy, 30
#: calls alone): H=384 0.72 / 0.71, H=512 0.78 / 0.67, H=640 0.85 / 0.73, H=704 0.96 /
#: 0.74, H=768 0.96 / 0.74, H=896 (12.8 MB) 0.89 / 0.75; H=1024 (16 MB) 1.37-1.42 / 1.12.
#: OpenBLAS's threads also keep spinning after each call, against torch's OpenMP workers: in
#: a ``fastseq bench --compare torch`` run the BLAS path slowed torch 1.7-2.8x (and itself).
#: GRU and RNN batches of one use the same range (``gru_forward_units`` etc.). Measured in
#: inference (float32, Zen 5, T=100, C=H, one process per policy, alone, one chunk / split,
#: ms): against the chunk on the micro-kernel, GRU H=224 (588 KB) 0.60-0.72 / 0.59-0.68,
#: H=256 (768 KB) 0.81-0.99 / 0.65-1.11, H=288 1.06-1.19 / 0.78-0.88, H=384 2.09-2.17 /
#: 1.27-1.33; RNN H=384 0.63-0.70 / 0.62-0.64, H=448 (784 KB) 0.80-0.97 / 0.69-0.94, H=512
#: 1.02-1.15 / 0.73-0.79, H=640 1.95-2.00 / 1.20-1.26. Against BLAS on both cores: GRU
#: H=512 3.42 / 2.53, H=1024 (12 MB) 11.96-12.39 / 10.96-11.91; RNN H=768 2.36 / 2.07,
#: H=1024 3.78 / 3.82, H=1536 8.75-9.10 / 9.15-9.54, H=1792 (12.8 MB) 11.75-12.13 /
#: 12.05-12.17, and torch alternating with it ran 1.1-2.3x faster after the split than
#: after BLAS's spinning threads. Training step (forward + backward, the same way, one chunk
#: / split): GRU H=256 1.63-2.07 / 1.42-1.98, H=320 3.72-3.81 / 2.36-2.94, H=512 10.0-12.2 /
#: 7.2-8.3, H=1024 40.1-44.9 / 32.1-36.4; RNN H=448 1.87-2.22 / 1.59-1.89, H=768 7.4-8.5 /
#: 5.1-6.1, H=1024 13.2-15.1 / 9.7-18.7, H=1792 41.2-42.3 / 30.9-34.6.
SINGLE_SPLIT_BYTES = (3 << 18, 13 << 20)


def core_l2_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """A core's L2 cache in bytes, as Linux's sysfs gives it for CPU 0 (``base``: its cache
    directory); 0 where it cannot be read (another OS, a container hiding it)."""
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as level, open(os.path.join(path, "size")) as size:
                if level.read().strip() != "2":
                    continue
                text = size.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return 0


#: A core's L2 cache in bytes (1 MB where sysfs does not say).
L2_BYTES = core_l2_bytes() or 1 << 20
#: Batches of 2 and more split their steps by units from a size of W_hh set by a core's L2
#: cache: (largest batch, W_hh bytes in cores' L2 from which it splits), by rising batch;
#: larger batches run in chunks. The chunks lose once each thread streams all of W_hh from
#: past its L2 at every step; the split lets each thread keep its share there. Measured
#: (float32, T=50 unless noted, C=H, in process, split / chunks, eval forward and training
#: step, medians of 7-15), for every cell alike:
#:
#: AMD Zen 5 (1 MB of L2 a core; 2026-12-04, twenty-sixth session): N=2 splits faster from
#: 0.75 MB (GRU H=256 0.86-0.96 / 0.83-0.86, RNN H=448 0.93 / 0.93, T=100), N=3-4 from 1 MB
#: (LSTM H=256 0.81-0.97 / 0.79-0.97 in two runs of three, 1.14-1.23 / 1.04-1.15 in the
#: other; RNN H=512 0.74-0.99 / 0.76-0.97; GRU H=320 0.73-0.89 / 0.74-0.89), and at 1.3-16
#: MB N=2-4 ran 0.65-0.88 / 0.69-0.90 (RNN H=640 N=3 1.05-1.06 forward the exception). At
#: 0.56-0.77 MB N=3-4 lose (0.98-1.15 / 0.97-1.13). N=5-8 gain nothing at any size (LSTM
#: H=512-1024 0.93-1.07 / 0.95-1.00; GRU and RNN N=6-8 at 3-16 MB 0.94-1.06 / 0.95-1.02,
#: and 1.0-1.46 below 3 MB), nor do N=12-16 (0.93-1.18 / 0.93-1.06 from 3 MB).
#:
#: Intel Xeon (2 MB of L2 a core; twenty-fifth session): W_hh of 2.25-16 MB splits faster
#: at N=2-12: LSTM H=384 N=2 0.49 / 0.53, N=4 0.62 / 0.67, N=8 0.80 / 0.82, N=12 0.83 /
#: 0.88; H=512-1024 N=2-8 0.45-0.72 / 0.52-0.77, N=12 0.72-0.86 / 0.83-0.88; GRU
#: H=448-1024 N=2-8 0.41-0.78 / 0.48-0.84, N=12 0.73-0.85 / 0.83-0.93; RNN H=768-1024 N=2-8
#: 0.47-0.78 / 0.52-0.83, N=12 0.82-0.85 / 0.85-0.89. N=16 was mixed at 2.25 MB (0.91-1.03
#: / 0.91-0.99); from 3 MB N=14 ran 0.83-0.91 / 0.88-0.95 and N=16 0.92-0.97 / 0.93-0.98.
#: At 1.56-1.69 MB (LSTM H=320, GRU H=384, RNN H=640): N=2 0.62-0.77 / 0.77-0.91, N=4
#: 0.82-1.02 / 0.92-0.98; N=8-16 1.03-1.17 / 1.03-1.11. At 1 MB and less (H=256; RNN H=512)
#: the split loses: N=2 0.95-1.56 / 1.01-1.38, N=3-12 0.93-1.93 / 0.98-1.52.
#:
#: (Until the twenty-sixth session AMD's CPUs followed tables measured on Zen 3 and Zen 5
#: before the chunks' micro-kernel and packing work of the sessions since: LSTM batches of
#: 2-8 only, GRU and RNN batches of one only.)
L2_SPLIT_SHARES = ((2, 0.75), (4, 1.0)) if ON_ZEN else ((4, 0.75), (12, 1.0), (16, 1.5))
#: ... and never under this size of W_hh, whatever the L2 (a CPU with 256-512 KB of L2 a
#: core): under it a step is too short to pay for a parallel region at every step (Zen 5,
#: above: 0.25-0.57 MB lose at every batch, 0.92-1.63).
L2_SPLIT_MIN_BYTES = 3 << 18


#: A batch of one of a gated cell (LSTM, GRU: W_hh of 3-4 gate blocks) splits from this
#: size of W_hh already, below SINGLE_SPLIT_BYTES: since the thirtieth session its steps
#: run in one parallel region (``kernels.sync``), so the split pays sooner. Measured
#: (float32, Zen 5, in process, 11 rounds alternating, split / one chunk, eval forward at
#: T=100 unless noted): LSTM H=64 (64 KB) 1.21, H=96 (144 KB) 0.985, H=112 (196 KB) 0.83
#: (T=200 0.96-1.23), H=128 (256 KB) 0.71 (T=5 0.96, T=20 0.83, T=200 0.72; training T=20
#: 0.89, T=100 0.80), H=136 (T=200) 0.91 (training 0.92), H=144 0.73, H=160 0.60, H=192
#: (576 KB) 0.78 (training 0.84); GRU H=96 (108 KB) 1.02, H=112 (T=200) 1.57, H=128 (192 KB)
#: 0.73-0.75 (T=5 0.99, T=20 0.94; training 0.92, T=20 1.01), H=152 (277 KB, T=200) 0.905,
#: H=160 0.70, H=192 0.65-0.83 (training 0.87). The RNN keeps SINGLE_SPLIT_BYTES: H=256
#: (256 KB) 0.82-0.95, but H=264 1.195 and H=320 0.94-0.96.
SINGLE_SPLIT_GATED_MIN_BYTES = 1 << 18


def split_bytes(batch: int, splits: bool = True, gated: bool = False):
    """The range [lo, hi) of W_hh bytes over which a batch of ``batch`` samples splits its
    steps by units (:func:`unit_parts`), or None where it never does. ``gated``: W_hh of a
    gated cell (see SINGLE_SPLIT_GATED_MIN_BYTES)."""
    if not splits or numba.config.NUMBA_NUM_THREADS < 2:
        return None
    if batch == 1:
        lo, hi = SINGLE_SPLIT_BYTES
        return (min(lo, SINGLE_SPLIT_GATED_MIN_BYTES) if gated else lo), hi
    for largest, share in L2_SPLIT_SHARES:
        if batch <= largest:
            return max(share * L2_BYTES, L2_SPLIT_MIN_BYTES), float("inf")
    return None


def unit_parts(batch: int, w_hh, splits: bool = True) -> int:
    """Parts (threads) that split each step by hidden units, or 0 to split the batch into
    chunks (:func:`num_chunks`): for a batch of one of any cell whose recurrent weights
    ``w_hh`` have bytes in SINGLE_SPLIT_BYTES (for the LSTM and the GRU, from
    SINGLE_SPLIT_GATED_MIN_BYTES), for a larger batch of any cell from a size of
    W_hh set by the core's L2 (L2_SPLIT_SHARES, L2_SPLIT_MIN_BYTES). See :func:`split_bytes`.
    ``splits``: False for a variant without a split (GRU reset_after=False). As many parts as
    numba's start-up thread count (so results do not depend on the active thread count)."""
    bounds = split_bytes(batch, splits, gated=w_hh.shape[0] >= 3 * w_hh.shape[1])
    if bounds is None or not bounds[0] <= w_hh.nbytes < bounds[1]:
        return 0
    return min(numba.config.NUMBA_NUM_THREADS, w_hh.shape[1])


#: Rows per batch chunk from which backward sums the weight gradients per chunk (partial sums
#: over the chunk's rows, added in chunk order after) instead of over all rows at once,
#: split by rows of the gradient (kernels.common.add_weight_grad). Per chunk, each thread
#: works on rows still in its cache right after the chunk's own recurrence, but writes a
#: whole partial gradient, which costs most when the chunks are short and the weights large.
#: Measured (float32, Zen 5, LSTM training step, in process, all rows / per chunk): rows per
#: chunk 50 (N=2, T=50, H=512): 0.87-0.89; 200: 0.91-0.92; 400: 0.96; 1600 (N=32, T=100,
#: H=64): 1.15-1.16 (RNN 1.13, GRU 1.04); 1600 at H=1024: 1.00; 3200 (H=256): 1.02-1.04.
PARTIAL_SUM_ROWS = 1024
#: Narrow layers sum per chunk from fewer rows: from PARTIAL_SUM_ROWS_PER_WIDTH * (C + H)
#: rows per chunk. Measured (float32, Zen 5, training step, in process, per chunk / all
#: rows, after add_weight_grad split H-row gradients over both threads; rows per chunk /
#: (C + H) in brackets): N=32, T=100, H=64, random lengths [5.7]: RNN 0.92, GRU 0.94, LSTM
#: 0.94; N=16, T=50, H=128 [1.56]: RNN 0.92, LSTM 0.96, GRU 0.96; N=8, T=200, H=192 [2.1]:
#: LSTM 0.96, GRU 1.01, RNN 0.99; N=16, T=50, H=256 [0.78]: RNN 0.99, GRU 1.01, LSTM 1.08;
#: H=512 [0.39]: GRU 1.04, LSTM 1.03; N=8, T=50, H=256 [0.39]: LSTM 1.07.
PARTIAL_SUM_ROWS_PER_WIDTH = 1.5


def partial_weight_grads(packing, width: int) -> int:
    """Chunks whose weight gradients backward sums as per-chunk partials (the slices of the
    scratch it needs), or 0 to sum over all rows at once: see PARTIAL_SUM_ROWS and
    PARTIAL_SUM_ROWS_PER_WIDTH; ``width``: C + H of the layer. A batch split by units has
    one chunk and always sums over all rows."""
    rows = min(PARTIAL_SUM_ROWS, PARTIAL_SUM_ROWS_PER_WIDTH * width)
    if packing.unit_parts or packing.rows < rows * packing.n_chunks:
        return 0
    return packing.n_chunks


#: A streaming step (:class:`fastseq.cells.Stream`) splits its gate units across threads when
#: its weights (W_ih and W_hh) reach STREAM_SPLIT_BYTES and the weights times the rows reach
#: STREAM_SPLIT_WORK: each core then reads its share of the weights, and a parallel region
#: (about 2.4 us to launch here) pays off. Measured (float32, Zen 3, C=H, 50 steps through
#: ``Stream.step``, interleaved in one process, split / serial):
#:
#: - weights under 320 KB lose at every N tried (RNN H=128 N=2-32: 0.90-1.92; GRU H=96
#:   N=2-16: 1.10-1.74);
#: - N=1: 0.86 at 1.5-2 MB (GRU, LSTM H=256), 0.9-1.5 at 384-512 KB (GRU, LSTM H=128; RNN
#:   H=256);
#: - N=2 at 384-512 KB: 0.85-1.15; N=4: LSTM H=128 0.76, GRU H=128 0.93, RNN H=256 1.00;
#: - N=8-32 at 384 KB and more: 0.54-0.97 (LSTM and GRU 0.54-0.78).
#:
#: The same comparison on the Intel Xeon (twenty-first session, 3 x 1000 steps a case,
#: split / serial): a work of 1.5-2 MB gains (GRU H=256 N=1 0.58-0.59, GRU H=192 N=2
#: 0.83-0.87, GRU H=128 N=4 0.91-0.94, RNN H=320 N=2 0.94), so the bar is 1.5 MB (was 2
#: MB; Zen 3's GRU H=256 N=1 and H=128 N=4 gained too). Below it the results are mixed:
#: LSTM and GRU H=192 N=1 0.80-0.93, LSTM H=128 N=2 1.00, RNN H=256 N=2 0.73-1.05, RNN
#: H=192 N=4 1.10-1.14; at 512 KB and less, N=1 loses (1.12-2.1). Zen 5 (twenty-sixth
#: session, 500 steps, five processes each way, 1.5 MB / 2 MB bar): GRU H=256 N=1 0.70;
#: others between 1.5 and 2 MB 0.98-1.02.
STREAM_SPLIT_BYTES = 320 * 1024
STREAM_SPLIT_WORK = 1536 * 1024


def stream_parts(batch: int, w_ih, w_hh) -> int:
    """Parts (threads) that split a streaming step of ``batch`` rows by hidden units, or 0
    for the serial step (the thresholds above; never above ``gemm.FEW_ROWS`` rows, where BLAS
    spreads the products). As many parts as numba's start-up thread count, so results do not
    depend on the active thread count."""
    threads = numba.config.NUMBA_NUM_THREADS
    weights = w_ih.nbytes + w_hh.nbytes
    if (
        threads >= 2
        and batch <= FEW_ROWS
        and weights >= STREAM_SPLIT_BYTES
        and weights * batch >= STREAM_SPLIT_WORK
    ):
        return min(threads, w_hh.shape[1])
    return 0


def stream_units(hd: int, parts: int) -> list:
    """First unit of each part of a split streaming step, and H: the H units split evenly,
    each part starting at a multiple of 4 units (a part may be empty when H < 4 * parts).
    :func:`fastseq.kernels.gemm.few_rows_nt` sums weight rows in blocks of 4 from the first
    row it is given, so with these bounds every output of a split step is summed exactly as
    in the serial step (``gemm.step_product``, one call per gate block)."""
    return [0] + [(p * hd // parts + 2) // 4 * 4 for p in range(1, parts)] + [hd]


#: One entry per fastseq kernel call in flight, from any Python thread: layer and cell
#: kernels (:func:`kernel_threads`) and streaming steps. ``list.append``/``pop`` are atomic
#: and cost tens of nanoseconds. A streaming step splits across threads only when it is the
#: only entry (:class:`fastseq.cells.Stream`). Measured (Zen 3, LSTM H=128, N=8, 400 steps
#: per Python thread): with two Python threads stepping streams at once, split steps took
#: 112-130 us against 57-66 us for serial ones (four busy threads on two cores, and a
#: barrier in every step).
RUNNING = []

#: The interpreter's main thread. Streaming steps split across threads only on it. With more
#: OpenMP threads than CPUs, libgomp (numba's ``omp`` layer) lets idle workers spin 100
#: times instead of 300,000 before sleeping (its GOMP_SPINCOUNT documentation), so every
#: region pays a wake-up; a second OS thread starting parallel regions seems enough to get
#: there (each such thread gets its own team). Measured (Zen 3 VM, an empty two-iteration
#: ``prange``): 2.3 us on the main thread, 46-64 us on a second Python thread once the main
#: thread had run a region (2.7-3.0 us when it had not). A split step runs one region per
#: step; the serial step none.
MAIN_THREAD = threading.main_thread().ident


def blas_spreads_steps(packing, w_hh) -> bool:
    """Whether the kernels of ``packing`` hand their per-step products to BLAS on every core
    (one chunk, not split by units, ``w_hh`` of SPREAD_STEP_BYTES or more), numba's team
    then being one thread (:func:`kernel_threads`)."""
    return packing.n_chunks == 1 and not packing.unit_parts and w_hh.nbytes >= SPREAD_STEP_BYTES


#: Bytes of input projection (rows x G*H) up to which an inference pass over one chunk that
#: numba's team runs (a batch of one with W_hh below SPREAD_STEP_BYTES) projects its whole
#: input at once across the threads (kernels.common.project_one_chunk) instead of a block at
#: a time on the chunk's thread; above it, memory stays bounded by blocks.
ONE_CHUNK_PROJECTION_BYTES = 8 << 20


def project_whole_input(packing, w_hh, rows: int, row_bytes: int) -> bool:
    """Whether an inference pass of ``rows`` rows projects all of them at once (see
    ONE_CHUNK_PROJECTION_BYTES); ``row_bytes``: bytes of one row's projection."""
    return (
        packing.n_chunks == 1
        and not packing.unit_parts
        and numba.config.NUMBA_NUM_THREADS > 1
        and not blas_spreads_steps(packing, w_hh)
        and rows * row_bytes <= ONE_CHUNK_PROJECTION_BYTES
    )


def kernels_call_blas(packing, forward_w_hh=None) -> bool:
    """Whether the layer kernels of ``packing`` may call BLAS inside their parallel region:
    with BLAS_FOR_LARGE (no AVX-512: the chunk-level products and weight gradients go to
    BLAS), or when a chunk holds a single sample (its one-row per-step products may go to
    BLAS, ``kernels.common.step_panels``). Otherwise every product runs on the micro-kernel
    and BLAS's thread count does not matter: switching it costs 7-10 us per call in a
    training step's flow (36 us of an RNN step at N=32, T=100, C=H=64, four switches).

    ``forward_w_hh``: the recurrent weights (G*H, H) of a forward pass alone (no backward
    in the block), whose per-step products by W_hh^T go to BLAS only where
    :func:`forward_steps_call_blas` says so; switching BLAS's threads and back took 1.6 of
    a 27 us call's 14 us of Python (LSTM, N=1, T=20, C=H=32, Zen 5)."""
    if BLAS_FOR_LARGE or packing.widest_chunk > 1:
        return BLAS_FOR_LARGE
    if forward_w_hh is None or packing.unit_parts:
        return True
    return forward_steps_call_blas(packing, forward_w_hh)


def forward_steps_call_blas(packing, w_hh) -> bool:
    """Whether a forward's per-step products by ``w_hh``^T go to BLAS: the kernels' own rule
    (``kernels.common.step_products``) for W_hh's bytes, which bound those of the GRU's
    blocks (W_hr and W_hz, W_hn: read in place or packed whenever W_hh would be), and its
    depth H (W_hh^T's rows, the blocks' too)."""
    longest = packing.batch_sizes.shape[1]
    return (
        step_products(w_hh.nbytes, w_hh.shape[1], packing.n_chunks, packing.widest_chunk, longest, True)
        == STEPS_BLAS
    )


def weight_grads_call_blas(cell, packing, input_sizes, hidden, dtype) -> bool:
    """Whether a backward's per-chunk weight gradients (:func:`partial_weight_grads`) call
    BLAS for some layer: ``gemm.gemm_pair`` (the RNN's and LSTM's) sends outputs of at most
    half a panel's columns there (C and H <= NR / 2) over chunks of NARROW_BLAS_ROWS rows or
    more. ``input_sizes``: each layer's C."""
    half_panel = panel_columns(dtype) // 2
    if cell == "gru" or hidden > half_panel or packing.widest_chunk_rows < NARROW_BLAS_ROWS:
        return False
    return any(c <= half_panel and partial_weight_grads(packing, c + hidden) for c in input_sizes)


class kernel_threads:
    """Context for the kernels of a ``packing`` (fastseq._packing.Packing) whose per-step
    products read the recurrent weights ``w_hh`` (G*H, H): BLAS at one thread where the
    kernels call it (:func:`kernels_call_blas`, or ``blas``: see
    :func:`weight_grads_call_blas`), except for one chunk, not split by units,
    with ``w_hh.nbytes >= SPREAD_STEP_BYTES``: numba's team at one thread (thread-local),
    BLAS free. Otherwise numba's workers are kept off the calling thread's CPU
    (:func:`keep_workers_off_caller`). Counted in RUNNING while it lasts. ``forward``: the
    block runs forward kernels only (``kernels_call_blas``' ``forward_w_hh``).

    A class, not a generator context: it is entered on every layer and cell call, and as two
    nested generator contexts it cost 3.3 us of a 15 us call's Python (RNN, N=32, T=100,
    H=64, random lengths, kernel replaced by a no-op); 1.45 us as a class."""

    __slots__ = ("_blas", "_decided", "_forward", "_inner", "_packing", "_w_hh")

    def __init__(self, packing, w_hh, blas=False, forward=False, decided=None):
        """``decided``: what :meth:`decide` returned for these arguments (an eval plan's,
        ``fastseq.layers.EvalPlan``: 0.3-0.4 us less per call), or None."""
        self._packing, self._w_hh, self._blas, self._inner = packing, w_hh, blas, None
        self._forward, self._decided = forward, decided

    @staticmethod
    def decide(packing, w_hh, blas=False, forward=False):
        """(numba's team at one thread, BLAS held at one thread) for a block with these
        arguments; fixed by them (the thread counts are set at each entry)."""
        if blas_spreads_steps(packing, w_hh):
            return True, False
        return False, blas or kernels_call_blas(packing, w_hh if forward else None)

    def __enter__(self):
        RUNNING.append(None)
        try:
            decided = self._decided
            if decided is None:
                decided = self.decide(self._packing, self._w_hh, self._blas, self._forward)
            if decided[0]:
                inner = _numba_threads(1)
            else:
                keep_workers_off_caller()
                inner = single_threaded_blas() if decided[1] else None
            if inner is not None:
                inner.__enter__()
        except BaseException:
            RUNNING.pop()
            raise
        self._inner = inner
        return self

    def __exit__(self, *exc):
        try:
            if self._inner is not None:
                self._inner.__exit__(*exc)
        finally:
            RUNNING.pop()
        return False


#: Whether :func:`keep_workers_off_caller` pins numba's workers (a switch for measurements;
#: turning it off later leaves workers already pinned as they are).
PIN_WORKERS = True

_gettid = types.ExternalFunction("gettid", types.int32())
_libc = ctypes.CDLL(None, use_errno=True)
_sched_getcpu = getattr(_libc, "sched_getcpu", None)
_teams = threading.local()  # per calling thread: its libgomp team's worker ids, pinned for a CPU


@jit(parallel=True)
def team_thread_ids(out):
    """out[t] = the OS thread id of numba's thread t (t < the active thread count), from one
    parallel region of the calling thread. out (threads,) int64."""
    for _i in prange(out.shape[0]):
        out[numba.get_thread_id()] = _gettid()


def active_threads() -> int:
    """``numba.get_num_threads()`` without its per-call launch check (0.7 of 1.2 us of
    :func:`keep_workers_off_caller`): numba's C getter once its threads are launched."""
    getter = getattr(numba_parallel, "_get_num_threads", None)  # set by numba at launch
    threads = getter() if getter is not None else 0
    return threads if threads > 0 else numba.get_num_threads()


def one_region_threads() -> int:
    """The threads a unit-split pass (forward or backward) may count on to run all its steps
    in one parallel region (``kernels.sync``): numba's active thread count, or 0 (a region
    per step) while another fastseq kernel runs from another Python thread (RUNNING), where
    the threads of one region spinning for each other would hold cores the other call
    needs."""
    return active_threads() if len(RUNNING) <= 1 else 0


def keep_workers_off_caller() -> None:
    """Let numba's worker threads (this calling thread's OpenMP team) run on every allowed CPU
    but the one the calling thread is on now; re-pinned only when that CPU changes.

    Why: after the calling thread has been idle for about 20 ms or more (between calls), the
    kernel wakes the sleeping worker onto the caller's own CPU, where the caller, having done
    its share, spins in the region's closing barrier until the scheduler preempts it: the
    region took 7.8 ms instead of 0.1 ms. Measured (Zen 5 VM, 2 vCPUs, an empty
    two-iteration ``prange`` after a sleep, median of 25): 1-10 ms idle 0.002-0.05 ms
    either way; 20-100 ms idle 7.8 ms, 0.09-0.12 ms with the worker kept off the caller's
    CPU; the worker pinned to the caller's CPU, 6-8 ms after any idle time. An LSTM forward
    (N=32, T=100, H=64) after 20 ms idle took 12.6 ms against 0.97 ms back to back.
    OMP_PROC_BIND=true cures it too, but it pins the caller (and every thread it starts
    later) to one CPU. No-op with fewer than two allowed CPUs or without ``sched_getcpu``.
    """
    threads = active_threads()
    if not PIN_WORKERS or _sched_getcpu is None or threads < 2:
        return
    cpu = _sched_getcpu()
    team = getattr(_teams, "tids", None)
    if team is None or _teams.size < threads:  # a larger team may have new threads
        out = np.zeros(threads, np.int64)
        team_thread_ids(out)
        own = threading.get_native_id()
        _teams.tids = team = [int(t) for t in out if t and t != own]
        _teams.size, _teams.cpu = threads, None
    if cpu == _teams.cpu or cpu < 0:
        return
    allowed = os.sched_getaffinity(0)
    others = allowed - {cpu}
    if not others:
        return
    for tid in team:
        try:
            os.sched_setaffinity(tid, others)
        except OSError:  # the thread is gone: collect the team again next time
            _teams.tids = None
    _teams.cpu = cpu


@contextmanager
def _numba_threads(n: int):
    saved = numba.get_num_threads()
    numba.set_num_threads(min(n, saved))
    try:
        yield
    finally:
        numba.set_num_threads(saved)


class single_threaded_blas:
    """Hold the kernels' BLAS at one thread inside the block (reference-counted across
    Python threads; restored when the last block ends). A class, not a generator context
    (1.5 us less per call)."""

    __slots__ = ()

    def __enter__(self):
        global _active, _saved
        with _lock:
            if _active == 0:
                switches = _blas_switches()
                _saved = [get() for get, _ in switches]
                for _, set_threads in switches:
                    set_threads(1)
            _active += 1
        return self

    def __exit__(self, *exc):
        global _active
        with _lock:
            _active -= 1
            if _active == 0:
                for (_, set_threads), n in zip(_blas_switches(), _saved, strict=True):
                    set_threads(n)
        return False
