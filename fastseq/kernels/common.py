"""Pieces shared by every cell's kernels (see the shapes legend in __init__)."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types

from fastseq._jit import jit
from fastseq.kernels.gemm import (
    ACCUMULATE,
    BLAS_FOR_LARGE,
    FEW_ROWS,
    OVERWRITE,
    aligned_empty,
    copied_tiles_products,
    few_rows_nt,
    gemm_large,
    gemm_packed,
    gemm_pair,
    large_b,
    pack_panel,
    pack_transposed_parallel,
    pack_weights,
    panel_width,
)
from fastseq.kernels.refs import any_layout
from fastseq.kernels.sync import step_claims


@jit
def column_sums(a, col0, out):
    """out (M,) = a[:, col0:col0+M].sum(axis=0), summed in row order (deterministic).

    ``a`` (R, >= col0+M) should be C-contiguous, and is sliced here a row at a time: the
    rows of a column slice ``a[:, col0:]`` passed in instead have a stride numba does not
    know to be 1, and a loop over ``a[r, col0 + j]`` may index from the end; neither loop
    vectorised (6.5x slower: 0.24 against 0.036 ms for 3200 x 256, Zen 5)."""
    m = out.shape[0]
    out[:] = 0
    for r in range(a.shape[0]):
        row = a[r, col0 : col0 + m]
        for j in range(m):
            out[j] += row[j]


@jit
def chunk_weight_grads(dgates, x, hprev, part_w_ih, part_w_hh, part_b):
    """One chunk's weight gradients as partial sums over its rows, for batches with many rows
    per chunk (see ``fastseq._threads.partial_weight_grads``; the partials are added by
    :func:`add_parts` in chunk order). dgates (Rc, G*H), x (Rc, C), hprev (Rc, H) in;
    part_w_ih (G*H, C), part_w_hh (G*H, H), part_b (G*H,) out (overwritten)."""
    gemm_pair(dgates.T, x, hprev, part_w_ih, part_w_hh)
    column_sums(dgates, 0, part_b)


@jit
def add_parts(parts, out):
    """out += parts[0] + parts[1] + ... in chunk order (deterministic reduction)."""
    for c in range(parts.shape[0]):
        out += parts[c]


#: Rows of a weight gradient per piece of :func:`add_weight_grad` (the pieces are spread over
#: numba's threads). Measured (float32, Zen 5, both threads, dW (4H, H) += dG^T @ x and the
#: same with h, GFLOP/s with 2 / 4 / 8 / 16 pieces): R = 100 rows of dG, H = 512: 231 / 265 /
#: 323 / 386; R = 400: 340-367 for all; R = 3200, H = 256: 366 / 370 / 350 / 354.
WEIGHT_GRAD_ROWS = 128
#: Pieces a weight gradient of few rows still splits into (each of at least
#: WEIGHT_GRAD_MIN_ROWS rows), so that both threads work: an RNN's dW (H, H) at H <= 128 was
#: one piece, on one thread. Measured (float32, Zen 5, training step at random lengths, over
#: all rows, new / one piece, median of 31 interleaved rounds): RNN N=32, T=100, H=64 0.88;
#: GRU there 0.91; RNN N=16, T=50, H=128 (full length) 0.83; GRU there 0.97.
WEIGHT_GRAD_MIN_PIECES = 2
WEIGHT_GRAD_MIN_ROWS = 16


@jit(parallel=True)
def add_weight_grads(dg, b, dw, b2, dw2, sums):
    """dw (M, K) += dg^T @ b and dw2 (M, K2) += dg^T @ b2 for dg (R, M), b (R, K), b2 (R,
    K2) (dw2 with no rows: no second product, b2 unread): weight gradients over every row at
    once (the deferred GEMMs of backward), split by rows of dw into pieces of
    WEIGHT_GRAD_ROWS (at least WEIGHT_GRAD_MIN_PIECES) across numba's threads, so no thread
    writes a partial dw. With two products each piece copies its columns of dg into MR-row
    tiles once for both (``gemm.copied_tiles_products``); read in place, each k steps a
    whole dg row further. Measured (float32, Zen 5, both threads, the two products of an
    LSTM, GFLOP/s, in place / tiles copied once): R = 200, H = 512: 241 / 261; R = 400,
    H = 256: 309 / 346; R = 800, H = 512: 292 / 306-329; R = 1600, H = 256: 246-268 /
    312-315; R = 3200, H = 256: 259-277 / 270-305. A copy for one product gained nothing
    (247-331 at R = 1600), so one product reads dg in place. Every entry is summed over the
    R rows in the same order whatever the split, so results do not depend on the thread
    count. sums (M,) out: the column sums of dg (the bias gradient), or skipped when
    ``sums`` has no entries. Call it at a kernel's top level, not in a ``prange``.
    """
    m = dw.shape[0]
    two = dw2.shape[0] > 0
    b_panels = pack_weights(any_layout(b))
    b2_panels = pack_weights(any_layout(b2))
    pieces = max(
        1,
        (m + WEIGHT_GRAD_ROWS - 1) // WEIGHT_GRAD_ROWS,
        min(WEIGHT_GRAD_MIN_PIECES, m // WEIGHT_GRAD_MIN_ROWS),
    )
    for p in prange(pieces):
        m0, m1 = m * p // pieces, m * (p + 1) // pieces
        if BLAS_FOR_LARGE:  # BLAS needs a contiguous a: a copy of the piece's columns
            piece = np.ascontiguousarray(dg[:, m0:m1]).T
            dw[m0:m1] += np.dot(piece, b)
            if two:
                dw2[m0:m1] += np.dot(piece, b2)
        elif not two:
            gemm_packed(dg[:, m0:m1].T, b_panels, dw[m0:m1], ACCUMULATE)
        else:
            copied_tiles_products(dg[:, m0:m1].T, b_panels, dw[m0:m1], b2_panels, dw2[m0:m1], ACCUMULATE)
        if sums.shape[0]:
            column_sums(dg, m0, sums[m0:m1])


@jit
def add_weight_grad(dg, b, dw, sums):
    """:func:`add_weight_grads` with one product: dw (M, K) += dg^T @ b."""
    add_weight_grads(dg, b, dw, b[:0], dw[:0], sums)  # no second product


@jit
def weight_grads(dgates, x, hprev, part_w_ih, part_w_hh, part_b, dw_ih, dw_hh, db_ih, db_hh):
    """The weight gradients of a cell whose gates see dgates (R, G*H) through both GEMMs
    (RNN, LSTM): dw_ih (G*H, C) += dgates^T @ x (R, C); dw_hh (G*H, H) += dgates^T @ hprev
    (R, H); db_ih, db_hh (G*H,) += the column sums of dgates. Either from the chunks'
    partial sums (:func:`chunk_weight_grads`, when ``part_w_ih`` (K, G*H, C) has slices;
    part_w_hh (K, G*H, H), part_b (K, G*H)), or over all rows at once here."""
    if part_w_ih.shape[0]:
        add_parts(part_w_ih, dw_ih)
        add_parts(part_w_hh, dw_hh)
        add_parts(part_b, db_ih)
        add_parts(part_b, db_hh)
        return
    sums = np.empty(dgates.shape[1], dgates.dtype)
    add_weight_grads(dgates, x, dw_ih, hprev, dw_hh, sums)
    db_ih += sums
    db_hh += sums


#: Bytes of recurrent weights (G*H x H) from which a single chunk lets BLAS spread its
#: per-step products over every core (numba's team then one thread). Below it the chunk's
#: one-row products run on the panels on one thread: OpenBLAS threads its gemv only from
#: about 2 MB, and every step would hand work to a thread that another thread pool may be
#: holding. Measured (float32, a 1 x H @ H x 4H product, us), Zen 5, panels on one thread /
#: BLAS on one / on two: 1 MB 8.5 / 11.0 / 10.9; 1.56 MB 14.2 / 15.4 / 15.9; 2 MB 19.0 /
#: 22.5 / 10.2; 4 MB 40.8 / 40.2 / 21.7. (Zen 3, BLAS on one / two: 256 KB 4.1 / 4.8;
#: 4 MB 65 / 47; 16 MB 369 / 212.)
SPREAD_STEP_BYTES = 7 << 18
#: Steps from which a layout of one sample per chunk (a batch of one, or of two in two
#: chunks) packs W_hh for its one-row per-step products (:func:`step_panels`), unless BLAS
#: spreads them over the cores (one chunk, SPREAD_STEP_BYTES). Training pays for the packing
#: sooner than inference (twice the one-row products). Measured (float32, Zen 5, in
#: process, packed / BLAS on W_hh^T, eval forward / training step): LSTM N=1, H=128: T=200
#: 0.83 / 0.90, T=50 1.02-1.05 / 0.92-0.94, T=20 1.00-1.08 / 0.94-0.98; H=64, T=200 0.87 /
#: 0.89; N=2, T=100: LSTM H=128 0.93 / 0.76, H=256 0.82 / 0.90; GRU H=256 0.76 / 0.84; RNN
#: H=256 0.87 / 0.78; N=1, T=200, H=128: GRU 0.90 / 0.82, RNN 0.85 / 0.83; N=1, RNN H=512:
#: T=50 0.98 / 0.99, T=20 1.03 / 0.98, T=10 1.11 / 1.08; RNN H=256, T=50 0.85 / 0.93; GRU
#: H=256, T=20 1.02 / 0.93. From 32 steps on, against 64 (with the pieces below): RNN H=512,
#: T=50 0.87 / 0.93; GRU H=256, T=50 0.88 / 0.74; LSTM H=128, T=50 0.99 / 0.93. (Packed
#: with one thread instead of BLAS on two at N=1: LSTM H=256, T=200 1.17 / 0.84; H=512,
#: T=100 1.56 / 1.31.)
ONE_ROW_PANEL_STEPS = 32
#: Steps from which chunks of two samples (a batch of 3-4 in two chunks) pack W_hh for their
#: forward's per-step products; shorter sequences read it in place (:func:`step_panels`):
#: packing reads and writes every weight once per call. Measured (float32, Zen 5, in
#: process, A/B medians, eval forward, in place / packed): T=5: GRU N=4, H=1024 0.53, H=256
#: 0.84; RNN N=4, H=1024 0.64, H=256 0.82; T=10-20: GRU N=3, H=512 0.81, N=4, H=256-1024
#: 0.91-0.98; RNN N=4, H=256-512 0.94-1.00, N=3, T=20, H=512 0.94; from T=24: GRU N=4,
#: H=256 1.08 (T=24) and 1.16 (T=31), RNN N=4, T=31, H=512 1.04.
CHUNK_PANEL_STEPS = 21
#: Bytes of W_hh below which chunks of one sample (a batch of 1-2) read it in place for those
#: short sequences too, instead of BLAS (one chunk: unless BLAS spreads, SPREAD_STEP_BYTES).
#: Measured (as above, in place / BLAS, N=2): T=5: RNN H=256 0.98, GRU H=512 0.90; T=16: RNN
#: H=128 0.84, H=512 0.97, H=768 0.98, H=1024 (4 MB) 1.04; GRU H=256 0.90, H=512 0.94; LSTM
#: H=256 0.98; GRU N=2, T=10, H=1024 (12 MB) 1.10.
ONE_ROW_DIRECT_BYTES = 4 << 20
#: Depth (K = H, the forward's W_hh^T rows) up to which chunks of one or two samples pack
#: W_hh for their forward from ONE_ROW_SHALLOW_STEPS steps instead of ONE_ROW_PANEL_STEPS
#: (one sample) and CHUNK_PANEL_STEPS (reading it in place below): at K = 32 a one-row
#: product on panels takes a quarter of the time in place (a horizontal sum per output of
#: ``gemm.few_rows_nt``), since its tiles run inlined (``gemm.few_rows_step``). Measured
#: (float32, Zen 5, in process, A/B medians, eval forward, packed from 8 steps / before):
#: N=1, H=32: LSTM T=20 0.927, T=25 0.805 (BLAS before), T=10 1.001; GRU T=20 0.951; RNN
#: T=20 0.973, T=25 0.804; H=16, LSTM T=10 0.984; H=64: LSTM T=20 0.964, RNN T=20 1.004, GRU
#: T=12 1.024; H=128, T=20-25: LSTM 1.013-1.026, GRU 1.047, RNN 1.049-1.107. Chunks of two
#: (N=4): H=32, T=20 LSTM 0.833, GRU 0.855, RNN 0.926; H=16, LSTM T=10 0.943; LSTM N=3,
#: T=12, H=32 1.001.
ONE_ROW_SHALLOW_DEPTH = 32
ONE_ROW_SHALLOW_STEPS = 8


#: What :func:`step_panels` gives a pass's per-step products: W_hh read in place, its panels,
#: or BLAS.
STEPS_IN_PLACE, STEPS_PACKED, STEPS_BLAS = 0, 1, 2


@jit(inline=True)
def step_products(nbytes, depth, chunks, widest, longest, forward):
    """How a pass's per-step products by b (``nbytes``, ``depth`` rows) run over ``chunks``
    chunks of at most ``widest`` samples, the longest of ``longest`` steps
    (:func:`step_panels`, which documents the rule): STEPS_IN_PLACE, STEPS_PACKED or
    STEPS_BLAS. Also asked from Python (``fastseq._threads.forward_steps_call_blas``:
    whether BLAS is held at one thread)."""
    spread = chunks == 1 and nbytes >= SPREAD_STEP_BYTES
    shallow = forward and depth <= ONE_ROW_SHALLOW_DEPTH  # matters for 1-2 samples a chunk only
    one_row = longest >= (ONE_ROW_SHALLOW_STEPS if shallow else ONE_ROW_PANEL_STEPS) and not spread
    short = widest <= DIRECT_STEP_ROWS and longest < CHUNK_PANEL_STEPS and not (shallow and one_row)
    if forward and short and (widest > 1 or nbytes < ONE_ROW_DIRECT_BYTES and not spread):
        return STEPS_IN_PLACE
    if widest > 1 or one_row:
        return STEPS_PACKED
    return STEPS_BLAS


@jit
def step_panels(b, chunk_samples, lengths, forward):
    """Panels of b (K, M) for the per-step products (``gemm.gemm_step``): ``pack(b)`` (packed
    across threads: call it at a kernel's top level, not inside a ``prange``), or none
    (empty: every step goes to BLAS) when no chunk has more than one sample and either the
    sequences are shorter than ONE_ROW_PANEL_STEPS or one chunk lets BLAS use every core
    (b of SPREAD_STEP_BYTES or more). For a ``forward`` (b = w.T, W_hh^T) and chunks of at most
    DIRECT_STEP_ROWS samples shorter than CHUNK_PANEL_STEPS (of one sample each: b below
    ONE_ROW_DIRECT_BYTES, and not spread): panels of shape (1, 0, NR), for which
    ``gemm.gemm_step_forward`` reads w in place. A forward's chunks of one or two samples
    with b of at most ONE_ROW_SHALLOW_DEPTH rows are packed from ONE_ROW_SHALLOW_STEPS steps.
    chunk_samples (K+1,): the chunks' first state indices; lengths (N,): the samples'
    lengths."""
    widest = 0
    for ch in range(chunk_samples.shape[0] - 1):
        widest = max(widest, chunk_samples[ch + 1] - chunk_samples[ch])
    longest = 0  # a loop: np.max compiled in 0.4 s of each cold start
    for length in lengths:
        longest = max(longest, length)
    kind = step_products(b.nbytes, b.shape[0], chunk_samples.shape[0] - 1, widest, longest, forward)
    if kind == STEPS_IN_PLACE:
        return np.zeros((1, 0, panel_width(b)), b.dtype)  # b = w.T: ``few_rows_nt`` reads w
    if kind == STEPS_PACKED:
        return pack_transposed_parallel(b.T)
    return np.zeros((0, b.shape[0], panel_width(b)), b.dtype)


#: Rows of input projected at a time by the inference path (per chunk; stays in cache).
PROJECTION_BLOCK_ROWS = 512


@jit
def projection_block(x, w_ih, w_ih_panels, r0, offsets_c, lengths_c, s, reverse, full, block, x_rows):
    """Project the input rows the chunk needs from step ``s`` on, a block of steps at a time.

    x (R, C) packed rows, or with ``x_rows`` (R,) (entries: row of x of each packed row) the
    unpacked (T*N, C) input, whose rows are gathered here, GATHER_ROWS at a time (or
    GATHER_ROWS_WIDE), into a buffer that stays in cache (no packed copy of the input in
    memory), or read in place where a block's rows are :func:`consecutive` in x (a
    chunk's step at equal lengths: RNN inference at N=1024, T=100, H=16, the kernel alone
    on one thread 6.6 -> 4.1 ms; layers on both threads, in process, new / old: RNN 0.96,
    LSTM 0.92, GRU 1.00). w_ih (G*H, C) in;
    w_ih_panels: ``gemm.pack_weights(w_ih.T)``. offsets_c (S+1,): the chunk's row offsets;
    lengths_c: its lengths (state order). full (R, G*H): when it has rows, everything is
    projected there already (training, or a batch in one chunk; then x is packed) and it is
    returned with base r0. Otherwise block (B, G*H) receives rows for the steps from ``s``
    on and is returned with the packed row its first row stands for: in time order, or in
    step order when :func:`step_ordered` (see there for how the kernels index it). Returns
    (buffer, first row, last step + 1 covered).
    """
    if full.shape[0] > 0:
        return full, 0, lengths_c[0]
    ordered = step_ordered(reverse, full, lengths_c)
    a, b, s_end = block_rows(offsets_c, lengths_c, s, reverse and not ordered, block.shape[0])
    if x_rows.shape[0] == 0 and not ordered:
        gemm_large(x[r0 + a : r0 + b], large_b(w_ih.T), w_ih_panels, block[: b - a], OVERWRITE)
        return block, r0 + a, s_end
    if not ordered and consecutive(x_rows, r0 + a, r0 + b):  # x's rows in place: no gather
        first = x_rows[r0 + a]
        gemm_large(x[first : first + b - a], large_b(w_ih.T), w_ih_panels, block[: b - a], OVERWRITE)
        return block, r0 + a, s_end
    gather = GATHER_ROWS_WIDE if w_ih.nbytes >= GATHER_WIDE_BYTES else GATHER_ROWS
    gathered = np.empty((min(gather, b - a), x.shape[1]), x.dtype)
    step, i = s, 0  # step order: sample i of step ``step`` (time order: the packed rows a..b-1)
    for i0 in range(a, b, gather):
        i1 = min(i0 + gather, b)
        for j in range(i0, i1):
            r = r0 + j
            if ordered:
                while i == offsets_c[step + 1] - offsets_c[step]:  # the step's samples done
                    step, i = step + 1, 0
                r = packed_row(r0, offsets_c, lengths_c[i], i, step, True)
                i += 1
            copy_units(x[x_rows[r] if x_rows.shape[0] else r], gathered[j - i0], 0, x.shape[1])
        gemm_large(gathered[: i1 - i0], large_b(w_ih.T), w_ih_panels, block[i0 - a : i1 - a], OVERWRITE)
    return block, r0 + a, s_end


@jit
def consecutive(rows, a, b):
    """Whether rows[a:b] (int64) are consecutive integers (True for a >= b)."""
    ok = True
    for j in range(a, b):
        ok &= rows[j] == rows[a] + (j - a)
    return ok


@jit
def step_ordered(reverse, full, lengths_c):
    """Whether :func:`projection_block` fills its blocks in step order: in reverse over a
    chunk of unequal lengths, with no ``full`` projection (inference). Step s of sample i
    (time lengths_c[i] - 1 - s) is then at the block row its forward-direction packed row
    would have, ``packed_row(r0, offsets_c, ., i, s, False)`` minus the block's base: the
    steps' rows are contiguous whatever the lengths, as each step runs the chunk's first
    batch_sizes[s] samples."""
    return reverse and full.shape[0] == 0 and lengths_c[0] != lengths_c[lengths_c.shape[0] - 1]


#: Input rows gathered at a time by :func:`projection_block` from an unpacked input, and
#: from W_ih (G*H, C) of GATHER_WIDE_BYTES on: each product of the gathered rows reads all
#: of W_ih's panels, from L3 once they outgrow L2. Measured (float32, Intel Xeon, eval
#: forward, N=64, T=50, H=1024, `fastseq bench`, three processes each way, 512 / 128 rows):
#: LSTM 0.95, GRU 0.98, RNN 0.97; at H=64-256 (W_ih up to 1 MB) 0.97-1.05, noise either way.
#: Zen 5 (twenty-sixth session, random lengths, N=64, T=50, H=1024, five processes each
#: way, 512 / 128 rows): RNN 1.02, GRU 1.00, LSTM 1.03, noise.
GATHER_ROWS = 128
GATHER_ROWS_WIDE = 512
GATHER_WIDE_BYTES = 2 << 20


@jit
def block_rows(offsets_c, lengths_c, s, reverse, capacity):
    """The block :func:`projection_block` projects from step ``s``: as many steps as fit in
    ``capacity`` rows (at least one). Returns (first row, end row) relative to the chunk and
    the step after the block."""
    n_longest = lengths_c[0]
    steps = max(1, capacity // lengths_c.shape[0])
    s_end = min(s + steps, n_longest)
    if reverse:  # all lengths equal here: step s is time L-1-s
        t_lo, t_hi = n_longest - s_end, n_longest - s
    else:
        t_lo, t_hi = s, s_end
    return offsets_c[t_lo], offsets_c[t_hi], s_end


@jit
def packed_row(chunk_row0, offsets_c, length, i, s, reverse):
    """Packed row of the chunk's local sample ``i`` (of the given length) at step ``s``:
    time ``s`` forwards, ``length - 1 - s`` in reverse."""
    t = length - 1 - s if reverse else s
    return chunk_row0 + offsets_c[t] + i


@jit
def output_row(out_rows, r):
    """Row of ``out`` that packed row ``r`` writes: ``out_rows[r]``, or ``r`` itself when
    ``out_rows`` has no entries (``out`` packed like the rows)."""
    return out_rows[r] if out_rows.shape[0] else r


@jit
def zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, part):
    """Zero columns ``out_col:out_col+hd`` of ``out`` (T*N, D*H) at the padded steps of
    part ``part`` of the batch, when ``out_rows`` has entries (``out`` unpacked, allocated
    uninitialised); else nothing. Call it once per chunk (part = the chunk's index), or once
    with one chunk.

    The parts are contiguous ranges of batch positions (as many as chunks) with about equal
    numbers of padded rows, not the chunks' own samples. When those were dealt back and
    forth, two threads zeroing neighbouring rows of the same pages ran slower than one
    thread zeroing all of them. Measured (float32, Intel Xeon, RNN forward at N=32, T=100, H=64,
    lengths uniform in [1, T], 1740 padded rows): the zeroing of both chunks alone, 8-20 us
    by chunk against 7 us by ranges (10.4 us on one thread); in a profile of the layer's
    forward, ``memset`` took 65 us of both threads' time per call by chunk, 31 by ranges.
    With the chunks themselves contiguous ranges (``fastseq._packing.Packing``), zeroing
    each chunk's own samples still ran slower (five alternating runs against ranges: RNN
    1.074, LSTM 1.032, GRU 1.016): the chunks even out valid rows, the ranges padded ones.

    A part's rows are zeroed step by step (a step's padded rows are neighbours, in the
    pages of that step), not sample by sample (a sample's steps N rows apart: 8 KB at N=32,
    H=64, a page or more each).
    Measured (Intel Xeon, alternating runs, step by step / sample by sample): RNN forward
    at N=32, T=100, H=64, random lengths 0.94-0.98 of the time (the zeroing had taken 17
    us of the call's 157). Outputs of every size are zeroed here: ``np.zeros`` for those
    beyond 1 MB cleared all of them on the calling thread first (225 us for 6.5 MB, steady
    state, while the other thread waited); zeroed here instead, N=64, T=100, H=256, random
    lengths: forward RNN 0.93, LSTM and GRU 0.98; training 0.97-0.99; 2 x 2 layers and
    H=1024 (T=50) 0.98-1.00. (The Zen 5 run that had set the 1 MB bound found ``np.zeros``
    ahead at 6.5 MB, 1.022, against zeroing sample by sample.)
    chunk_rows, chunk_samples (K+1,): the chunks' first packed rows and state indices; a
    sample's row at time 0 (its chunk's first row + its place in the chunk) names its
    place in the batch."""
    if out_rows.shape[0] == 0:
        return
    batch = lengths.shape[0]
    steps = out.shape[0] // batch
    parts = chunk_samples.shape[0] - 1
    length_at = np.empty(batch, np.int64)  # by batch position
    padded = 0
    for c in range(parts):
        for i in range(chunk_samples[c + 1] - chunk_samples[c]):
            length_at[out_rows[chunk_rows[c] + i]] = lengths[chunk_samples[c] + i]
            padded += steps - lengths[chunk_samples[c] + i]
    first, last = padded * part // parts, padded * (part + 1) // parts  # this part's share
    zero = out.dtype.type(0)
    before = 0  # padded rows of the positions before
    t_from = np.empty(batch, np.int64)  # this part's padded steps of each position: t_from..t_to-1
    t_to = np.empty(batch, np.int64)
    lo, hi = batch, 0
    for sample in range(batch):
        count = steps - length_at[sample]
        t_from[sample] = t_to[sample] = 0
        if before + count > first and before < last:
            t_from[sample] = length_at[sample] + max(0, first - before)
            t_to[sample] = length_at[sample] + min(count, last - before)
            lo, hi = min(lo, sample), max(hi, sample + 1)
        before += count
    for t in range(steps):  # time-major: a step's rows are neighbours
        for sample in range(lo, hi):
            if t_from[sample] <= t < t_to[sample]:
                row = out[t * batch + sample, out_col : out_col + hd]
                for j in range(hd):
                    row[j] = zero


#: Rows per piece when the chunk-level products of a layout with one chunk (a batch of one)
#: are split across threads (:func:`one_chunk_pieces`): the chunk's recurrence is serial,
#: but its input projection and dx need not be. Pieces of a fixed size, so that the split
#: does not depend on the thread count (each row's sums do not depend on it either way).
#: 16 rows (two full tiles) rather than 64: T=50 made one piece of 64, on one thread.
ONE_CHUNK_PIECE_ROWS = 16


@jit
def one_chunk_pieces(chunk_samples, rows):
    """Pieces of ONE_CHUNK_PIECE_ROWS over which a one-chunk layout of ``rows`` rows splits
    its chunk-level products (:func:`gemm_split_rows`), or 0 with several chunks (each
    chunk's thread runs its own)."""
    if chunk_samples.shape[0] != 2:
        return 0
    return (rows + ONE_CHUNK_PIECE_ROWS - 1) // ONE_CHUNK_PIECE_ROWS


@jit(inline=True)
def project_one_chunk(x, w_ih, w_ih_panels, gates, chunk_samples):
    """Call at a kernel's top level: for one chunk and ``gates`` with rows, gates = x @ W_ih^T
    across threads (:func:`one_chunk_pieces`). Returns whether it did (then
    :func:`start_chunk` does not)."""
    pieces = one_chunk_pieces(chunk_samples, gates.shape[0])  # 0 when gates has no rows
    if pieces:
        gemm_split_rows(x, large_b(w_ih.T), w_ih_panels, gates, OVERWRITE, pieces)
    return pieces > 0


@jit
def start_chunk(x, w_ih, w_ih_panels, gates, chunk_rows, chunk_samples, ch, projected):
    """Bounds of chunk ``ch`` and its projection set-up.

    Returns (r0, r1, s0, nc, block): rows r0..r1-1 and state indices s0..s0+nc-1. When
    ``gates`` has rows (training, and see :func:`projection_block`), the chunk's whole input
    projection is computed into it (unless already ``projected``: :func:`project_one_chunk`)
    and ``block`` is empty; otherwise ``block`` is the chunk's buffer for
    :func:`projection_block`.
    """
    r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
    nc = chunk_samples[ch + 1] - s0
    if gates.shape[0] > 0 and not projected:
        gemm_large(x[r0:r1], large_b(w_ih.T), w_ih_panels, gates[r0:r1], OVERWRITE)
    block = np.empty((block_capacity(nc, r1 - r0) if gates.shape[0] == 0 else 0, gates.shape[1]), gates.dtype)
    return r0, r1, s0, nc, block


@jit
def block_capacity(samples, rows):
    """Rows of the inference projection buffer for a chunk of ``samples`` samples and
    ``rows`` rows: PROJECTION_BLOCK_ROWS, at least one step of every sample, at most all
    the rows (short sequences: a buffer of 512 x 4H for 100 rows cost page faults at
    every call)."""
    return min(max(PROJECTION_BLOCK_ROWS, samples), rows)


@jit
def own_rows(state, s0, nc):
    """A copy of a chunk's rows state[s0:s0+nc] (state (N, H)) in a buffer of the chunk's
    own, ALIGN_BYTES aligned: the chunk's thread updates its states there at every step and
    writes them back once (:func:`copy_rows`), rather than in its rows of the (N, H) array
    the other chunks' threads update too. Used by :func:`fastseq.kernels.rnn.rnn_forward`:
    N=32, T=100, H=64, forward 0.94-0.95 of the time (the LSTM and GRU forward did not gain,
    and update in place); see docs/performance.md, twenty-third session."""
    own = aligned_empty((nc, state.shape[1]), state.dtype)
    copy_rows(state[s0 : s0 + nc], own)
    return own


@jit
def masked_rows(h, mask, s0, n, out):
    """Recurrent (variational) dropout on the state rows a step's GEMM reads.

    h (N, H) in; mask (N, H) or (0, H) in: the per-sample mask (0 rows: no recurrent
    dropout); out (>= n, H) scratch. Returns ``h[s0:s0+n] * mask[s0:s0+n]`` (in ``out``),
    or ``h[s0:s0+n]`` itself when there is no mask.
    """
    if mask.shape[0] == 0:
        return h[s0 : s0 + n]
    for i in range(n):
        for j in range(h.shape[1]):
            out[i, j] = h[s0 + i, j] * mask[s0 + i, j]
    return out[:n]


@jit
def mask_rows(a, mask, s0, n):
    """a[s0:s0+n] *= mask[s0:s0+n] in place (backward of :func:`masked_rows`); no-op when
    ``mask`` has 0 rows."""
    if mask.shape[0] == 0:
        return
    for i in range(n):
        for j in range(a.shape[1]):
            a[s0 + i, j] *= mask[s0 + i, j]


@jit(inline=True)
def copy_units(src, dst, u0, u1):
    """dst[u0:u1] = src[u0:u1] (1-D), in the time loops. An element loop, inlined: numba's
    slice assignment checks the two for overlap and copies through a generic iterator, and a
    called helper pays for the views it receives (see ``fastseq._jit`` on ``inline``);
    2-4x slower on these rows."""
    for u in range(u0, u1):
        dst[u] = src[u]


@jit(inline=True)
def add_units(src, dst, u0, u1):
    """dst[u0:u1] += src[u0:u1] (1-D), as :func:`copy_units`."""
    for u in range(u0, u1):
        dst[u] += src[u]


#: Swaps of single samples between neighbouring chunks that :func:`contiguous_chunks` makes
#: at most per pair of chunks, and the batch above which it makes none (each swap compares
#: every pair of the two chunks' samples; past it, one sample's rows are a small share).
CHUNK_SWAPS = 4
CHUNK_SWAPS_MAX_BATCH = 256


@jit
def contiguous_chunks(lengths, n_chunks):
    """The chunk of each sample (N,) of a packing (``fastseq._packing.Packing``): chunk c
    takes the c-th contiguous range of batch positions, the ranges holding about equal
    valid rows (each sample goes to the chunk where the middle of its rows falls; at equal
    lengths, ranges at most one sample apart); then, up to CHUNK_SWAPS times per pair of
    neighbouring chunks, the swap of one sample each way that evens their rows the most,
    while it evens them. Empty when a chunk would get no sample. lengths (N,) int64 >= 1."""
    batch = lengths.shape[0]
    total = 0
    for length in lengths:
        total += length
    chunk_of = np.empty(batch, np.int64)
    counts = np.zeros(n_chunks, np.int64)
    rows = np.zeros(n_chunks, np.int64)
    end = 0
    for i in range(batch):
        end += lengths[i]
        c = min(n_chunks - 1, (2 * end - lengths[i]) * n_chunks // (2 * total))
        chunk_of[i] = c
        counts[c] += 1
        rows[c] += lengths[i]
    for c in range(n_chunks):
        if counts[c] == 0:
            return chunk_of[:0]
    if batch > CHUNK_SWAPS_MAX_BATCH:
        return chunk_of
    for _ in range(CHUNK_SWAPS):
        swapped = False
        for c in range(n_chunks - 1):
            excess = rows[c] - rows[c + 1]
            best, best_a, best_b = abs(excess), -1, -1
            for a in range(batch):
                if chunk_of[a] != c:
                    continue
                for b in range(batch):
                    if chunk_of[b] == c + 1:
                        after = abs(excess - 2 * (lengths[a] - lengths[b]))
                        if after < best:
                            best, best_a, best_b = after, a, b
            if best_a >= 0:
                chunk_of[best_a], chunk_of[best_b] = c + 1, c
                moved = lengths[best_a] - lengths[best_b]
                rows[c] -= moved
                rows[c + 1] += moved
                swapped = True
        if not swapped:
            break
    return chunk_of


@jit(parallel=True)
def gather_rows(a, row_time, row_sample, out):
    """out[r] = a[row_time[r], row_sample[r]] for a (T, N, F) (any strides), out (R, F):
    packing. 5x np.take's rate on 6400 rows of 4 KB (both threads, no temporary)."""
    for r in prange(out.shape[0]):
        copy_units(a[row_time[r], row_sample[r]], out[r], 0, out.shape[1])


@jit(parallel=True)
def unpack_rows(packed, out_rows, chunk_rows, chunk_samples, lengths, out):
    """out (T*N, F) = packed (R, F) unpacked: row r to out[out_rows[r]], zeros at the padded
    steps (:func:`zero_padding`, a part of the batch per chunk). Each chunk's rows and part
    on a thread of their own. Measured (float32, Intel Xeon, RNN training at N=32, T=100, H=64,
    lengths uniform in [1, T]): the gradient of the input unpacked into ``np.zeros``
    memory took 4% of the step in ``memset``, on the calling thread while the other waited
    (see docs/performance.md, twenty-third session)."""
    f = packed.shape[1]
    for ch in prange(chunk_samples.shape[0] - 1):
        zero_padding(out, 0, f, out_rows, lengths, chunk_rows, chunk_samples, np.int64(ch))
        for r in range(chunk_rows[ch], chunk_rows[ch + 1]):
            copy_units(packed[r], out[out_rows[r]], 0, f)


# Unit-split steps: a batch too small to split by samples (fastseq._threads.unit_parts) runs
# as one chunk, and each step's recurrent product and gate math are split across ``parts``
# threads by hidden units, one parallel region per step. Part p owns units
# ``units[p] .. units[p+1]-1`` of every gate.


@jit
def unit_bounds(hd, parts):
    """(parts+1,) int64: first hidden unit of each part, the H units split evenly."""
    units = np.empty(parts + 1, np.int64)
    for p in range(parts + 1):
        units[p] = p * hd // parts
    return units


@jit
def widest_part(units):
    """Units in the largest part."""
    widest = 0
    for p in range(units.shape[0] - 1):
        widest = max(widest, units[p + 1] - units[p])
    return widest


@jit
def gather_unit_rows(w, gates, u0, hu, out):
    """out[q*hu + j] = w[q*H + u0 + j] for gates q < ``gates`` and j < hu: the rows of w
    (G*H, K) for the units u0..u0+hu-1, gate-major. out (>= G*hu, K)."""
    hd = w.shape[0] // gates
    for q in range(gates):
        copy_rows(w[q * hd + u0 : q * hd + u0 + hu], out[q * hu : (q + 1) * hu])


@jit(parallel=True)
def pack_unit_rows(w, gates, units):
    """Panels (parts, P, K, NR) of each part's rows of w (G*H, K), for products
    ``a @ w_p.T``: part p's w_p stacks rows ``q*H + j`` for gates q = 0..G-1 and its units j
    (gate-major, so the product's row holds gate q of unit j at ``q * hu + j - units[p]``).
    Use ``panels[p, :ceil(G * hu / NR)]``."""
    parts, k, nr = units.shape[0] - 1, w.shape[1], panel_width(w)
    panels = aligned_empty((parts, (gates * widest_part(units) + nr - 1) // nr, k, nr), w.dtype)
    for p in prange(parts):
        # the part's rows copied together first, then packed in blocks by pack_panel (float32,
        # Zen 5, 2 parts on two threads: H=512 0.42 ms element by element -> 0.19 ms, H=1024
        # 1.73 -> 0.95)
        u0, hu = units[p], units[p + 1] - units[p]
        rows = np.empty((gates * hu, k), w.dtype)
        gather_unit_rows(w, gates, u0, hu, rows)
        for q in range((gates * hu + nr - 1) // nr):
            pack_panel(rows, q, panels[p])
    return panels


@jit(parallel=True)
def pack_unit_gate_rows(w, gates, units):
    """Panels (parts, P, G*widest, NR) of each part's rows of w (G*H, M) as B, for products
    ``a_p @ w_p`` whose ``a_p`` (n, G*widest) holds the part's compact gate columns (gate q of
    its unit j at q * hu + j, zero past G*hu): w_p stacks rows ``q*H + j`` gate-major, then
    zero rows up to G*widest. Each part's rows are copied together, then packed
    (:func:`pack_panel`)."""
    parts, m, nr = units.shape[0] - 1, w.shape[1], panel_width(w)
    wide = widest_part(units)
    panels = aligned_empty((parts, (m + nr - 1) // nr, gates * wide, nr), w.dtype)
    for p in prange(parts):
        u0, hu = units[p], units[p + 1] - units[p]
        rows = np.zeros((gates * wide, m), w.dtype)
        gather_unit_rows(w, gates, u0, hu, rows)
        for q in range((m + nr - 1) // nr):
            pack_panel(rows.T, q, panels[p])
    return panels


@jit
def sum_unit_parts(partial, mask, i, u0, u1, out):
    """out[u0:u1] = (sum over parts q of partial[q, i, u0:u1]) * mask[i, u0:u1] (mask with 0
    rows: none), summed in part order. partial (parts, N, H), out (H,)."""
    dst = out[u0:u1]
    first = partial[0, i, u0:u1]
    for j in range(u1 - u0):
        dst[j] = first[j]
    for q in range(1, partial.shape[0]):
        src = partial[q, i, u0:u1]
        for j in range(u1 - u0):
            dst[j] += src[j]
    if mask.shape[0]:
        m = mask[i, u0:u1]
        for j in range(u1 - u0):
            dst[j] *= m[j]


# One-chunk passes split by units (``*_forward_units`` / ``*_backward_units`` of every cell):
# the pieces their serial drivers share.


#: Rows of input (T*N) up to which a forward reads W_ih in place for its input projection
#: (:func:`input_panels`; ONE_ROW_PANEL_STEPS: the steps below which a one-chunk forward split
#: by units reads W_hh in place, :func:`unit_recurrent_panels`). Packing costs a read and
#: a write of every weight per call, which a short sequence does not earn back: one step
#: of a batch of one at C=H=1024 took 0.76-0.90 ms (RNN) and 3.0-4.2 ms (GRU) packing both.
#: Measured (float32, Zen 5, in process, A/B medians, in place / packed), eval forward: RNN
#: N=1, H=1024, T=1 0.180, T=30 0.740; GRU N=1, H=1024, T=30 0.654; N=1, T=8, H=512 0.481;
#: LSTM N=2, T=16, H=768 0.615; training: RNN N=1, T=30, H=1024 0.910; GRU N=1, T=16, H=512
#: 0.876; LSTM N=2, T=16, H=768 0.811, N=1, T=31, H=256 0.871.
DIRECT_PROJECTION_ROWS = FEW_ROWS
#: Rows up to which a short split forward's per-step products read W_hh in place (see
#: above), and a short chunked forward's chunks (:func:`step_panels`, CHUNK_PANEL_STEPS);
#: from 3 rows the panels' tiles win: LSTM N=3, T=31, H=384 1.15x slower in place, N=8,
#: T=16, H=512 1.12x.
DIRECT_STEP_ROWS = 2
#: Rows up to which a split forward shorter than CHUNK_PANEL_STEPS reads W_hh in place too
#: (as the chunks of two samples that a batch of 3-4 would otherwise run in do): packing W_hh
#: for a few steps cost more than the in-place products lose. Measured (float32, Intel Xeon,
#: layers split by units, three processes each way, in place / packed): forward N=4, T=5,
#: H=1024: LSTM 0.68, GRU 0.69, RNN 0.67; LSTM N=3, T=10, H=1024 0.75; GRU N=3, T=20,
#: H=1024 0.87; LSTM N=4, T=20, H=512 1.00; RNN N=4, T=20, H=768 0.99; training GRU N=4,
#: T=10, H=1024 0.95, LSTM N=3, T=20, H=512 0.97.
SHORT_SPLIT_ROWS = 4


#: Rows of input (T*N) up to which a forward projects all of its input before the recurrence
#: (:func:`project_all`: W_ih read in place up to DIRECT_PROJECTION_ROWS, else packed a few
#: panels at a time by the thread that uses them, :func:`project_packing`) instead of
#: packing W_ih's panels for the chunks (or blocks of steps) to share, when W_ih has at least
#: UPFRONT_PROJECTION_BYTES (:func:`projects_upfront`). Measured (float32, Zen 5, both
#: threads, the projection alone, packed a block at a time / packed whole then split by
#: rows): G*H x C = 3072 x 1024: 40 rows 0.62-0.79, 80 0.69-0.72, 160 0.69-0.78, 320
#: 0.76-0.84, 640 0.84-0.89; 4096 x 1024: 40-160 rows 0.49-0.73, 320-640 0.85-0.93; 1536 x
#: 512: 40 0.80-0.89, 80 0.92, 160 0.95-0.99, 320-640 0.99-1.02; 1024 x 256: 40 0.76-0.80,
#: 80 0.83-0.85, 160 0.93-0.96, 320 0.96-1.07, 640 1.03-1.08. Layers (float32, in process,
#: A/B medians, upfront / panels), eval forward: T=5, H=1024, N=16: GRU 0.873 / 0.883, RNN
#: 0.778 / 0.924, LSTM 0.845 / 0.875 (two runs); GRU N=4, T=30, H=1024 0.913; RNN N=8,
#: T=30, H=512 0.939; GRU N=8, T=30, H=384 0.913, N=16, T=10, H=256 0.921; split by units:
#: LSTM N=2, T=100, H=512 0.895, GRU N=1, T=100, H=512 0.942-0.950; 0.97-1.01 at 200-240
#: rows and H=256-512 (LSTM N=8, T=30, H=512 0.973; N=4, T=50, H=256 1.007); training GRU
#: N=16, T=5, H=1024 0.894 then 1.027, LSTM N=8, T=30, H=512 0.963. Small weights lost: RNN
#: N=8, T=30, H=64 1.07-1.15, N=16, T=10, H=128 (64 KB) 1.06; GRU N=8, T=20, H=128 (192 KB)
#: 1.008 (below UPFRONT_PROJECTION_BYTES they keep the panels: 0.956-0.977 after).
UPFRONT_PROJECTION_ROWS = 256
UPFRONT_PROJECTION_BYTES = 1 << 19
#: Rows up to which W_ih of UPFRONT_LARGE_BYTES or more projects up front: the panels of
#: such a W_ih and W_hh's together fill the L3 cache (32 MB here), and each step of a small
#: batch then streams W_hh's panels from memory. Measured (same method, eval forward, T x N
#: rows): LSTM H=1024 (16 MB) N=16, T=40 0.687, 0.680 and 0.990 in three runs (the panels
#: path took 48.5, 49.8 and 27.4 ms, this one 27-33), T=60 0.777 then 0.956, T=100 (1600
#: rows) 0.85, N=32, T=20 0.944; RNN H=1024 (4 MB) N=16, T=40 0.942, T=50 0.955 then 1.019;
#: GRU H=1024 (12 MB) N=16, T=30 0.939-0.949, T=60 1.003, H=768 (7 MB) N=16, T=40 1.008;
#: LSTM N=16, T=50, H=512 (4 MB) 1.011, N=8, T=80, H=256 1.034. Capped so that inference
#: keeps at most this many rows of projection, about what its blocks of steps hold
#: (PROJECTION_BLOCK_ROWS per chunk); all 3200 rows up front at N=64, T=50, H=1024 gave
#: 0.956 then 1.096 (LSTM, full length) and 0.960 / 0.985 (LSTM / GRU, random lengths).
UPFRONT_LARGE_ROWS = 1024
UPFRONT_LARGE_BYTES = 8 << 20
#: Bytes of W_ih's panels a thread of :func:`project_packing` packs at a time (they stay in
#: its L2 while all rows of x pass over them).
PACKING_BLOCK_BYTES = 1 << 18


@jit
def projects_upfront(w_ih, rows):
    """Whether a forward of ``rows`` packed rows projects its whole input first
    (:func:`project_all`): up to DIRECT_PROJECTION_ROWS rows, up to UPFRONT_PROJECTION_ROWS
    with UPFRONT_PROJECTION_BYTES of W_ih (G*H, C) or more, up to UPFRONT_LARGE_ROWS with
    UPFRONT_LARGE_BYTES or more."""
    size = w_ih.nbytes
    return (
        rows <= DIRECT_PROJECTION_ROWS
        or (rows <= UPFRONT_PROJECTION_ROWS and size >= UPFRONT_PROJECTION_BYTES)
        or (rows <= UPFRONT_LARGE_ROWS and size >= UPFRONT_LARGE_BYTES)
    )


@jit(inline=True)
def input_panels(w_ih, rows):
    """Panels of W_ih^T (G*H, C) for a forward's input projection of ``rows`` packed rows
    (``gemm.pack_weights``), or none (empty) when the whole projection runs first
    (:func:`projects_upfront`; :func:`upfront_projection` for chunks,
    :func:`unit_projection_start` split by units) and reads w_ih itself."""
    return pack_weights(any_layout((w_ih[:0] if projects_upfront(w_ih, rows) else w_ih).T))


@jit
def packed_rows(x, x_rows):
    """Packed rows of a chunked forward's input: x (R, C), or R = x_rows' entries when it has
    any (x unpacked, see :func:`projection_block`)."""
    return x_rows.shape[0] if x_rows.shape[0] else x.shape[0]


@jit
def unit_recurrent_panels(w_hh, gates, units, steps, batch):
    """:func:`pack_unit_rows` of w_hh (G*H, H), or none (panels (parts, 0, H, NR)) for
    fewer than ONE_ROW_PANEL_STEPS ``steps`` of a ``batch`` of at most DIRECT_STEP_ROWS, or
    fewer than CHUNK_PANEL_STEPS of at most SHORT_SPLIT_ROWS: then :func:`unit_product`
    reads W_hh in place."""
    short = steps < ONE_ROW_PANEL_STEPS and batch <= DIRECT_STEP_ROWS
    if short or steps < CHUNK_PANEL_STEPS and batch <= SHORT_SPLIT_ROWS:
        return np.empty((units.shape[0] - 1, 0, w_hh.shape[1], panel_width(w_hh)), w_hh.dtype)
    return pack_unit_rows(w_hh, gates, units)


@jit
def unit_product(h_in, panels, w_hh, gates, p, u0, hu, out):
    """out (n, G*hu) = h_in (n, H) @ (part p's rows of w_hh, gate-major)^T, its units u0..u0+hu-1:
    from the part's panels (:func:`unit_recurrent_panels`), or with none, reading w_hh
    (G*H, H) in place a gate block at a time (``gemm.few_rows_nt``)."""
    if panels.shape[1]:
        nr = panels.shape[3]
        gemm_packed(h_in, panels[p, : (gates * hu + nr - 1) // nr], out, OVERWRITE)
        return
    hd = w_hh.shape[0] // gates
    for q in range(gates):
        few_rows_nt(h_in, w_hh[q * hd + u0 : q * hd + u0 + hu], out[:, q * hu : (q + 1) * hu])


@jit(parallel=True)
def project_in_place(x, w, out, parts):
    """out (n, M) = x (n, C) @ w.T for w (M, C) read in place (``gemm.few_rows_nt``, few
    rows of x), the rows of w split across ``parts`` threads at multiples of 4."""
    m = w.shape[0]
    for p in prange(parts):
        j0, j1 = (m * p // parts) // 4 * 4, (m * (p + 1) // parts) // 4 * 4 if p < parts - 1 else m
        if j1 > j0:
            few_rows_nt(x, w[j0:j1], out[:, j0:j1])


@jit(parallel=True)
def project_packing(x, w, out, parts):
    """out (n, M) = x (n, C) @ w.T for w (M, C), w's panels split across ``parts`` threads,
    each packing PACKING_BLOCK_BYTES of its panels at a time (``gemm.pack_panel``) and
    running all rows of x over them (``gemm.gemm_packed``) while they are in its cache: w is
    read once and its panels never written to memory, where :func:`gemm_split_rows` on
    ``pack_weights(w.T)`` writes them all, then reads them all on every thread."""
    n, k = x.shape
    nr = panel_width(w)
    total = (w.shape[0] + nr - 1) // nr
    block = max(1, PACKING_BLOCK_BYTES // max(1, k * nr * w.itemsize))
    for p in prange(parts):
        q0, q1 = total * p // parts, total * (p + 1) // parts
        panels = aligned_empty((min(block, q1 - q0), k, nr), w.dtype)
        for b0 in range(q0, q1, block):
            b1 = min(q1, b0 + block)
            ws = w[b0 * nr : b1 * nr]  # its rows: B's columns of panels b0..b1-1
            for q in range(b1 - b0):
                pack_panel(ws, q, panels)
            part_out = np.empty((n, ws.shape[0]), out.dtype)
            gemm_packed(x, panels[: b1 - b0], part_out, OVERWRITE)
            for r in range(n):
                copy_units(part_out[r], out[r, b0 * nr :], 0, ws.shape[0])


@jit(inline=True)
def project_all(x, w_ih, out, parts):
    """out (R, G*H) = x (R, C) @ W_ih^T, the whole input projection at once
    (:func:`projects_upfront`): W_ih read in place (:func:`project_in_place`) for at most
    DIRECT_PROJECTION_ROWS, else packed a block at a time (:func:`project_packing`), or by
    BLAS when BLAS_FOR_LARGE (split by rows, as it packs for itself)."""
    if x.shape[0] <= DIRECT_PROJECTION_ROWS:
        if parts == 1:  # on the calling thread, no parallel region (SERIAL_PROJECTION_FMAS)
            few_rows_nt(x, w_ih[0 : w_ih.shape[0]], out[:, 0 : out.shape[1]])
        else:
            project_in_place(x, w_ih, out, parts)
    elif BLAS_FOR_LARGE:
        gemm_split_rows(x, large_b(w_ih.T), pack_weights(any_layout(w_ih.T)), out, OVERWRITE, parts)
    else:
        project_packing(x, w_ih, out, parts)


@jit(inline=True)
def unit_projection(x, rows, w_ih, w_ih_panels, out, parts):
    """out = x[rows] @ W_ih^T for a split forward's block of rows (a slice of x (R, C) that
    does not project up front: :func:`input_panels`), split by rows on the panels."""
    gemm_split_rows(x[rows[0] : rows[1]], large_b(w_ih.T), w_ih_panels, out, OVERWRITE, parts)


#: Threads :func:`upfront_projection` splits its product across: numba's start-up thread
#: count (each output column is summed the same way whatever the split).
PROJECTION_PARTS = max(1, numba.config.NUMBA_NUM_THREADS)
#: Multiply-adds (rows x G*H x C) up to which :func:`upfront_projection` reads W_ih in place
#: on the calling thread instead of across PROJECTION_PARTS threads: a parallel region's
#: launch and wake-up cost more than the split saves. The same sums either way
#: (``gemm.few_rows_nt`` adds w's rows in blocks of 4 from the first it is given, and
#: :func:`project_in_place` splits w at multiples of 4). Measured (Zen 5, A/B in one process,
#: serial / split, eval forward): LSTM N=1 T=20 H=32 0.881, T=5 0.958; GRU N=1 T=20 H=32
#: 0.989, N=4 T=5 0.989; RNN N=1 T=20 H=32 0.958, H=64 0.974; LSTM training N=1 T=20 H=32
#: 0.985; LSTM N=1 T=20 H=128 (above the bound) 0.986.
SERIAL_PROJECTION_FMAS = 1 << 17


@jit(inline=True)
def upfront_projection(x, w_ih, gates, x_rows):
    """Call at a chunked kernel's top level. When it :func:`projects_upfront`, the whole
    input projection (R, G*H) (:func:`project_all`, across PROJECTION_PARTS threads): into
    ``gates`` when it has rows (training), else into a new array, x's rows gathered through
    ``x_rows`` when it has entries. Returns (the projection, True); otherwise (``gates``,
    False): the chunks project then.
    Measured with W_ih read in place up to 32 rows (float32, Zen 5, in process, A/B medians,
    new / packing W_ih), eval forward at T=5, H=1024: GRU N=4 0.545, RNN N=4 0.804, LSTM N=1
    0.531; training GRU N=4 0.984, RNN N=3, T=8, H=512 0.954, LSTM N=16, T=2, H=512 1.023."""
    rows = packed_rows(x, x_rows)
    if not projects_upfront(w_ih, rows):
        return gates, False
    out = gates if gates.shape[0] else np.empty((rows, w_ih.shape[0]), x.dtype)
    serial = rows * w_ih.shape[0] * w_ih.shape[1] <= SERIAL_PROJECTION_FMAS
    parts = np.int64(1 if serial else PROJECTION_PARTS)  # typed as the split passes' parts
    if x_rows.shape[0]:
        packed = np.empty((rows, x.shape[1]), x.dtype)
        for r in range(rows):
            copy_units(x[x_rows[r]], packed[r], 0, x.shape[1])
        project_all(packed, w_ih, out, parts)
    else:
        project_all(x, w_ih, out, parts)
    return out, True


@jit(inline=True)
def chunk_team(n_chunks):
    """numba's thread count before a forward's loop over its ``n_chunks`` chunks, given back
    to :data:`set_team` after it; a loop over one chunk runs on the calling thread
    alone, as a region of one thread: the other thread had no chunk but still cost its
    wake-up and the region's end. Measured (Zen 5, a layer's kernel alone, N=1, H=32, us,
    two threads / one): RNN T=1 7.5 / 3.7, T=20 10.2 / 6.5; LSTM T=20 16.8 / 13.3; GRU
    T=20 16.0 / 11.3. Only the loop: the input projection before it keeps both threads.
    A layer's eval call (A/B in one process, 11 rounds): N=1, T=20, H=32: GRU 0.877, RNN
    0.889, LSTM 0.994; RNN N=1, T=200, H=64 0.953; LSTM T=200, H=32 0.978; GRU N=1, T=200,
    H=128 1.011; batches in two chunks unchanged (RNN N=32, T=100, H=64 1.002)."""
    team = _get_num_threads()
    if n_chunks == 1:
        set_team(1)
    return team


#: numba's thread count of the calling thread, read and set through the symbols numba's
#: threading layer registers (numba.get_num_threads / set_num_threads in jitted code call
#: them through ctypes pointers, which keeps a kernel out of the disk cache).
_get_num_threads = types.ExternalFunction("get_num_threads", types.intp())  # as numba declares it
set_team = types.ExternalFunction("set_num_threads", types.void(types.intc))


@jit
def chunk_projection_start(x, w_ih, gates, chunk_samples, x_rows):
    """Call at a chunked forward's top level: its input projection set-up. Returns
    (w_ih_panels, full, projected): the panels of W_ih^T (:func:`input_panels`, none when
    it :func:`projects_upfront`); ``full`` the whole projection when already computed or to
    be computed by the chunks (:func:`upfront_projection`: gates, or a new array of all
    rows); and whether it is already computed (up front, or for one chunk:
    :func:`project_one_chunk`), for :func:`start_chunk`."""
    w_ih_panels = input_panels(w_ih, packed_rows(x, x_rows))  # B of the input projection x @ W_ih^T
    full, direct = upfront_projection(x, w_ih, gates, x_rows)
    projected = True if direct else project_one_chunk(x, w_ih, w_ih_panels, gates, chunk_samples)
    return w_ih_panels, full, projected


@jit
def unit_projection_start(x, w_ih, w_ih_panels, gates, lengths, parts):
    """Start a one-chunk split forward's input projection: all of it at once when it
    :func:`projects_upfront` (:func:`project_all`, into ``gates`` (R, G*H) if it has rows,
    else into a new array) or when ``gates`` has rows (training: split by rows,
    :func:`unit_projection`); else return a buffer for :func:`unit_projection_block`.
    Returns (block, the projection read until the first block, the first step that needs a
    block)."""
    upfront = projects_upfront(w_ih, x.shape[0])
    full = gates.shape[0] > 0 or upfront
    rows = 0 if full else block_capacity(lengths.shape[0], x.shape[0])
    block = np.empty((rows, gates.shape[1]), gates.dtype)
    proj = gates if gates.shape[0] or not upfront else np.empty((x.shape[0], gates.shape[1]), gates.dtype)
    if upfront:
        project_all(x, w_ih, proj, parts)
    elif full:
        unit_projection(x, (0, x.shape[0]), w_ih, w_ih_panels, gates, parts)
    return block, proj, lengths[0] if full else 0


@jit
def unit_projection_block(x, w_ih, w_ih_panels, offsets_c, lengths, s, reverse, block, parts):
    """Project the block of steps from step s into ``block`` (:func:`unit_projection`). Returns (the
    block's first packed row, the step after the block)."""
    a, b, s_next = block_rows(offsets_c, lengths, s, reverse, block.shape[0])
    unit_projection(x, (a, b), w_ih, w_ih_panels, block[: b - a], parts)
    return a, s_next


@jit
def masked_units(h, rmask, n, u0, u1, out):
    """out[i, u0:u1] = h[i, u0:u1] times the recurrent dropout mask rmask[i, u0:u1] (rmask
    with 0 rows: none), for i < n: the state a split step's products read (every part reads
    all of it; each part writes its own units of h)."""
    for i in range(n):
        for j in range(u0, u1):
            out[i, j] = h[i, j] * rmask[i, j] if rmask.shape[0] else h[i, j]


@jit
def unit_step_start(x, w_ih, w_ih_panels, offsets_c, lengths, s, reverse, block, parts, proj, base, s_next,
                    h, rmask, n, h_in):  # fmt: skip
    """The start of step s of a unit-split forward that runs a parallel region a step: at the
    first step of a new projection block (s == s_next, see :func:`unit_projection_start`)
    project it into ``block`` (:func:`unit_projection_block`) and read the projection from
    there; then the step's masked state h_in (:func:`masked_units`). proj: the projection
    read so far (``gates`` or ``block``) and base its first packed row. Returns (proj, base,
    s_next)."""
    if s == s_next:
        base, s_next = unit_projection_block(
            x, w_ih, w_ih_panels, offsets_c, lengths, s, reverse, block, parts
        )
        proj = block
    masked_units(h, rmask, n, 0, h.shape[1], h_in)
    return proj, base, s_next


#: Bytes of input projection (R x G*H) up to which a unit-split forward that can run all its
#: steps in one parallel region projects all its rows first rather than a block of
#: PROJECTION_BLOCK_ROWS at a time (which would need a region per step): the bound of
#: ``_threads.ONE_CHUNK_PROJECTION_BYTES``, the whole projection a batch of one in chunks
#: keeps. At unequal lengths too (all packed rows at once, :func:`steps_region_start`; a
#: block of steps held only its ``capacity // N`` steps). Measured (Zen 5, A/B in one
#: process, lengths uniform in [1, T], one region / blocks): LSTM N=4 T=200 H=384 0.867-0.936,
#: GRU N=4 T=300 H=512 0.970, RNN N=4 T=300 H=1024 0.973, LSTM N=2 T=600 H=512 1.007.
ONE_REGION_PROJECTION_BYTES = 8 << 20


@jit
def steps_region_start(x, w_ih, w_ih_panels, offsets_c, lengths, reverse, block, proj, s_next, parts, threads, h,
                       rmask):  # fmt: skip
    """After :func:`unit_projection_start`: whether all steps can run in one parallel region
    (kernels.sync): numba's team has a thread for each of the ``parts`` (``threads``: its
    active size) and the whole projection is there, or is computed here (in one block of all
    rows, up to ONE_REGION_PROJECTION_BYTES). Returns (proj, base, s_next, h_buf, claims):
    the projection and its first packed row, the step of the next block; for one region,
    h_buf (2, N, H) with h masked in h_buf[0] (the state the products read at even steps,
    odd steps the other) and the steps' counters (``sync.step_claims``); otherwise both
    with no entries."""
    base = 0
    one_region = threads >= parts
    if one_region and s_next == 0:
        rows = x.shape[0]
        if rows * block.shape[1] * block.itemsize <= ONE_REGION_PROJECTION_BYTES:
            # every packed row at once, whatever the lengths (a block of steps holds
            # ``capacity // N`` of them: unequal lengths would need several)
            if rows > block.shape[0]:
                block = np.empty((rows, block.shape[1]), block.dtype)
            unit_projection(x, (0, rows), w_ih, w_ih_panels, block[:rows], parts)
            proj, s_next = block, lengths[0]
        elif block_rows(offsets_c, lengths, 0, reverse, block.shape[0])[2] >= lengths[0]:
            base, s_next = unit_projection_block(
                x, w_ih, w_ih_panels, offsets_c, lengths, 0, reverse, block, parts
            )
            proj = block
    one_region = one_region and s_next >= lengths[0]
    nb, hd = h.shape
    h_buf = np.empty((2 if one_region else 0, nb, hd), h.dtype)
    if one_region:
        masked_units(h, rmask, nb, 0, hd, h_buf[0])
    return proj, base, s_next, h_buf, step_claims(lengths[0] if one_region else 0, parts)


@jit
def unit_initial_dh(partial, mask, done, dh):
    """After a split backward's last step: dh[i] = partial (parts, N, H) summed over the
    parts, times the recurrent dropout mask, for i < done (the gradient of the initial
    state; every unit, summed in part order as the steps do)."""
    for i in range(done):
        sum_unit_parts(partial, mask, i, 0, dh.shape[1], dh[i])


@jit(parallel=True)
def gemm_split_rows(a, b, b_panels, out, accumulate, parts):
    """:func:`gemm.gemm_large` (a @ b -> out, or += when ``accumulate``) with a's rows split
    across ``parts`` threads."""
    n = a.shape[0]
    for p in prange(parts):
        r0, r1 = n * p // parts, n * (p + 1) // parts
        if r1 > r0:
            gemm_large(a[r0:r1], b, b_panels, out[r0:r1], accumulate)


@jit
def gather_units(row, gates, u0, out):
    """Compact a gate row for the units u0..u0+hu-1: out[q*hu + u] = row[q*H + u0 + u] for
    each gate q < ``gates``. row (G*H,), out (G*hu,). (Element loops here and in the other
    unit-split helpers: slice assignments compile numba's shape-error path, seconds of
    first-call compile time. Each gate's block is sliced first and copied from index 0:
    indexing ``row[q * H + u0 + u]`` directly did not vectorise, 217 against 29 ns for
    G*hu = 1024, Zen 5.)"""
    hd, hu = row.shape[0] // gates, out.shape[0] // gates
    for q in range(gates):
        src = row[q * hd + u0 : q * hd + u0 + hu]
        dst = out[q * hu : q * hu + hu]
        for u in range(hu):
            dst[u] = src[u]


@jit
def scatter_units(compact, gates, u0, row):
    """The inverse of :func:`gather_units`: row[q*H + u0 + u] = compact[q*hu + u]."""
    hd, hu = row.shape[0] // gates, compact.shape[0] // gates
    for q in range(gates):
        src = compact[q * hu : q * hu + hu]
        dst = row[q * hd + u0 : q * hd + u0 + hu]
        for u in range(hu):
            dst[u] = src[u]


@jit
def unit_operands(b_ih, b_hh, w_peep, gates, units):
    """Each part's compact biases (parts, G*widest) (empty when b_ih has no entries), peephole
    weights (parts, P, widest) of w_peep (P, H), and a compact gate-row scratch (parts,
    G*widest): part p's use the first G*hu (hu) entries."""
    parts, wide = units.shape[0] - 1, widest_part(units)
    nb = gates * wide if b_ih.shape[0] else 0
    b_ih_p = np.zeros((parts, nb), b_ih.dtype)
    b_hh_p = np.zeros((parts, nb), b_ih.dtype)
    peep_p = np.zeros((parts, w_peep.shape[0], wide), w_peep.dtype)
    for p in range(parts):
        u0, hu = units[p], units[p + 1] - units[p]
        if nb:
            gather_units(b_ih, gates, u0, b_ih_p[p, : gates * hu])
            gather_units(b_hh, gates, u0, b_hh_p[p, : gates * hu])
        copy_unit_columns(w_peep, u0, hu, peep_p[p])
    return b_ih_p, b_hh_p, peep_p, np.empty((parts, gates * wide), w_peep.dtype)


@jit
def copy_unit_columns(w, u0, hu, out):
    """out[q, :hu] = w[q, u0:u0+hu] for every row q of w (P, H): a part's peephole weights."""
    for q in range(w.shape[0]):
        copy_units(w[q, u0:], out[q], 0, hu)


# Unit-split streaming steps (fastseq._threads.stream_parts): a step of a few rows whose
# weights do not fit one core's L2 has its gate units split across threads, so each core
# reads its share of W_ih and W_hh. The parts read a copy of h (``h_in``) because they
# overwrite h.


@jit
def part_step_operands(x, h_in, w_ih, w_hh, b_ih, b_hh, gates, u0, u1, gx, gh, b_ih_c, b_hh_c):
    """The compact operands of units u0..u1-1 (hu of them) for one streaming step, gate-major
    like :func:`gather_units`: gx[:, :G*hu] = x @ W_ih[its rows].T, gh[:, :G*hu] = h_in @
    W_hh[its rows].T, and their biases b_ih_c, b_hh_c[:G*hu]. x (n, C), h_in (n, H);
    gx, gh (n, >= G*hu) out."""
    hd, hu, n = w_hh.shape[1], u1 - u0, x.shape[0]
    for q in range(gates):
        r0 = q * hd + u0
        few_rows_nt(x, w_ih[r0 : r0 + hu], gx[:n, q * hu : (q + 1) * hu])
        few_rows_nt(h_in, w_hh[r0 : r0 + hu], gh[:n, q * hu : (q + 1) * hu])
    gather_units(b_ih, gates, u0, b_ih_c[: gates * hu])
    gather_units(b_hh, gates, u0, b_hh_c[: gates * hu])


@jit
def copy_rows(src, dst):
    """dst[...] = src for two (n, H) arrays (element loop; see :func:`gather_units`)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j]
