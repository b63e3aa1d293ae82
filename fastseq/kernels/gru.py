"""GRU, torch's gate order r, z, n (G = 3)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))        reset_after=True (torch, default)
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)        reset_after=False (Cho et al. 2014)
    h' = (1 - z) * n + z * h

reset_after=False needs the reset gate before the hidden GEMM of n, so each step runs two
GEMMs: h @ W_h[r,z]^T, then (r*h) @ W_hn^T.

Workspace kept for backward: ``gates`` (R, 3H) the activations r, z, n; ``hn`` (R, H) the
term the reset gate multiplies (reset_after: W_hn h + b_hn; otherwise r*h);
``hprev`` (R, H).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.activations import sigmoid, tanh
from fastseq.kernels.common import add_column_sums, input_and_weight_grads


@jit(parallel=True)
def gru_forward(
    x, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, offsets, lengths, reverse,
    out, out_col, h, gates, hprev, hn, training,
):  # fmt: skip
    """Forward pass of one layer and direction."""
    n_steps = batch_sizes.shape[0]
    hd = h.shape[1]
    batch = h.shape[0]
    gh = np.empty((batch, 3 * hd), h.dtype)
    rh = np.empty((batch, hd), h.dtype)
    ghn = np.empty((batch, hd), h.dtype)
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    grz = np.empty((batch, 2 * hd), h.dtype)
    np.dot(x, w_ih.T, out=gates)
    for s in range(n_steps):
        n = batch_sizes[s]
        if reset_after:
            np.dot(h[:n], w_hh.T, out=gh[:n])
            for i in prange(n):
                t = lengths[i] - 1 - s if reverse else s
                r = offsets[t] + i
                if training:
                    hprev[r, :] = h[i, :]
                for j in range(hd):
                    rg = sigmoid(gates[r, j] + b_ih[j] + gh[i, j] + b_hh[j])
                    zg = sigmoid(gates[r, hd + j] + b_ih[hd + j] + gh[i, hd + j] + b_hh[hd + j])
                    hterm = gh[i, 2 * hd + j] + b_hh[2 * hd + j]
                    ng = tanh(gates[r, 2 * hd + j] + b_ih[2 * hd + j] + rg * hterm)
                    h1 = ng + zg * (h[i, j] - ng)
                    h[i, j] = h1
                    out[r, out_col + j] = h1
                    gates[r, j] = rg
                    gates[r, hd + j] = zg
                    gates[r, 2 * hd + j] = ng
                    if training:
                        hn[r, j] = hterm
        else:
            np.dot(h[:n], w_hrz.T, out=grz[:n])
            for i in prange(n):
                t = lengths[i] - 1 - s if reverse else s
                r = offsets[t] + i
                if training:
                    hprev[r, :] = h[i, :]
                for j in range(hd):
                    rg = sigmoid(gates[r, j] + b_ih[j] + grz[i, j] + b_hh[j])
                    zg = sigmoid(gates[r, hd + j] + b_ih[hd + j] + grz[i, hd + j] + b_hh[hd + j])
                    gates[r, j] = rg
                    gates[r, hd + j] = zg
                    rh[i, j] = rg * h[i, j]
                    if training:
                        hn[r, j] = rh[i, j]
            np.dot(rh[:n], w_hn.T, out=ghn[:n])
            for i in prange(n):
                t = lengths[i] - 1 - s if reverse else s
                r = offsets[t] + i
                for j in range(hd):
                    ng = tanh(gates[r, 2 * hd + j] + b_ih[2 * hd + j] + ghn[i, j] + b_hh[2 * hd + j])
                    h1 = ng + gates[r, hd + j] * (h[i, j] - ng)
                    h[i, j] = h1
                    out[r, out_col + j] = h1
                    gates[r, 2 * hd + j] = ng


@jit(parallel=True)
def gru_backward(
    x, w_ih, w_hh, reset_after, batch_sizes, offsets, lengths, reverse, dout, out_col,
    dh, gates, hprev, hn, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace)."""
    n_steps = batch_sizes.shape[0]
    hd = dh.shape[1]
    batch = dh.shape[0]
    one = dh.dtype.type(1)
    dg = np.empty((batch, 3 * hd), dh.dtype)
    dgrz = np.empty((batch, 2 * hd), dh.dtype)
    dn = np.empty((batch, hd), dh.dtype)
    drh = np.empty((batch, hd), dh.dtype)
    dh_direct = np.empty((batch, hd), dh.dtype)
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    for s in range(n_steps - 1, -1, -1):
        n = batch_sizes[s]
        for i in prange(n):
            t = lengths[i] - 1 - s if reverse else s
            r = offsets[t] + i
            for j in range(hd):
                rg = gates[r, j]
                zg = gates[r, hd + j]
                ng = gates[r, 2 * hd + j]
                grad_h = dh[i, j] + dout[r, out_col + j]
                dan = grad_h * (one - zg) * (one - ng * ng)
                daz = grad_h * (hprev[r, j] - ng) * zg * (one - zg)
                dh_direct[i, j] = grad_h * zg
                gates[r, hd + j] = daz
                gates[r, 2 * hd + j] = dan
                if reset_after:
                    dar = dan * hn[r, j] * rg * (one - rg)
                    gates[r, j] = dar
                    dg[i, j] = dar
                    dg[i, hd + j] = daz
                    dg[i, 2 * hd + j] = dan * rg
                    hn[r, j] = dan * rg
                else:
                    dn[i, j] = dan
        if reset_after:
            np.dot(dg[:n], w_hh, out=dh[:n])
        else:
            np.dot(dn[:n], w_hn, out=drh[:n])
            for i in prange(n):
                t = lengths[i] - 1 - s if reverse else s
                r = offsets[t] + i
                for j in range(hd):
                    rg = gates[r, j]
                    dar = drh[i, j] * hprev[r, j] * rg * (one - rg)
                    dh_direct[i, j] += drh[i, j] * rg
                    gates[r, j] = dar
                    dgrz[i, j] = dar
                    dgrz[i, hd + j] = gates[r, hd + j]
            np.dot(dgrz[:n], w_hrz, out=dh[:n])
        dh[:n] += dh_direct[:n]
    # Gradients of the input GEMM; the recurrent block is fixed up below because the
    # n rows of W_hh see a different gradient (reset_after) or input (r*h).
    dw_full = np.zeros((3 * hd, hd), dh.dtype)
    input_and_weight_grads(gates, x, hprev, w_ih, dx, accumulate_dx, dw_ih, dw_full)
    add_column_sums(gates, db_ih)
    dw_hh[: 2 * hd] += dw_full[: 2 * hd]
    if reset_after:
        dw_hh[2 * hd :] += np.dot(hn.T, hprev)
        add_column_sums(gates[:, : 2 * hd], db_hh[: 2 * hd])
        add_column_sums(hn, db_hh[2 * hd :])
    else:
        dw_hh[2 * hd :] += np.dot(gates.T, hn)[2 * hd :]
        add_column_sums(gates, db_hh)
