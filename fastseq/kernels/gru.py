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
from fastseq.kernels.common import add_parts, chunk_input_grads, column_sums


@jit(parallel=True)
def gru_forward(
    x, w_ih, w_hh, b_ih, b_hh, reset_after, chunk_rows, chunk_samples, batch_sizes, offsets,
    lengths, reverse, out, out_col, h, gates, hprev, hn, training,
):  # fmt: skip
    """Forward pass of one layer and direction."""
    hd = h.shape[1]
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    for ch in prange(chunk_samples.shape[0] - 1):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        np.dot(x[r0:r1], w_ih.T, out=gates[r0:r1])
        gh = np.empty((nc, 3 * hd), h.dtype)
        grz = np.empty((nc, 2 * hd), h.dtype)
        rh = np.empty((nc, hd), h.dtype)
        ghn = np.empty((nc, hd), h.dtype)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            if reset_after:
                np.dot(h[s0 : s0 + n], w_hh.T, out=gh[:n])
                for i in range(n):
                    k = s0 + i
                    t = lengths[k] - 1 - s if reverse else s
                    r = r0 + offsets[ch, t] + i
                    if training:
                        hprev[r, :] = h[k, :]
                    for j in range(hd):
                        rg = sigmoid(gates[r, j] + b_ih[j] + gh[i, j] + b_hh[j])
                        zg = sigmoid(gates[r, hd + j] + b_ih[hd + j] + gh[i, hd + j] + b_hh[hd + j])
                        hterm = gh[i, 2 * hd + j] + b_hh[2 * hd + j]
                        ng = tanh(gates[r, 2 * hd + j] + b_ih[2 * hd + j] + rg * hterm)
                        h1 = ng + zg * (h[k, j] - ng)
                        h[k, j] = h1
                        out[r, out_col + j] = h1
                        gates[r, j] = rg
                        gates[r, hd + j] = zg
                        gates[r, 2 * hd + j] = ng
                        if training:
                            hn[r, j] = hterm
            else:
                np.dot(h[s0 : s0 + n], w_hrz.T, out=grz[:n])
                for i in range(n):
                    k = s0 + i
                    t = lengths[k] - 1 - s if reverse else s
                    r = r0 + offsets[ch, t] + i
                    if training:
                        hprev[r, :] = h[k, :]
                    for j in range(hd):
                        rg = sigmoid(gates[r, j] + b_ih[j] + grz[i, j] + b_hh[j])
                        zg = sigmoid(gates[r, hd + j] + b_ih[hd + j] + grz[i, hd + j] + b_hh[hd + j])
                        gates[r, j] = rg
                        gates[r, hd + j] = zg
                        rh[i, j] = rg * h[k, j]
                        if training:
                            hn[r, j] = rh[i, j]
                np.dot(rh[:n], w_hn.T, out=ghn[:n])
                for i in range(n):
                    k = s0 + i
                    t = lengths[k] - 1 - s if reverse else s
                    r = r0 + offsets[ch, t] + i
                    for j in range(hd):
                        ng = tanh(gates[r, 2 * hd + j] + b_ih[2 * hd + j] + ghn[i, j] + b_hh[2 * hd + j])
                        h1 = ng + gates[r, hd + j] * (h[k, j] - ng)
                        h[k, j] = h1
                        out[r, out_col + j] = h1
                        gates[r, 2 * hd + j] = ng


@jit(parallel=True)
def gru_backward(
    x, w_ih, w_hh, reset_after, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, dout, out_col, dh, gates, hprev, hn, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace)."""
    hd = dh.shape[1]
    one = dh.dtype.type(1)
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    n_chunks = chunk_samples.shape[0] - 1
    part_w_ih = np.empty((n_chunks,) + w_ih.shape, dh.dtype)
    part_w_hh = np.empty((n_chunks,) + w_hh.shape, dh.dtype)
    part_b_ih = np.empty((n_chunks, 3 * hd), dh.dtype)
    part_b_hh = np.empty((n_chunks, 3 * hd), dh.dtype)
    for ch in prange(n_chunks):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        dg = np.empty((nc, 3 * hd), dh.dtype)
        dgrz = np.empty((nc, 2 * hd), dh.dtype)
        dn = np.empty((nc, hd), dh.dtype)
        drh = np.empty((nc, hd), dh.dtype)
        dh_direct = np.empty((nc, hd), dh.dtype)
        for s in range(lengths[s0] - 1, -1, -1):
            n = batch_sizes[ch, s]
            for i in range(n):
                k = s0 + i
                t = lengths[k] - 1 - s if reverse else s
                r = r0 + offsets[ch, t] + i
                for j in range(hd):
                    rg = gates[r, j]
                    zg = gates[r, hd + j]
                    ng = gates[r, 2 * hd + j]
                    grad_h = dh[k, j] + dout[r, out_col + j]
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
                np.dot(dg[:n], w_hh, out=dh[s0 : s0 + n])
            else:
                np.dot(dn[:n], w_hn, out=drh[:n])
                for i in range(n):
                    k = s0 + i
                    t = lengths[k] - 1 - s if reverse else s
                    r = r0 + offsets[ch, t] + i
                    for j in range(hd):
                        rg = gates[r, j]
                        dar = drh[i, j] * hprev[r, j] * rg * (one - rg)
                        dh_direct[i, j] += drh[i, j] * rg
                        gates[r, j] = dar
                        dgrz[i, j] = dar
                        dgrz[i, hd + j] = gates[r, hd + j]
                np.dot(dgrz[:n], w_hrz, out=dh[s0 : s0 + n])
            for i in range(n):
                for j in range(hd):
                    dh[s0 + i, j] += dh_direct[i, j]
        # Input-GEMM gradients; the n rows of W_hh see a different gradient (reset_after:
        # dn * r, kept in hn) or input (r*h, kept in hn), so that block is recomputed.
        g_c, hprev_c, hn_c = gates[r0:r1], hprev[r0:r1], hn[r0:r1]
        chunk_input_grads(g_c, x[r0:r1], hprev_c, w_ih, dx[r0:r1], accumulate_dx,
                          part_w_ih[ch], part_w_hh[ch], part_b_ih[ch])  # fmt: skip
        if reset_after:
            np.dot(hn_c.T, hprev_c, out=part_w_hh[ch][2 * hd :])
            column_sums(g_c, 0, 2 * hd, part_b_hh[ch][: 2 * hd])
            column_sums(hn_c, 0, hd, part_b_hh[ch][2 * hd :])
        else:
            part_w_hh[ch][2 * hd :] = np.dot(g_c.T, hn_c)[2 * hd :]
            part_b_hh[ch][:] = part_b_ih[ch]
    add_parts(part_w_ih, dw_ih)
    add_parts(part_w_hh, dw_hh)
    add_parts(part_b_ih, db_ih)
    add_parts(part_b_hh, db_hh)
