"""The packed-panel GEMM (fastseq.kernels.gemm) against NumPy in float64."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba.extending import overload

from fastseq.kernels.columns import transpose_rows
from fastseq.kernels.common import (
    CHUNK_PANEL_STEPS,
    DIRECT_PROJECTION_ROWS,
    ONE_ROW_DIRECT_BYTES,
    ONE_ROW_PANEL_STEPS,
    ONE_ROW_SHALLOW_DEPTH,
    ONE_ROW_SHALLOW_STEPS,
    PACKING_BLOCK_BYTES,
    SPREAD_STEP_BYTES,
    WEIGHT_GRAD_ROWS,
    add_weight_grad,
    add_weight_grads,
    project_all,
    project_packing,
    step_panels,
)
from fastseq.kernels.gemm import (
    ALIAS_STRIDE_BYTES,
    FEW_ROWS_SPLIT_K,
    K_BLOCK_PACKED,
    MR,
    PACK_A_COLUMNS,
    PREFETCH_MIN_K,
    few_rows_nt,
    gemm,
    gemm_packed,
    gemm_pair,
    pack,
    pack_transposed,
    pack_transposed_parallel,
    panel_width,
    step_product,
)
from fastseq.kernels.refs import any_layout
from tests.tolerances import assert_close

# (rows, K, columns): single elements, tile edges in every direction (MR rows, one and two
# panels of columns), K across the K blocks, and the recurrent and weight-gradient shapes.
# The transposed views below are copied into tiles (gemm_packed) from PACK_A_COLUMNS
# columns on: (32, 256, 1024), (21, 70, 512) and (5, 4100, 515), with partial tiles and
# panels, the last with K across two K_BLOCK_PACKED passes (where PACK_A_COLUMNS is 192,
# off AMD's CPUs, also (29, 100, 333), (2, 64, 300), (10, 70, 200) and (14, 300, 200); the
# narrower ones read a in place either way); and at any width when their
# column stride is a multiple of ALIAS_STRIDE_BYTES: (1024, 40, 70). Rows left after the
# full tiles run on few_rows per group of panels, split in two from FEW_ROWS_SPLIT_K deep:
# (14, 300, 200), (13, 256, 130);
# MR + 1 to MR + 3 rows, and 3 more after MR + MR/2, on a tall tile: (MR + 1, 64, 33), (10,
# 70, 200), (19, 40, 130), (14, 300, 200), (21, 70, 512). From PREFETCH_MIN_K deep the full
# tiles prefetch their panels (far_tiles): (17, 1024, 40), (300, 600, 70) (two row blocks,
# the second ending in few_rows), (5, 4100, 515) (copied tiles, a partial tile), and so do
# the tall tiles: MR + 1 rows in (17, 1024, 40), MR + 2 in (10, 600, 40), MR + 3 in (19,
# 600, 130).
SHAPES = [(1, 1, 1), (3, 5, 7), (MR, 64, 32), (MR + 1, 64, 33), (29, 100, 333), (32, 256, 1024),
          (17, 1024, 40), (5, 1100, 41), (12, 64, 3), (300, 600, 70), (21, 70, 512),
          (5, 4100, 515), (2, 64, 300), (10, 70, 200), (4, 33, 100), (19, 40, 130),
          (14, 300, 200), (13, 256, 130), (1024, 40, 70), (10, 600, 40), (19, 600, 130)]  # fmt: skip


def _operands(shape, dtype, rng):
    n, k, m = shape
    a = rng.standard_normal((n, k)).astype(dtype)
    w = rng.standard_normal((m, k)).astype(dtype)
    return a, w, a.astype(np.float64) @ w.T.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_matches_numpy(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    a, w, expected = _operands(shape, dtype, rng)
    packed = np.full(expected.shape, np.nan, dtype)
    gemm_packed(a, pack_transposed(w), packed, False)
    assert_close(packed, expected, dtype, "a @ w.T, packed panels")
    # accumulate into a strided out: gemm_packed writes inside it only
    wide = np.full((shape[0], shape[2] + 5), 7.0, dtype)
    out = wide[:, 2 : 2 + shape[2]]
    out[:] = 1
    gemm_packed(a, pack_transposed(w), out, True)
    assert_close(out, expected + 1, dtype, "1 + a @ w.T, packed panels")
    assert np.all(wide[:, :2] == 7) and np.all(wide[:, 2 + shape[2] :] == 7), "wrote outside out"
    # the chunk-level gemm (BLAS or packed here), a transposed view, accumulating
    assert PACK_A_COLUMNS <= 512 and K_BLOCK_PACKED < 4100 and ALIAS_STRIDE_BYTES == 4096
    assert PREFETCH_MIN_K <= 600
    b = np.ascontiguousarray(w.T)
    out = np.ones(expected.shape, dtype)
    gemm(np.ascontiguousarray(a.T).T, b, out, True)
    assert_close(out, expected + 1, dtype, "1 + a @ b")
    out = np.full(expected.shape, np.nan, dtype)
    gemm(a, b, out, False)
    assert_close(out, expected, dtype, "a @ b")
    # panels of b itself (the per-step dG @ W_hh; gemm's path with AVX-512)
    out = np.full(expected.shape, np.nan, dtype)
    gemm_packed(np.ascontiguousarray(a.T).T, pack(b), out, False)
    assert_close(out, expected, dtype, "a @ b, panels of b")
    # the streaming step's product, computed here (any row count) and as it dispatches
    out = np.full(expected.shape, np.nan, dtype)
    few_rows_nt(a, w, out)
    assert_close(out, expected, dtype, "a @ w.T, few rows")
    for gates in (1, 2) if w.shape[0] % 2 == 0 else (1,):  # w as one or two gate blocks
        out = np.full(expected.shape, np.nan, dtype)
        step_product(a, w, out, gates)
        assert_close(out, expected, dtype, f"a @ w.T, streaming step, {gates} gate block(s)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape", [(1, 3, 2, 5), (50, 2 * WEIGHT_GRAD_ROWS + MR + 3, 40, 17), (K_BLOCK_PACKED + 7, 20, 9, 33)]
)
def test_weight_gradients_over_all_rows(shape, dtype):
    """dW += dG^T @ x and dW2 += dG^T @ h, both from one copy of dG's tiles (several pieces
    of rows of dW; rows of dG across two K_BLOCK_PACKED passes), and the one-product form
    (dG read in place), with the column sums of dG."""
    rows, m, k, k2 = shape
    rng = np.random.default_rng(rows + m)
    dg, b, b2 = (rng.standard_normal((rows, n)).astype(dtype) for n in (m, k, k2))
    dw, dw2 = np.ones((m, k), dtype), np.ones((m, k2), dtype)
    sums = np.full(m, np.nan, dtype)
    add_weight_grads(dg, b, dw, b2, dw2, sums)
    wide = dg.astype(np.float64)
    assert_close(dw, 1 + wide.T @ b, dtype, "1 + dG^T @ b (two products)")
    assert_close(dw2, 1 + wide.T @ b2, dtype, "1 + dG^T @ b2 (two products)")
    assert_close(sums, wide.sum(axis=0), dtype, "column sums of dG")
    one = np.ones((m, k2), dtype)
    add_weight_grad(dg, b2, one, sums[:0])
    assert_close(one, 1 + wide.T @ b2, dtype, "1 + dG^T @ b2 (one product)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(600, 20, 512, 515), (K_BLOCK_PACKED + 5, 9, 520, 512), (700, 11, 512, 40), (300, 1024, 40, 70)],
)
def test_gemm_pair_matches_two_products(shape, dtype):
    """a @ b and a @ b2 for a transposed a (dG^T of a chunk's weight gradients): one copy of
    a's tiles for both when both are wide (the first two shapes; the second across two
    K_BLOCK_PACKED passes) or a's column stride is a multiple of ALIAS_STRIDE_BYTES (the
    last), two products otherwise; bitwise the same as two gemm calls."""
    rows, n, m, m2 = shape
    rng = np.random.default_rng(rows)
    dg, b, b2 = (rng.standard_normal((rows, c)).astype(dtype) for c in (n, m, m2))
    out, out2 = np.full((n, m), np.nan, dtype), np.full((n, m2), np.nan, dtype)
    gemm_pair(dg.T, b, b2, out, out2)
    wide = dg.T.astype(np.float64)
    assert_close(out, wide @ b, dtype, "dG^T @ b (pair)")
    assert_close(out2, wide @ b2, dtype, "dG^T @ b2 (pair)")
    for operand, result in ((b, out), (b2, out2)):
        alone = np.empty_like(result)
        gemm(dg.T, operand, alone, False)
        np.testing.assert_array_equal(result, alone)


def test_gemm_propagates_nan():
    a = np.ones((3, 4), np.float32)
    a[1, 2] = np.nan
    out = np.zeros((3, 5), np.float32)
    gemm(a, np.ones((4, 5), np.float32), out, False)
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2]]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (70, 33), (64, 256), (1000, 70), (40, 300)])
def test_parallel_packing_matches_serial(shape, dtype):
    """The weights' panels packed across threads (kernel top level; on the calling thread up
    to SERIAL_PACK_BYTES: (1, 1), (70, 33)) equal the serial ones, zero padding included,
    for row-major w and its transposed view (packed by rows of B, PACK_BLOCK_ROWS a thread's
    block: (40, 300) has a partial block and a partial panel)."""
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    for view in (w, np.ascontiguousarray(w.T).T):
        serial = pack_transposed(view)
        parallel = pack_transposed_parallel(view)
        assert parallel.shape == serial.shape and np.array_equal(parallel, serial)
        nr = serial.shape[2]
        assert np.array_equal(serial.transpose(1, 0, 2).reshape(shape[1], -1)[:, : shape[0]], view.T)
        assert not serial.transpose(1, 0, 2).reshape(shape[1], -1)[:, shape[0] :].any(), "padding not zero"
        assert serial.shape[0] == -(-shape[0] // nr)


def _layout(a):
    """The numba layout of ``a`` inside a jitted function (see the overload below)."""


@overload(_layout)
def _layout_overload(a):
    layout = a.layout
    return lambda a: layout


@numba.njit
def _any_layout_and_panels(w):
    view = any_layout(w)
    return view, _layout(w), _layout(view), pack_transposed_parallel(view)


@pytest.mark.parametrize("shape", [(70, 33), (40, 300)])
def test_any_layout_packs_as_the_given_layout(shape):
    """``refs.any_layout`` gives the same array (data, strides) typed with layout 'A', for
    a matrix and its transposed view, and their panels are those of the given layout (the
    kernels pass W and W^T so: one compiled packing for both)."""
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    for view, layout in ((w, "C"), (np.ascontiguousarray(w.T).T, "F")):
        same, given, retyped, panels = _any_layout_and_panels(view)
        assert (given, retyped) == (layout, "A")
        assert same.ctypes.data == view.ctypes.data and same.strides == view.strides
        assert np.array_equal(panels, pack_transposed(view))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape", [(1, 5, 3), (20, 32, 100), (33, 300, 1000), (100, 1024, 97), (256, 64, 4096)]
)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_projection_packed_a_block_at_a_time(shape, dtype, parts):
    """x (n, C) @ w.T for w (M, C), w's panels split across ``parts`` threads and packed
    PACKING_BLOCK_BYTES at a time (common.project_packing, and project_all, which calls it
    from DIRECT_PROJECTION_ROWS + 1 rows but on BLAS with AVX2): one block or several per thread
    (C = 64 to 1024 deep: 2-32 panels a block), a last panel partly padded (M = 1000, 97,
    3), a thread without panels (M = 3 in one panel, 2-3 parts), into a wider output's
    rows."""
    n, k, m = shape
    rng = np.random.default_rng(n + k + m)
    x, w = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((m, k)).astype(dtype)
    panel_bytes = k * panel_width(w) * w.itemsize
    assert (m > 100) <= (-(-m // panel_width(w)) > parts * max(1, PACKING_BLOCK_BYTES // panel_bytes))
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    out = np.full((n, m), np.nan, dtype)
    project_packing(x, w, out, parts)
    assert_close(out, expected, dtype, "project_packing")
    out[:] = np.nan
    project_all(x, w, out, parts)  # in place up to DIRECT_PROJECTION_ROWS; BLAS_FOR_LARGE: BLAS
    assert_close(out, expected, dtype, "project_all")
    if n <= DIRECT_PROJECTION_ROWS:  # in place: the same sums on the calling thread or split
        serial = np.full((n, m), np.nan, dtype)
        project_all(x, w, serial, 1)
        np.testing.assert_array_equal(serial, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_tiles_sum_as_full_tiles(dtype):
    """A block's last few rows run on tiles of 2 or 4 panels (gemm.few_rows), per group of
    panels, split in two from FEW_ROWS_SPLIT_K deep, or on a tall last tile (MR + 1 to MR +
    TALL_EXTRA rows): each row is summed exactly as in a full tile, whatever the row count
    or the panels left over (one or two rows: a pair of the 2-3 panels left after groups of
    4 at once)."""
    rng = np.random.default_rng(3)
    half = MR // 2
    counts = (1, 2, 3, half, half + 1, MR - 2, MR - 1, MR + 1, MR + 2, MR + 3, MR + half, MR + half + 1,
              2 * MR - 2, 2 * MR - 1, 2 * MR + 1, 2 * MR + 3, 2 * MR + half + 2)  # fmt: skip
    for k in (37, FEW_ROWS_SPLIT_K + 44):
        a = rng.standard_normal((3 * MR, k)).astype(dtype)
        for m in (150, 64, 7, 96, 50, 200):  # panels left after groups of 4: 0-3, a last one partial
            panels = pack_transposed(rng.standard_normal((m, k)).astype(dtype))
            full = np.empty((3 * MR, m), dtype)
            gemm_packed(a, panels, full, False)
            for n in counts:
                out = np.full((n, m), np.nan, dtype)
                gemm_packed(a[:n], panels, out, False)
                assert np.array_equal(out, full[:n]), f"{n} rows, K = {k}, {m} columns"


def test_gemm_packed_of_no_columns():
    """A product with no columns (no panels) writes nothing, with or without rows left over
    after the full tiles, or with too few rows for a full tile."""
    a = np.ones((2 * MR, FEW_ROWS_SPLIT_K), np.float32)
    panels = pack_transposed(np.ones((0, FEW_ROWS_SPLIT_K), np.float32))
    for n in (2 * MR, 2 * MR - 2, MR // 2):
        out = np.empty((n, 0), np.float32)
        gemm_packed(a[:n], panels, out, False)
        assert out.shape == (n, 0)


def test_step_panels_for_one_row_chunks():
    """Per-step panels: any chunk of several samples; one sample per chunk only for long
    sequences, and not when one chunk hands its products to BLAS on every core; none (W_hh
    read in place) for a forward's short chunks of one or two samples."""
    w = np.ones((16, 64), np.float32)
    big = np.ones((SPREAD_STEP_BYTES // 4 // 64, 64), np.float32)
    long, short = np.array([ONE_ROW_PANEL_STEPS] * 2), np.array([ONE_ROW_PANEL_STEPS - 1] * 2)
    one, two_chunks, one_chunk_of_two = np.array([0, 1]), np.array([0, 1, 2]), np.array([0, 2])
    assert step_panels(w, one_chunk_of_two, short, False).shape[0] > 0
    assert step_panels(w, one, long[:1], False).shape[0] > 0
    assert step_panels(w, two_chunks, long, False).shape[0] > 0
    assert step_panels(w, one, short[:1], False).shape[0] == 0
    assert step_panels(w, two_chunks, short, False).shape[0] == 0
    assert step_panels(big, one, long[:1], False).shape[0] == 0
    assert step_panels(big, two_chunks, long, False).shape[0] > 0
    # a forward's W_hh^T (rows of W_hh contiguous) for chunks of two samples: read in place
    # (panels (1, 0, NR)) below CHUNK_PANEL_STEPS, packed from there; W_hh (backward's dh)
    # is packed whatever the steps
    w_t = np.ones((64, ONE_ROW_SHALLOW_DEPTH + 16), np.float32).T
    below, at = np.array([CHUNK_PANEL_STEPS - 1] * 2), np.array([CHUNK_PANEL_STEPS] * 2)
    assert step_panels(w_t, one_chunk_of_two, below, True).shape[:2] == (1, 0)
    assert step_panels(w_t, np.array([0, 1, 3]), below[[0, 0, 0]], True).shape[:2] == (1, 0)
    assert step_panels(w_t, one_chunk_of_two, at, True).shape[1] == w_t.shape[0]
    assert step_panels(w, one_chunk_of_two, below, False).shape[1] == 16
    assert (
        step_panels(w_t, np.array([0, 3]), below[[0, 0, 0]], True).shape[1] == w_t.shape[0]
    )  # three samples
    # chunks of one sample (W_hh^T deeper than ONE_ROW_SHALLOW_DEPTH): in place below
    # ONE_ROW_DIRECT_BYTES unless one chunk spreads on BLAS; else BLAS as before (empty panels)
    assert step_panels(w_t, two_chunks, below, True).shape[:2] == (1, 0)
    assert step_panels(w_t, one, below[:1], True).shape[:2] == (1, 0)
    assert step_panels(w_t, two_chunks, short, True).shape[0] == 0
    # shallow ones (depth 16) of one or two samples are packed from ONE_ROW_SHALLOW_STEPS
    # steps, in place below; their backward as the deep ones'
    shallow_t = np.ones((64, 16), np.float32).T
    fewer, from_shallow = np.array([ONE_ROW_SHALLOW_STEPS - 1] * 2), np.array([ONE_ROW_SHALLOW_STEPS] * 2)
    assert step_panels(shallow_t, two_chunks, fewer, True).shape[:2] == (1, 0)
    assert step_panels(shallow_t, one_chunk_of_two, fewer, True).shape[:2] == (1, 0)
    assert step_panels(shallow_t, one, from_shallow[:1], True).shape[1] == 16
    assert step_panels(shallow_t, one_chunk_of_two, from_shallow, True).shape[1] == 16
    assert step_panels(shallow_t, two_chunks, below, True).shape[1] == 16
    assert step_panels(shallow_t, two_chunks, short, True).shape[1] == 16
    assert step_panels(np.ones((16, 16), np.float32), two_chunks, short, False).shape[0] == 0
    assert step_panels(np.ascontiguousarray(big.T).T, one, below[:1], True).shape[0] == 0
    huge_t = np.ones((64, ONE_ROW_DIRECT_BYTES // 4 // 64), np.float32).T
    assert step_panels(huge_t, two_chunks, below, True).shape[0] == 0
    # backward (W_hh itself) never reads in place, even where W_hh^T's rows are contiguous
    # too (H = 1)
    assert step_panels(np.ones((4, 1), np.float32), two_chunks, below, False).shape[0] == 0
    assert step_panels(np.ones((4, 1), np.float32), one_chunk_of_two, below, False).shape[1] == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 8, 16, 17, 31, 40])
@pytest.mark.parametrize("cols", [3, 16, 24, 33])
def test_transpose_rows_moves_exactly_its_values(n, cols, dtype):
    """columns.transpose_rows, both ways, against NumPy: full tiles, the masked tiles of the
    rows past them and the columns past them value by value; nothing else is written (rows
    not listed, columns past ``cols``, block entries past n)."""
    rng = np.random.default_rng(n * 100 + cols)
    row_len, b_stride, b0 = cols + 7, n + 5, 3  # rows wider than cols; block columns padded
    n_rows = n + 4
    rows = (rng.permutation(n_rows)[:n] * row_len + 2).astype(np.int64)  # scattered, 2 in
    row_flat = rng.standard_normal(n_rows * row_len + 4).astype(dtype)
    block_flat = rng.standard_normal(b0 + cols * b_stride + 8).astype(dtype)
    values = np.stack([row_flat[r : r + cols] for r in rows])  # (n, cols)
    expected_block = block_flat.copy()
    for c in range(cols):
        expected_block[b0 + c * b_stride : b0 + c * b_stride + n] = values[:, c]
    out_block = block_flat.copy()
    transpose_rows(row_flat, rows, out_block, b0, b_stride, n, cols, False)
    np.testing.assert_array_equal(out_block, expected_block)

    new_values = rng.standard_normal((n, cols)).astype(dtype)
    source = block_flat.copy()
    for c in range(cols):
        source[b0 + c * b_stride : b0 + c * b_stride + n] = new_values[:, c]
    expected_rows = row_flat.copy()
    for i, r in enumerate(rows):
        expected_rows[r : r + cols] = new_values[i]
    out_rows = row_flat.copy()
    transpose_rows(out_rows, rows, source, b0, b_stride, n, cols, True)
    np.testing.assert_array_equal(out_rows, expected_rows)
