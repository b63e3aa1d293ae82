"""The transposed layout, for small hidden sizes (RNN and LSTM), inference and training.

Each chunk keeps its state as (H, nc) arrays, a sample per column, and computes a step as
one product G^T (G*H, n) = [W_ih | W_hh] @ [x rows; h] (C+H, n), so that the gate math runs
along rows of n samples (``rnn.rnn_columns_forward``, ``lstm.lstm_columns_forward``)
instead of along each sample's H units, where every row pays a loop start and run-time
overlap checks. ``fastseq._engine.runs_in_columns`` decides where it pays.

Training keeps the workspace transposed too, in flat buffers of one block per step: a
chunk's step s is the block of its packed rows k = r0 + base_s .. k + n - 1 (base_s the
chunk's rows before step s; these are the step's packed rows except in reverse over unequal
lengths), each block C-contiguous::

    gates_t  (R*G*H,)    block (G*H, n) at k*G*H: the activations (LSTM i, f, g, o; RNN h'),
                         the gradients of the pre-activations after backward
    cell_t   (R*H,)      LSTM: block (H, n) at k*H, c' (the cell state after the step);
                         empty for the RNN
    c_init   (N*H,)      LSTM: the initial cell state, block (H, nc) at s0*H per chunk
    xh       (R*P*NR,)   block (P, n, NR) at k*P*NR: the rows [x | h] (C+H,) the step read,
                         as P panels of NR columns, zero-padded: the operand B of the weight
                         gradients [dW_ih | dW_hh] += dG^T @ [x | h]

Backward runs each step's gate gradients along rows too, then [dh^T; dx^T] = [W_hh^T;
W_ih^T] @ dG^T (H+C, n) and the weight gradients += dG^T @ [x | h], one product each.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastseq._jit import jit
from fastseq.kernels.common import add_parts, copy_units, output_row, packed_row, zero_padding
from fastseq.kernels.gemm import ACCUMULATE, OVERWRITE, VECTOR_BYTES, _declare, gemm_packed, panel_width
from fastseq.kernels.lstm import lstm_columns_backward, lstm_columns_forward
from fastseq.kernels.refs import borrow, hold
from fastseq.kernels.rnn import rnn_columns_backward, rnn_columns_forward


def _tile_transpose_intrinsic(into_rows, partial=False):
    """The W x W tile of :func:`transpose_rows` (W values to a vector register: 16 float32
    with AVX-512): W vector loads, log2(W) rounds of W shuffles that swap off-diagonal
    blocks, W vector stores. ``row_flat[rows[r0 + r] + c0 + c]`` (r, c < W) moves to
    ``block_flat[base + c*stride + r]``, or back when ``into_rows``. row_flat, block_flat:
    1-D arrays of one float dtype; rows: int64 (>= r0 + W,); offsets in elements, computed
    here (no offset arrays per call). ``partial``: the tile takes one more argument, k (1
    <= k <= W), and moves rows r < k only, by masked loads and stores (rows needs k entries
    from r0; nothing is read or written for r >= k)."""

    def typing(row_flat, rows, block_flat):
        if not (isinstance(row_flat.dtype, types.Float) and row_flat.dtype == block_flat.dtype):
            return None
        intp = types.intp
        sig = types.void(row_flat, rows, intp, intp, block_flat, intp, intp, *((intp,) if partial else ()))
        return sig, lambda context, builder, signature, args: _tile_transpose_codegen(
            context, builder, signature, args, into_rows, partial
        )

    if partial:

        @intrinsic
        def partial_tile(typingctx, row_flat, rows, r0, c0, block_flat, base, stride, k):
            return typing(row_flat, rows, block_flat)

        return partial_tile

    @intrinsic
    def tile(typingctx, row_flat, rows, r0, c0, block_flat, base, stride):
        return typing(row_flat, rows, block_flat)

    return tile


def _tile_transpose_codegen(context, builder, signature, args, into_rows, partial):
    dtype = signature.args[0].dtype
    width = VECTOR_BYTES // (dtype.bitwidth // 8)
    vty = ir.VectorType(context.get_value_type(dtype), width)
    pty, i1, i32, i64 = ir.PointerType(vty), ir.IntType(1), ir.IntType(32), ir.IntType(64)
    row_p, rows_p, block_p = (
        cgutils.create_struct_proxy(signature.args[k])(context, builder, value=args[k]).data
        for k in (0, 1, 4)
    )
    r0, c0, base, stride = args[2], args[3], args[5], args[6]
    if partial:  # rows r >= k: their entry of ``rows`` is not read (r0's instead), masks off
        k = args[7]
        mty = ir.VectorType(i1, width)
        suffix = f"v{width}f{dtype.bitwidth}"
        masked_load = _declare(builder.module, f"llvm.masked.load.{suffix}.p0", vty, [pty, i32, mty, vty])
        masked_store = _declare(
            builder.module, f"llvm.masked.store.{suffix}.p0", ir.VoidType(), [vty, pty, i32, mty]
        )
        valid = [builder.icmp_signed("<", ir.Constant(i64, r), k) for r in range(width)]
        row_index = [builder.select(valid[r], builder.add(r0, ir.Constant(i64, r)), r0) for r in range(width)]
        lanes = ir.Constant(mty, None)  # lane r of a block column: row r
        for r in range(width):
            lanes = builder.insert_element(lanes, valid[r], ir.Constant(i32, r))
        whole = [builder.select(valid[r], ir.Constant(mty, [1] * width), ir.Constant(mty, [0] * width))
                 for r in range(width)]  # fmt: skip
    else:
        row_index = [builder.add(r0, ir.Constant(i64, r)) for r in range(width)]
    row_offs = [builder.add(builder.load(builder.gep(rows_p, [row_index[r]])), c0) for r in range(width)]
    block_offs = [builder.add(base, builder.mul(stride, ir.Constant(i64, c))) for c in range(width)]
    (src_p, src_offs), (dst_p, dst_offs) = (block_p, block_offs), (row_p, row_offs)
    if not into_rows:
        (src_p, src_offs), (dst_p, dst_offs) = (dst_p, dst_offs), (src_p, src_offs)
    align = dtype.bitwidth // 8

    def load(i):
        ptr = builder.bitcast(builder.gep(src_p, [src_offs[i]]), pty)
        if not partial:
            return builder.load(ptr, align=align)
        mask = lanes if into_rows else whole[i]  # a block column's rows, or row i itself
        return builder.call(masked_load, [ptr, ir.Constant(i32, align), mask, ir.Constant(vty, None)])

    def store(value, j):
        ptr = builder.bitcast(builder.gep(dst_p, [dst_offs[j]]), pty)
        if not partial:
            builder.store(value, ptr, align=align)
            return
        mask = whole[j] if into_rows else lanes  # row j itself, or a block column's rows
        builder.call(masked_store, [value, ptr, ir.Constant(i32, align), mask])

    vectors = [load(i) for i in range(width)]
    block = width // 2
    while block:
        low = [p if not p & block else width + p - block for p in range(width)]
        high = [p + block if not p & block else width + p for p in range(width)]
        for i in range(width):
            if not i & block:
                a, b = vectors[i], vectors[i + block]
                vectors[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, width), low))
                vectors[i + block] = builder.shuffle_vector(
                    a, b, ir.Constant(ir.VectorType(i32, width), high)
                )
        block //= 2
    for c in range(width):
        store(vectors[c], c)
    return context.get_dummy_value()


_tile_into_block = _tile_transpose_intrinsic(False)
_tile_into_rows = _tile_transpose_intrinsic(True)
_partial_tile_into_block = _tile_transpose_intrinsic(False, partial=True)
_partial_tile_into_rows = _tile_transpose_intrinsic(True, partial=True)


@jit
def transpose_rows(row_flat, rows, block_flat, b0, b_stride, n, cols, into_rows):
    """Moves values between n rows and the columns of a block: row r of ``row_flat`` (flat,
    starting at rows[r], ``rows`` (>= n,) int64) holds ``cols`` values, value (r, c) of the
    block is block_flat[b0 + c*b_stride + r]. Into the block (x's or the output gradient's
    rows gathered) or, when ``into_rows``, into the rows (h into the outputs, dx). By tiles
    of W x W (:func:`_tile_transpose_intrinsic`; 2.2x faster than a loop of 16 x 512
    float32 values), the edges value by value. The tiles compute their offsets themselves:
    two offset arrays allocated per call cost RNN inference at N=1024, T=50, H=16 1.06-1.10x
    the time (Intel Xeon, five processes each way; LSTM N=256 1.03x)."""
    width = VECTOR_BYTES // row_flat.itemsize
    full_r, full_c = n - n % width, cols - cols % width
    for r0 in range(0, full_r, width):
        for c0 in range(0, full_c, width):
            base = b0 + c0 * b_stride + r0
            if into_rows:
                _tile_into_rows(row_flat, rows, r0, c0, block_flat, base, b_stride)
            else:
                _tile_into_block(row_flat, rows, r0, c0, block_flat, base, b_stride)
    if full_r < n:  # the rows past the full tiles: partial tiles, masked
        for c0 in range(0, full_c, width):
            base = b0 + c0 * b_stride + full_r
            if into_rows:
                _partial_tile_into_rows(row_flat, rows, full_r, c0, block_flat, base, b_stride, n - full_r)
            else:
                _partial_tile_into_block(row_flat, rows, full_r, c0, block_flat, base, b_stride, n - full_r)
    for r in range(n):  # the columns past the tiles, value by value
        for c in range(full_c, cols):
            if into_rows:
                row_flat[rows[r] + c] = block_flat[b0 + c * b_stride + r]
            else:
                block_flat[b0 + c * b_stride + r] = row_flat[rows[r] + c]


@jit
def pack_step_columns(x, x_src, hT, n, panels):
    """Panels (P, C+H, NR) of a step's operand B = [x rows; state] (C+H, n) for the
    transposed step product G^T = [W_ih | W_hh] @ B (``gemm.gemm_packed``): column i holds
    x[x_src[i]] (C,) then hT[:, i]. x (R, C) in; x_src (>= n,) int64: x's row of each of
    the step's samples; hT (H, >= n) in: the state, a sample per column. Panel columns at
    n and beyond keep what they held (the product's columns there are not written)."""
    c, hd, nr = x.shape[1], hT.shape[0], panels.shape[2]
    x_flat, panels_flat = x.ravel(), panels.ravel()
    x_off = np.empty(n, np.int64)  # x's rows transposed by tiles (transpose_rows)
    for i in range(n):
        x_off[i] = x_src[i] * c
    for p in range((n + nr - 1) // nr):
        c0 = p * nr
        w = min(nr, n - c0)
        transpose_rows(x_flat, x_off[c0:], panels_flat, p * (c + hd) * nr, nr, w, c, False)
        for k in range(hd):
            src, dst = hT[k, c0:], panels[p, c + k]
            for q in range(w):
                dst[q] = src[q]


@jit
def store_step_rows(x, x_src, hT, n, xh):
    """Training: a step's block of the xh buffer, xh (P, n, NR) = the rows [x[x_src[i]] |
    hT[:, i]] of its samples i < n, split into P panels of NR columns, zero past C+H."""
    c, hd, nr = x.shape[1], hT.shape[0], xh.shape[2]
    zero = xh.dtype.type(0)
    hT_flat, xh_flat = hT.ravel(), xh.ravel()
    h_off = np.empty(n, np.int64)
    for p in range(xh.shape[0]):
        f0 = p * nr
        xc = max(0, min(nr, c - f0))  # the panel's columns from x, then from h, then zeros
        hc = max(0, min(nr, c + hd - f0)) - xc
        for i in range(n):
            src, dst = x[x_src[i]], xh[p, i]
            for q in range(xc):
                dst[q] = src[f0 + q]
            for q in range(xc + hc, nr):
                dst[q] = zero
        for i in range(n):  # h's columns, transposed by tiles
            h_off[i] = (p * n + i) * nr + xc
        transpose_rows(xh_flat, h_off, hT_flat, (f0 + xc - c) * hT.shape[1], hT.shape[1], n, hc, True)


@jit
def step_bases(batch_sizes_c, steps):
    """bases (steps + 1,): a chunk's rows before each step (its workspace blocks)."""
    bases = np.empty(steps + 1, np.int64)
    bases[0] = 0
    for s in range(steps):
        bases[s + 1] = bases[s] + batch_sizes_c[s]
    return bases


@jit
def block(flat, k, rows, n):
    """The C-contiguous block (rows, n) of a flat workspace buffer at offset k*rows."""
    return flat[k * rows : (k + n) * rows].reshape((rows, n))


@jit(parallel=True)
def forward_columns(
    x, w_ih, w_hh, b_ih, b_hh, w_peep, lstm, flag, chunk_rows, chunk_samples, batch_sizes,
    offsets, lengths, reverse, out, out_col, out_rows, h, c, x_rows, gates_t, cell_t, c_init, xh,
):  # fmt: skip
    """Forward of one layer and direction in the transposed layout. ``lstm``: the LSTM (G =
    4, ``flag`` = peephole; ``c`` (N, H) in/out its cell state), else the RNN (G = 1, ``flag``
    = relu; ``c`` unread). Training when ``gates_t`` has entries: the workspace (see the
    module docstring) is written; else its buffers are empty. Other arguments as in
    ``lstm.lstm_forward`` (no recurrent dropout)."""
    hd, cin = h.shape[1], x.shape[1]
    rows_g = w_ih.shape[0]
    training = gates_t.shape[0] > 0
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_peep, out, out_rows, h, c, x_rows, gates_t, cell_t, c_init, xh = borrow(
        (x, w_peep, out, out_rows, h, c, x_rows, gates_t, cell_t, c_init, xh)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    owned = (np.empty((rows_g, cin + hd), h.dtype), np.empty(rows_g, h.dtype))  # held to the end
    w_cat, bias = borrow(owned)
    for u in range(rows_g):
        copy_units(w_ih[u], w_cat[u], 0, cin)
        for k in range(hd):
            w_cat[u, cin + k] = w_hh[u, k]
        bias[u] = b_ih[u] + b_hh[u]
    nr = panel_width(w_cat)
    n_xh = (cin + hd + nr - 1) // nr
    for ch in prange(chunk_samples.shape[0] - 1):
        r0, s0 = chunk_rows[ch], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(ch))
        scratch = (  # held to the chunk's end
            np.zeros(((nc + nr - 1) // nr, cin + hd, nr), h.dtype),
            np.empty(0 if training else rows_g * nc, h.dtype),
            np.empty((hd, nc), h.dtype),
            np.empty((hd if lstm else 0, nc), h.dtype),
            np.empty(nc, np.int64),
            np.empty(nc, np.int64),
            np.empty(nc, np.int64),
        )
        panels, g_flat, hT, cT, rows, x_src, out_off = borrow(scratch)
        c0 = block(c_init, s0, cT.shape[0] if training else 0, nc)
        for i in range(nc):
            for j in range(hd):
                hT[j, i] = h[s0 + i, j]
                if lstm:
                    cT[j, i] = c[s0 + i, j]
        for j in range(c0.shape[0]):
            copy_units(cT[j], c0[j], 0, nc)
        out_flat = out.ravel()
        k = r0  # the step's first row of the workspace
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            for i in range(n):
                rows[i] = r = packed_row(r0, offsets[ch], lengths[s0 + i], i, s, reverse)
                x_src[i] = x_rows[r] if x_rows.shape[0] else r
            pack_step_columns(x, x_src, hT, n, panels)
            if training:
                store_step_rows(x, x_src, hT, n, block(xh, k, n_xh * nr, n).reshape((n_xh, n, nr)))
                g = block(gates_t, k, rows_g, n)
            else:
                g = block(g_flat, 0, rows_g, n)
            gemm_packed(w_cat, panels[: (n + nr - 1) // nr], g, OVERWRITE)
            if lstm:
                lstm_columns_forward(g, bias, w_peep, flag, cT, hT, n)
            else:
                rnn_columns_forward(g, bias, flag, hT, n)
            if training:
                kept = block(cell_t, k, hd, n) if lstm else g  # c'; the RNN's h'
                src = cT if lstm else hT
                for j in range(hd):
                    copy_units(src[j], kept[j], 0, n)
            for i in range(n):
                out_off[i] = output_row(out_rows, rows[i]) * out.shape[1] + out_col
            transpose_rows(out_flat, out_off, hT.ravel(), 0, nc, n, hd, True)
            k += n
        for i in range(nc):
            for j in range(hd):
                h[s0 + i, j] = hT[j, i]
                if lstm:
                    c[s0 + i, j] = cT[j, i]
        hold(scratch)
    hold(owned)


@jit(parallel=True)
def backward_columns(
    w_ih, w_hh, w_peep, lstm, flag, chunk_rows, chunk_samples, batch_sizes, offsets, lengths, reverse,
    dout, out_col, dh, dc, gates_t, cell_t, c_init, xh, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
    dw_peep,
):  # fmt: skip
    """Backward of :func:`forward_columns` in training, consuming its workspace (``gates_t``
    is overwritten with the gradients of the pre-activations). ``dh``, ``dc`` (N, H) in/out
    (``dc`` unread for the RNN). Each chunk sums its weight gradients [dW_ih | dW_hh] over
    its steps in reverse order; the chunks' sums are added in chunk order. Other arguments
    as in ``lstm.lstm_backward``."""
    hd, cin, rows_g = dh.shape[1], w_ih.shape[1], w_ih.shape[0]
    n_chunks = chunk_samples.shape[0] - 1
    # the arrays of the time loops, without reference counts (kernels.refs)
    w_peep, dout, dh, dc, gates_t, cell_t, c_init, xh, dx = borrow(
        (w_peep, dout, dh, dc, gates_t, cell_t, c_init, xh, dx)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    w_back = np.empty((hd + cin, rows_g), dh.dtype)  # a of [dh^T; dx^T] = [W_hh^T; W_ih^T] @ dG^T
    for u in range(rows_g):
        for j in range(hd):
            w_back[j, u] = w_hh[u, j]
        for f in range(cin):
            w_back[hd + f, u] = w_ih[u, f]
    nr = panel_width(w_back)
    n_xh = (cin + hd + nr - 1) // nr
    part_b = np.zeros((n_chunks, rows_g), dh.dtype)
    part_cat = np.zeros((n_chunks, rows_g, cin + hd), dh.dtype)
    part_peep = np.zeros((n_chunks, 3, hd), dh.dtype)
    owned = (w_back, part_b, part_cat, part_peep)  # held to the end
    w_back, part_b, part_cat, part_peep = borrow(owned)
    for ch in prange(n_chunks):
        r0, s0 = chunk_rows[ch], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        steps = lengths[s0]
        bases = step_bases(batch_sizes[ch], steps)
        scratch = (  # held to the chunk's end
            np.empty((hd, nc), dh.dtype),
            np.empty((hd, nc), dh.dtype),
            np.empty((hd if lstm else 0, nc), dh.dtype),
            np.zeros(((nc + nr - 1) // nr, rows_g, nr), dh.dtype),
            np.empty((hd + cin) * nc, dh.dtype),
            np.empty(nc, np.int64),
            np.empty(nc, np.int64),
        )
        dhT, doutT, dcT, d_panels, back_flat, rows, row_off = borrow(scratch)
        for i in range(nc):
            for j in range(hd):
                dhT[j, i] = dh[s0 + i, j]
                if lstm:
                    dcT[j, i] = dc[s0 + i, j]
        dout_flat, dx_flat = dout.ravel(), dx.ravel()
        for s in range(steps - 1, -1, -1):
            n = batch_sizes[ch, s]
            k = r0 + bases[s]
            for i in range(n):
                rows[i] = packed_row(r0, offsets[ch], lengths[s0 + i], i, s, reverse)
                row_off[i] = rows[i] * dout.shape[1] + out_col
            transpose_rows(dout_flat, row_off, doutT.ravel(), 0, nc, n, hd, False)
            gt = block(gates_t, k, rows_g, n)
            if lstm:
                cprev = block(cell_t, k - batch_sizes[ch, s - 1], hd, batch_sizes[ch, s - 1]) if s > 0 else (
                    block(c_init, s0, hd, nc))  # fmt: skip
                lstm_columns_backward(gt, block(cell_t, k, hd, n), cprev, dhT, doutT, dcT, w_peep, flag,
                                      part_peep[ch], n)  # fmt: skip
            else:
                rnn_columns_backward(gt, dhT, doutT, flag, n)
            used = (n + nr - 1) // nr
            for p in range(used):
                w = min(nr, n - p * nr)
                for u in range(rows_g):
                    src, dst = gt[u, p * nr : p * nr + w], d_panels[p, u]
                    for q in range(w):
                        dst[q] = src[q]
                    part_b[ch, u] += np.sum(src)
            back = block(back_flat, 0, hd + cin, n)
            gemm_packed(w_back, d_panels[:used], back, OVERWRITE)
            for j in range(hd):
                copy_units(back[j], dhT[j], 0, n)
            if accumulate_dx:
                for i in range(n):
                    dst = dx[rows[i]]
                    for f in range(cin):
                        dst[f] += back[hd + f, i]
            else:
                for i in range(n):
                    row_off[i] = rows[i] * cin
                transpose_rows(dx_flat, row_off, back.ravel(), hd * n, n, n, cin, True)
            xh_s = block(xh, k, n_xh * nr, n).reshape((n_xh, n, nr))
            gemm_packed(gt, xh_s, part_cat[ch], ACCUMULATE)
        for i in range(nc):
            for j in range(hd):
                dh[s0 + i, j] = dhT[j, i]
                if lstm:
                    dc[s0 + i, j] = dcT[j, i]
        hold(scratch)
    for ch in range(n_chunks):  # in chunk order (add_parts), [dW_ih | dW_hh] split
        for u in range(rows_g):  # loops: an array expression here would be a parallel region
            src, dst_ih, dst_hh = part_cat[ch, u], dw_ih[u], dw_hh[u]
            for f in range(cin):
                dst_ih[f] += src[f]
            for f in range(hd):
                dst_hh[f] += src[cin + f]
    add_parts(part_b, db_ih)
    add_parts(part_b, db_hh)
    if lstm and flag:
        add_parts(part_peep, dw_peep)
    hold(owned)
