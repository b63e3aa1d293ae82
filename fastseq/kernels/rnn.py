"""Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu (G = 1).

Workspace kept for backward: ``gates`` (R, H) holds h' (the activation's output, from which
its derivative is computed) and ``hprev`` (R, H).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.activations import tanh
from fastseq.kernels.common import add_parts, chunk_input_grads


@jit(parallel=True)
def rnn_forward(
    x, w_ih, w_hh, b_ih, b_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, out, out_col, h, gates, hprev, training,
):  # fmt: skip
    """Forward pass of one layer and direction; ``relu`` selects the nonlinearity."""
    hd = h.shape[1]
    zero = h.dtype.type(0)
    for ch in prange(chunk_samples.shape[0] - 1):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        np.dot(x[r0:r1], w_ih.T, out=gates[r0:r1])
        gh = np.empty((chunk_samples[ch + 1] - s0, hd), h.dtype)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            np.dot(h[s0 : s0 + n], w_hh.T, out=gh[:n])
            for i in range(n):
                k = s0 + i
                t = lengths[k] - 1 - s if reverse else s
                r = r0 + offsets[ch, t] + i
                if training:
                    hprev[r, :] = h[k, :]
                for j in range(hd):
                    a = gates[r, j] + b_ih[j] + gh[i, j] + b_hh[j]
                    if relu:
                        y = a if a > zero else zero
                    else:
                        y = tanh(a)
                    h[k, j] = y
                    out[r, out_col + j] = y
                    gates[r, j] = y


@jit(parallel=True)
def rnn_backward(
    x, w_ih, w_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths, reverse,
    dout, out_col, dh, gates, hprev, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace)."""
    hd = dh.shape[1]
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    n_chunks = chunk_samples.shape[0] - 1
    part_w_ih = np.empty((n_chunks,) + w_ih.shape, dh.dtype)
    part_w_hh = np.empty((n_chunks,) + w_hh.shape, dh.dtype)
    part_b = np.empty((n_chunks, hd), dh.dtype)
    for ch in prange(n_chunks):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        dg = np.empty((chunk_samples[ch + 1] - s0, hd), dh.dtype)
        for s in range(lengths[s0] - 1, -1, -1):
            n = batch_sizes[ch, s]
            for i in range(n):
                k = s0 + i
                t = lengths[k] - 1 - s if reverse else s
                r = r0 + offsets[ch, t] + i
                for j in range(hd):
                    y = gates[r, j]
                    grad = dh[k, j] + dout[r, out_col + j]
                    if relu:
                        da = grad if y > zero else zero
                    else:
                        da = grad * (one - y * y)
                    gates[r, j] = da
                    dg[i, j] = da
            np.dot(dg[:n], w_hh, out=dh[s0 : s0 + n])
        chunk_input_grads(gates[r0:r1], x[r0:r1], hprev[r0:r1], w_ih, dx[r0:r1], accumulate_dx,
                          part_w_ih[ch], part_w_hh[ch], part_b[ch])  # fmt: skip
    add_parts(part_w_ih, dw_ih)
    add_parts(part_w_hh, dw_hh)
    add_parts(part_b, db_ih)
    add_parts(part_b, db_hh)
