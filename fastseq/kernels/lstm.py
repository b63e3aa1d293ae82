"""LSTM, torch's gate order i, f, g, o (G = 4), optionally with peepholes::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi [+ p_i * c])
    f = sigmoid(W_if x + b_if + W_hf h + b_hf [+ p_f * c])
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)
    c' = f * c + i * g
    o = sigmoid(W_io x + b_io + W_ho h + b_ho [+ p_o * c'])
    h' = o * tanh(c')

Peepholes (Gers & Schmidhuber, oneDNN's formulation): ``w_peep`` (3, H), rows i, f, o.

Extra arguments: ``c`` (N, H) in/out, the cell state like ``h``. Workspace kept for
backward: ``gates`` (R, 4H) the activations i, f, g, o; ``cnew`` (R, H) c';
``cprev`` (R, H) c; ``hprev`` (R, H) h.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.activations import sigmoid, tanh
from fastseq.kernels.common import add_column_sums, input_and_weight_grads


@jit(parallel=True)
def lstm_forward(
    x, w_ih, w_hh, b_ih, b_hh, w_peep, peephole, batch_sizes, offsets, lengths, reverse,
    out, out_col, h, c, gates, hprev, cprev, cnew, training,
):  # fmt: skip
    """Forward pass of one layer and direction."""
    n_steps = batch_sizes.shape[0]
    hd = h.shape[1]
    gh = np.empty((h.shape[0], 4 * hd), h.dtype)
    np.dot(x, w_ih.T, out=gates)
    for s in range(n_steps):
        n = batch_sizes[s]
        np.dot(h[:n], w_hh.T, out=gh[:n])
        for i in prange(n):
            t = lengths[i] - 1 - s if reverse else s
            r = offsets[t] + i
            if training:
                hprev[r, :] = h[i, :]
                cprev[r, :] = c[i, :]
            for j in range(hd):
                c0 = c[i, j]
                ai = gates[r, j] + b_ih[j] + gh[i, j] + b_hh[j]
                af = gates[r, hd + j] + b_ih[hd + j] + gh[i, hd + j] + b_hh[hd + j]
                ag = gates[r, 2 * hd + j] + b_ih[2 * hd + j] + gh[i, 2 * hd + j] + b_hh[2 * hd + j]
                ao = gates[r, 3 * hd + j] + b_ih[3 * hd + j] + gh[i, 3 * hd + j] + b_hh[3 * hd + j]
                if peephole:
                    ai += w_peep[0, j] * c0
                    af += w_peep[1, j] * c0
                ig = sigmoid(ai)
                fg = sigmoid(af)
                gg = tanh(ag)
                c1 = fg * c0 + ig * gg
                if peephole:
                    ao += w_peep[2, j] * c1
                og = sigmoid(ao)
                h1 = og * tanh(c1)
                c[i, j] = c1
                h[i, j] = h1
                out[r, out_col + j] = h1
                gates[r, j] = ig
                gates[r, hd + j] = fg
                gates[r, 2 * hd + j] = gg
                gates[r, 3 * hd + j] = og
                if training:
                    cnew[r, j] = c1


@jit(parallel=True)
def lstm_backward(
    x, w_ih, w_hh, w_peep, peephole, batch_sizes, offsets, lengths, reverse, dout,
    out_col, dh, dc, gates, hprev, cprev, cnew, dx, accumulate_dx, dw_ih, dw_hh, db_ih,
    db_hh, dw_peep,
):  # fmt: skip
    """Backward pass of one layer and direction; ``dc`` (N, H) in/out like ``dh``.

    ``dw_peep`` (3, H) += the peephole gradients (when ``peephole``).
    """
    n_steps = batch_sizes.shape[0]
    hd = dh.shape[1]
    one = dh.dtype.type(1)
    dg = np.empty((dh.shape[0], 4 * hd), dh.dtype)
    for s in range(n_steps - 1, -1, -1):
        n = batch_sizes[s]
        for i in prange(n):
            t = lengths[i] - 1 - s if reverse else s
            r = offsets[t] + i
            for j in range(hd):
                ig = gates[r, j]
                fg = gates[r, hd + j]
                gg = gates[r, 2 * hd + j]
                og = gates[r, 3 * hd + j]
                c1 = cnew[r, j]
                tc = tanh(c1)
                grad_h = dh[i, j] + dout[r, out_col + j]
                dao = grad_h * tc * og * (one - og)
                grad_c = dc[i, j] + grad_h * og * (one - tc * tc)
                if peephole:
                    grad_c += dao * w_peep[2, j]
                dai = grad_c * gg * ig * (one - ig)
                daf = grad_c * cprev[r, j] * fg * (one - fg)
                dag = grad_c * ig * (one - gg * gg)
                grad_c0 = grad_c * fg
                if peephole:
                    grad_c0 += dai * w_peep[0, j] + daf * w_peep[1, j]
                dc[i, j] = grad_c0
                gates[r, j] = dai
                gates[r, hd + j] = daf
                gates[r, 2 * hd + j] = dag
                gates[r, 3 * hd + j] = dao
                dg[i, j] = dai
                dg[i, hd + j] = daf
                dg[i, 2 * hd + j] = dag
                dg[i, 3 * hd + j] = dao
        np.dot(dg[:n], w_hh, out=dh[:n])
    input_and_weight_grads(gates, x, hprev, w_ih, dx, accumulate_dx, dw_ih, dw_hh)
    add_column_sums(gates, db_ih)
    add_column_sums(gates, db_hh)
    if peephole:
        for r in range(gates.shape[0]):
            for j in range(hd):
                dw_peep[0, j] += gates[r, j] * cprev[r, j]
                dw_peep[1, j] += gates[r, hd + j] * cprev[r, j]
                dw_peep[2, j] += gates[r, 3 * hd + j] * cnew[r, j]
