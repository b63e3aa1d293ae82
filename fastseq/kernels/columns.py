"""Inference in the transposed layout, for small hidden sizes (RNN and LSTM).

Each chunk keeps its state as (H, nc) arrays, a sample per column, and computes a step as
one product G^T (G*H, n) = [W_ih | W_hh] @ [x rows; h] (C+H, n), so that the gate math runs
along rows of n samples (``rnn.rnn_columns_forward``, ``lstm.lstm_columns_forward``)
instead of along each sample's H units, where every row pays a loop start and run-time
overlap checks. ``fastseq._engine.runs_in_columns`` decides where it pays.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.common import copy_units, output_row, packed_row, zero_padding
from fastseq.kernels.gemm import gemm_packed, panel_width
from fastseq.kernels.lstm import lstm_columns_forward
from fastseq.kernels.rnn import rnn_columns_forward


@jit
def pack_step_columns(x, x_src, hT, n, panels):
    """Panels (P, C+H, NR) of a step's operand B = [x rows; state] (C+H, n) for the
    transposed step product G^T = [W_ih | W_hh] @ B (``gemm.gemm_packed``): column i holds
    x[x_src[i]] (C,) then hT[:, i]. x (R, C) in; x_src (>= n,) int64: x's row of each of
    the step's samples; hT (H, >= n) in: the state, a sample per column. Panel columns at
    n and beyond keep what they held (the product's columns there are not written)."""
    c, hd, nr = x.shape[1], hT.shape[0], panels.shape[2]
    for p in range((n + nr - 1) // nr):
        c0 = p * nr
        w = min(nr, n - c0)
        for q in range(w):
            src = x[x_src[c0 + q]]
            for k in range(c):
                panels[p, k, q] = src[k]
        for k in range(hd):
            src, dst = hT[k, c0:], panels[p, c + k]
            for q in range(w):
                dst[q] = src[q]


@jit(parallel=True)
def forward_columns(
    x, w_ih, w_hh, b_ih, b_hh, w_peep, lstm, flag, chunk_rows, chunk_samples, batch_sizes,
    offsets, lengths, reverse, out, out_col, out_rows, h, c, x_rows,
):  # fmt: skip
    """Inference forward of one layer and direction in the transposed layout. ``lstm``: the
    LSTM (G = 4, ``flag`` = peephole; ``c`` (N, H) in/out its cell state), else the RNN
    (G = 1, ``flag`` = relu; ``c`` unread). Other arguments as in ``lstm.lstm_forward`` (no
    workspace, no recurrent dropout)."""
    hd, cin = h.shape[1], x.shape[1]
    rows_g = w_ih.shape[0]
    w_cat = np.empty((rows_g, cin + hd), h.dtype)
    bias = np.empty(rows_g, h.dtype)
    for u in range(rows_g):
        copy_units(w_ih[u], w_cat[u], 0, cin)
        for k in range(hd):
            w_cat[u, cin + k] = w_hh[u, k]
        bias[u] = b_ih[u] + b_hh[u]
    nr = panel_width(w_cat)
    for ch in prange(chunk_samples.shape[0] - 1):
        r0, s0 = chunk_rows[ch], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        zero_padding(out, out_col, hd, out_rows, lengths, r0, s0, nc)
        panels = np.zeros(((nc + nr - 1) // nr, cin + hd, nr), h.dtype)
        g_flat = np.empty(rows_g * nc, h.dtype)
        hT, cT = np.empty((hd, nc), h.dtype), np.empty((hd if lstm else 0, nc), h.dtype)
        for i in range(nc):
            for j in range(hd):
                hT[j, i] = h[s0 + i, j]
                if lstm:
                    cT[j, i] = c[s0 + i, j]
        rows, x_src = np.empty(nc, np.int64), np.empty(nc, np.int64)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            for i in range(n):
                rows[i] = r = packed_row(r0, offsets[ch], lengths[s0 + i], i, s, reverse)
                x_src[i] = x_rows[r] if x_rows.shape[0] else r
            pack_step_columns(x, x_src, hT, n, panels)
            g = g_flat[: rows_g * n].reshape((rows_g, n))
            gemm_packed(w_cat, panels[: (n + nr - 1) // nr], g, False)
            if lstm:
                lstm_columns_forward(g, bias, w_peep, flag, cT, hT, n)
            else:
                rnn_columns_forward(g, bias, flag, hT, n)
            for i in range(n):
                dst = out[output_row(out_rows, rows[i]), out_col:]
                for j in range(hd):
                    dst[j] = hT[j, i]
        for i in range(nc):
            for j in range(hd):
                h[s0 + i, j] = hT[j, i]
                if lstm:
                    c[s0 + i, j] = cT[j, i]
