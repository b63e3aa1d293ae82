"""Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu (G = 1).

Workspace kept for backward: ``gates`` (R, H) holds h' (the activation's output, from which
its derivative is computed) and ``hprev`` (R, H).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.activations import tanh
from fastseq.kernels.common import add_column_sums, input_and_weight_grads

TANH = 0
RELU = 1


@jit(parallel=True)
def rnn_forward(
    x, w_ih, w_hh, b_ih, b_hh, relu, batch_sizes, offsets, lengths, reverse,
    out, out_col, h, gates, hprev, training,
):  # fmt: skip
    """Forward pass of one layer and direction; ``relu`` selects the nonlinearity."""
    n_steps = batch_sizes.shape[0]
    hidden = h.shape[1]
    zero = h.dtype.type(0)
    gh = np.empty((h.shape[0], hidden), h.dtype)
    np.dot(x, w_ih.T, out=gates)
    for s in range(n_steps):
        n = batch_sizes[s]
        np.dot(h[:n], w_hh.T, out=gh[:n])
        for i in prange(n):
            t = lengths[i] - 1 - s if reverse else s
            r = offsets[t] + i
            if training:
                hprev[r, :] = h[i, :]
            for j in range(hidden):
                a = gates[r, j] + b_ih[j] + gh[i, j] + b_hh[j]
                if relu:
                    y = a if a > zero else zero
                else:
                    y = tanh(a)
                h[i, j] = y
                out[r, out_col + j] = y
                gates[r, j] = y


@jit(parallel=True)
def rnn_backward(
    x, w_ih, w_hh, relu, batch_sizes, offsets, lengths, reverse, dout, out_col, dh,
    gates, hprev, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace)."""
    n_steps = batch_sizes.shape[0]
    hidden = dh.shape[1]
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    dg = np.empty((dh.shape[0], hidden), dh.dtype)
    for s in range(n_steps - 1, -1, -1):
        n = batch_sizes[s]
        for i in prange(n):
            t = lengths[i] - 1 - s if reverse else s
            r = offsets[t] + i
            for j in range(hidden):
                y = gates[r, j]
                grad = dh[i, j] + dout[r, out_col + j]
                if relu:
                    da = grad if y > zero else zero
                else:
                    da = grad * (one - y * y)
                gates[r, j] = da
                dg[i, j] = da
        np.dot(dg[:n], w_hh, out=dh[:n])
    input_and_weight_grads(gates, x, hprev, w_ih, dx, accumulate_dx, dw_ih, dw_hh)
    add_column_sums(gates, db_ih)
    add_column_sums(gates, db_hh)
