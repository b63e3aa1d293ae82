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
from fastseq.kernels.common import (
    add_parts,
    add_units,
    add_weight_grad,
    chunk_projection_start,
    chunk_team,
    column_sums,
    copy_rows,
    copy_units,
    gather_units,
    gemm_split_rows,
    input_panels,
    mask_rows,
    masked_rows,
    masked_units,
    one_chunk_pieces,
    output_row,
    pack_unit_gate_rows,
    packed_row,
    part_step_operands,
    projection_block,
    scatter_units,
    set_team,
    start_chunk,
    step_ordered,
    step_panels,
    steps_region_start,
    sum_unit_parts,
    unit_bounds,
    unit_initial_dh,
    unit_operands,
    unit_product,
    unit_projection_start,
    unit_recurrent_panels,
    unit_step_start,
    widest_part,
    zero_padding,
)
from fastseq.kernels.gemm import (
    OVERWRITE,
    gemm,
    gemm_large,
    gemm_packed,
    gemm_step_rows,
    gemm_step_rows_back,
    large_b,
    pack,
    pack_weights,
    step_product,
)
from fastseq.kernels.refs import any_layout, borrow, hold
from fastseq.kernels.sync import part_done, step_claims, take_part, wait_or_take


@jit(inline=True)
def gru_gates_forward(g, gh, b_ih, b_hh, h):
    """reset_after=True, one sample, one step (inlined into :func:`gru_cell_forward`, one
    row per call, and :func:`gru_rows_forward`, a step's rows per call). g (3H,) in: input
    projection, out: r, z, n. gh (3H,) in: recurrent GEMM row; out: its n block holds W_hn h
    + b_hn. h (H,) in/out.

    Short loops from index 0, for the reasons given in :func:`fastseq.kernels.lstm.
    lstm_cell_forward` (same results to the bit). Measured (float32, one thread, Zen 5, ns
    per unit, one fused loop / these loops): H = 16: 8.4 / 6.1; 64: 2.7 / 1.6; 256: 1.1 /
    0.7; 1024: 0.74 / 0.56.
    """
    hd = h.shape[0]
    for j in range(2 * hd):
        g[j] = sigmoid(g[j] + b_ih[j] + gh[j] + b_hh[j])
    for j in range(hd):
        gh[2 * hd + j] += b_hh[2 * hd + j]
    for j in range(hd):
        g[2 * hd + j] = tanh(g[2 * hd + j] + b_ih[2 * hd + j] + g[j] * gh[2 * hd + j])
    for j in range(hd):
        h[j] = g[2 * hd + j] + g[hd + j] * (h[j] - g[2 * hd + j])


@jit
def gru_cell_forward(g, gh, b_ih, b_hh, h):
    """:func:`gru_gates_forward` for one row (the split and streaming kernels)."""
    gru_gates_forward(g, gh, b_ih, b_hh, h)


@jit
def gru_rows_forward(g, g_rows, gh, b_ih, b_hh, h, k0):
    """:func:`gru_gates_forward` for the n = len(g_rows) rows of a step in one call: row i
    reads g[g_rows[i]] (R, 3H), gh[i] (n, 3H) and updates h[k0 + i] (N, H). One call per row
    cost about 50 ns more per row (see ``lstm.lstm_rows_forward``)."""
    for i in range(g_rows.shape[0]):
        gru_gates_forward(g[g_rows[i]], gh[i], b_ih, b_hh, h[k0 + i])


@jit
def gru_cell_reset(g, grz, b_ih, b_hh, h, rh):
    """reset_after=False, first half of a step: g[:2H] out: r, z; rh (H,) out: r*h."""
    hd = h.shape[0]
    for j in range(hd):
        rg = sigmoid(g[j] + b_ih[j] + grz[j] + b_hh[j])
        g[j] = rg
        g[hd + j] = sigmoid(g[hd + j] + b_ih[hd + j] + grz[hd + j] + b_hh[hd + j])
        rh[j] = rg * h[j]


@jit
def gru_cell_update(g, ghn, b_ih, b_hh, h):
    """reset_after=False, second half: ghn (H,) = W_hn (r*h); g[2H:] out: n; h (H,) in/out."""
    hd = h.shape[0]
    for j in range(hd):
        ng = tanh(g[2 * hd + j] + b_ih[2 * hd + j] + ghn[j] + b_hh[2 * hd + j])
        h[j] = ng + g[hd + j] * (h[j] - ng)
        g[2 * hd + j] = ng


@jit(inline=True)
def gru_gates_backward(g, dh, dout, hprev, hn, dh_direct, reset_after):
    """One sample, one step, the part before any recurrent GEMM (inlined into
    :func:`gru_cell_backward`, one row per call, and :func:`gru_rows_backward`).

    g (3H,) in: r, z, n; out: gradients of the pre-activations of z and n, and (reset_after)
    of r. hn (H,) in: W_hn h + b_hn (reset_after), out: its gradient dn * r. dh, dout,
    hprev (H,) in. dh_direct (H,) out: gradient reaching h through h' = n + z (h - n).
    """
    hd = hprev.shape[0]
    one = hprev.dtype.type(1)
    for j in range(hd):
        rg = g[j]
        zg = g[hd + j]
        ng = g[2 * hd + j]
        grad_h = dh[j] + dout[j]
        dan = grad_h * (one - zg) * (one - ng * ng)
        g[hd + j] = grad_h * (hprev[j] - ng) * zg * (one - zg)
        g[2 * hd + j] = dan
        dh_direct[j] = grad_h * zg
        if reset_after:
            g[j] = dan * hn[j] * rg * (one - rg)
            hn[j] = dan * rg


@jit
def gru_cell_backward(g, dh, dout, hprev, hn, dh_direct, reset_after):
    """:func:`gru_gates_backward` for one row (the split kernels)."""
    gru_gates_backward(g, dh, dout, hprev, hn, dh_direct, reset_after)


@jit
def gru_rows_backward(gates, rows, dh, dout, out_col, hprev, hn, dh_direct, reset_after, k0):
    """:func:`gru_gates_backward` for the n = len(rows) rows of a step in one call: row i
    reads and overwrites gates[rows[i]] (R, 3H) and hn there (R, H), reads dout[rows[i],
    out_col:out_col+H], hprev there and dh[k0 + i] (N, H); writes dh_direct[i] (n, H)."""
    hd = dh.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        gru_gates_backward(gates[r], dh[k0 + i], dout[r, out_col : out_col + hd], hprev[r], hn[r], dh_direct[i],
                           reset_after)  # fmt: skip


@jit
def gru_cell_backward_reset(g, drh, hprev):
    """reset_after=False: drh (H,) in: gradient of r*h, out: its share of the gradient of h
    (drh * r). g[:H] in: r, out: its pre-activation gradient. hprev (H,): the h the GEMMs
    read (with recurrent dropout, the masked h)."""
    one = hprev.dtype.type(1)
    for j in range(hprev.shape[0]):
        rg = g[j]
        g[j] = drh[j] * hprev[j] * rg * (one - rg)
        drh[j] *= rg


@jit(parallel=True)
def gru_forward(
    x, w_ih, w_hh, b_ih, b_hh, reset_after, chunk_rows, chunk_samples, batch_sizes, offsets,
    lengths, reverse, out, out_col, out_rows, h, gates, hprev, hn, training, rmask, x_rows,
):  # fmt: skip
    """Forward pass of one layer and direction. ``x_rows``: see
    :func:`fastseq.kernels.common.projection_block`."""
    hd = h.shape[1]
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, b_ih, b_hh, out, out_rows, h, gates, hprev, hn, rmask, x_rows = borrow(
        (x, w_ih, w_hh, b_ih, b_hh, out, out_rows, h, gates, hprev, hn, rmask, x_rows)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    # read by every chunk at every step (only the ones the variant uses)
    empty = w_hh[:0]
    w_hh_panels = step_panels(any_layout((w_hh if reset_after else empty).T), chunk_samples, lengths, True)
    w_hrz_panels = step_panels(any_layout((empty if reset_after else w_hrz).T), chunk_samples, lengths, True)
    w_hn_panels = step_panels(any_layout((empty if reset_after else w_hn).T), chunk_samples, lengths, True)
    w_ih_panels, full, projected = chunk_projection_start(x, w_ih, gates, chunk_samples, x_rows)
    owned = (w_hh_panels, w_hrz_panels, w_hn_panels, w_ih_panels, full)  # held to the end
    w_hh_panels, w_hrz_panels, w_hn_panels, w_ih_panels, full = borrow(owned)
    n_chunks = chunk_samples.shape[0] - 1
    team = chunk_team(n_chunks)
    for ch in prange(n_chunks):
        r0, r1, s0, nc, block = start_chunk(
            x, w_ih, w_ih_panels, full, chunk_rows, chunk_samples, np.int64(ch), projected
        )
        zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(ch))
        proj, base, s_next = full, 0, 0
        ordered = step_ordered(reverse, full, lengths[s0 : s0 + nc])  # rows of proj: see there
        gh = np.empty((nc, 3 * hd), h.dtype)
        grz = np.empty((nc, 2 * hd), h.dtype)
        rh = np.empty((nc, hd), h.dtype)
        ghn = np.empty((nc, hd), h.dtype)
        hm = np.empty((nc if rmask.shape[0] else 0, hd), h.dtype)
        # a step's rows of the workspace, of proj
        rows, proj_rows = np.empty(nc, np.int64), np.empty(nc, np.int64)
        scratch = (block, gh, grz, rh, ghn, hm, rows, proj_rows)  # held to the chunk's end
        block, gh, grz, rh, ghn, hm, rows, proj_rows = borrow(scratch)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            if s == s_next:
                proj, base, s_next = projection_block(x, w_ih, w_ih_panels, r0, offsets[ch], lengths[s0 : s0 + nc],
                                                      s, reverse, full, block, x_rows)  # fmt: skip
            # Recurrent dropout masks the h the GEMMs (and r*h) read, not the z*h term.
            h_in = masked_rows(h, rmask, s0, n, hm)
            if reset_after:
                gemm_step_rows(h_in, w_hh.T, w_hh_panels, gh[:n])
            else:
                gemm_step_rows(h_in, w_hrz.T, w_hrz_panels, grz[:n])
            for i in range(n):
                k = s0 + i
                rows[i] = r = packed_row(r0, offsets[ch], lengths[k], i, s, reverse)
                q = packed_row(r0, offsets[ch], lengths[k], i, s, reverse and not ordered) - base
                proj_rows[i] = q
                if training:
                    copy_units(h[k], hprev[r], 0, hd)
                if not reset_after:
                    gru_cell_reset(proj[q], grz[i], b_ih, b_hh, h_in[i], rh[i])
                    if training:
                        copy_units(rh[i], hn[r], 0, hd)
            if reset_after:
                if n == 1:  # inlined: see lstm.lstm_forward
                    gru_gates_forward(proj[proj_rows[0]], gh[0], b_ih, b_hh, h[s0])
                else:
                    gru_rows_forward(proj, proj_rows[:n], gh, b_ih, b_hh, h, s0)
                for i in range(n):
                    r = rows[i]
                    copy_units(h[s0 + i], out[output_row(out_rows, r), out_col:], 0, hd)
                    if training:
                        copy_units(gh[i, 2 * hd :], hn[r], 0, hd)
            if not reset_after:
                gemm_step_rows(rh[:n], w_hn.T, w_hn_panels, ghn[:n])
                for i in range(n):
                    k = s0 + i
                    gru_cell_update(proj[proj_rows[i]], ghn[i], b_ih, b_hh, h[k])
                    copy_units(h[k], out[output_row(out_rows, rows[i]), out_col:], 0, hd)
        hold(scratch)
    set_team(team)
    hold(owned)


@jit(parallel=True)
def gru_backward(
    x, w_ih, w_hh, reset_after, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, dout, out_col, dh, gates, hprev, hn, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh,
    rmask, part_w_ih, part_w_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace).

    With recurrent dropout, ``hprev`` rows are masked in place once the z*h term's gradient
    has used them: everything after reads the h the GEMMs read.
    """
    hd = dh.shape[1]
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, dout, dh, gates, hprev, hn, dx, rmask, part_w_ih, part_w_hh = borrow(
        (x, w_ih, w_hh, dout, dh, gates, hprev, hn, dx, rmask, part_w_ih, part_w_hh)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    w_hrz = w_hh[: 2 * hd]
    w_hn = w_hh[2 * hd :]
    n_chunks = chunk_samples.shape[0] - 1
    empty = w_hh[:0]  # B operands of the per-step products, packed once (only the variant's)
    w_hh_panels = step_panels(any_layout(w_hh if reset_after else empty), chunk_samples, lengths, False)
    w_hrz_panels = step_panels(any_layout(empty if reset_after else w_hrz), chunk_samples, lengths, False)
    w_hn_panels = step_panels(any_layout(empty if reset_after else w_hn), chunk_samples, lengths, False)
    w_ih_panels = pack_weights(any_layout(w_ih))  # B = W_ih of every chunk's dx = dG @ W_ih
    pieces = one_chunk_pieces(chunk_samples, gates.shape[0])
    part_b_ih = np.empty((part_w_ih.shape[0], 3 * hd), dh.dtype)
    part_b_hh = np.empty((part_w_ih.shape[0], 3 * hd), dh.dtype)
    owned = (w_hh_panels, w_hrz_panels, w_hn_panels, w_ih_panels, part_b_ih, part_b_hh)  # held to the end
    w_hh_panels, w_hrz_panels, w_hn_panels, w_ih_panels, part_b_ih, part_b_hh = borrow(owned)
    for ch in prange(n_chunks):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        dg = np.empty((nc, 3 * hd), dh.dtype)
        dgrz = np.empty((nc, 2 * hd), dh.dtype)
        dn = np.empty((nc, hd), dh.dtype)
        drh = np.empty((nc, hd), dh.dtype)
        dh_direct = np.empty((nc, hd), dh.dtype)
        rows = np.empty(nc, np.int64)  # a step's rows of the workspace
        scratch = (dg, dgrz, dn, drh, dh_direct, rows)  # held to the chunk's end
        dg, dgrz, dn, drh, dh_direct, rows = borrow(scratch)
        for s in range(lengths[s0] - 1, -1, -1):
            n = batch_sizes[ch, s]
            for i in range(n):
                rows[i] = packed_row(r0, offsets[ch], lengths[s0 + i], i, s, reverse)
            gru_rows_backward(gates, rows[:n], dh, dout, out_col, hprev, hn, dh_direct, reset_after, s0)
            for i in range(n):
                k, r = s0 + i, rows[i]
                if rmask.shape[0]:
                    hprev[r, :] *= rmask[k, :]
                if reset_after:
                    copy_units(gates[r], dg[i], 0, 2 * hd)
                    copy_units(hn[r], dg[i, 2 * hd :], 0, hd)
                else:
                    copy_units(gates[r, 2 * hd :], dn[i], 0, hd)
            if reset_after:
                gemm_step_rows_back(dg[:n], w_hh, w_hh_panels, dh[s0 : s0 + n])
            else:
                gemm_step_rows_back(dn[:n], w_hn, w_hn_panels, drh[:n])
                for i in range(n):
                    r = rows[i]
                    gru_cell_backward_reset(gates[r], drh[i], hprev[r])
                    copy_units(gates[r], dgrz[i], 0, 2 * hd)
                gemm_step_rows_back(dgrz[:n], w_hrz, w_hrz_panels, dh[s0 : s0 + n])
                for i in range(n):
                    add_units(drh[i], dh[s0 + i], 0, hd)
            mask_rows(dh, rmask, s0, n)
            for i in range(n):
                add_units(dh_direct[i], dh[s0 + i], 0, hd)
        if not pieces:  # else after the loop, split across threads
            gemm_large(gates[r0:r1], large_b(w_ih), w_ih_panels, dx[r0:r1], accumulate_dx)
        if part_w_ih.shape[0]:
            gru_chunk_weight_grads(x[r0:r1], reset_after, gates[r0:r1], hprev[r0:r1], hn[r0:r1], part_w_ih[ch],
                                   part_w_hh[ch], part_b_ih[ch], part_b_hh[ch])  # fmt: skip
        hold(scratch)
    if pieces:
        gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, pieces)
    if part_w_ih.shape[0]:
        add_parts(part_w_ih, dw_ih)
        add_parts(part_w_hh, dw_hh)
        add_parts(part_b_ih, db_ih)
        add_parts(part_b_hh, db_hh)
    else:
        gru_weight_grads(x, reset_after, gates, hprev, hn, dw_ih, dw_hh, db_ih, db_hh)
    hold(owned)


# The weight gradients: dgates (R, 3H), the gradients of the gate pre-activations, are what
# W_ih and the r, z rows of W_hh see; the n rows of W_hh see another gradient (reset_after:
# dn * r, kept in hn (R, H)) or another input (r*h, kept in hn). hprev (R, H): the (masked)
# state the GEMMs read.


@jit
def gru_chunk_weight_grads(x, reset_after, dgates, hprev, hn, part_w_ih, part_w_hh, part_b_ih, part_b_hh):
    """One chunk's weight gradients as partial sums over its rows (overwritten; see
    common.chunk_weight_grads). The r, z rows of part_w_hh only: the n rows are computed
    from hn below."""
    hd = hprev.shape[1]
    gemm(dgates.T, x, part_w_ih, OVERWRITE)
    gemm_packed(dgates[:, : 2 * hd].T, pack(hprev), part_w_hh[: 2 * hd], OVERWRITE)  # a: no BLAS layout
    column_sums(dgates, 0, part_b_ih)
    if reset_after:
        gemm(hn.T, hprev, part_w_hh[2 * hd :], OVERWRITE)
        part_b_hh[: 2 * hd] = part_b_ih[: 2 * hd]  # the r, z column sums of dgates, computed above
        column_sums(hn, 0, part_b_hh[2 * hd :])
    else:
        gemm_packed(dgates[:, 2 * hd :].T, pack(hn), part_w_hh[2 * hd :], OVERWRITE)  # a: no BLAS layout
        part_b_hh[:] = part_b_ih


@jit
def gru_weight_grads(x, reset_after, dgates, hprev, hn, dw_ih, dw_hh, db_ih, db_hh):
    """The weight gradients over all rows at once (common.add_weight_grad)."""
    hd = hprev.shape[1]
    sums = np.empty(3 * hd, dgates.dtype)
    # One product per call, dG read in place. Sharing a copy of dG's r, z columns between the
    # x and h products (as common.add_weight_grads does for the LSTM and RNN) measured 2-6%
    # slower GRU training in one call (its pieces then did unequal work) and 1-3% in two.
    add_weight_grad(dgates, x, dw_ih, sums)
    db_ih += sums
    add_weight_grad(dgates[:, : 2 * hd], hprev, dw_hh[: 2 * hd], sums[:0])
    if reset_after:
        add_weight_grad(hn, hprev, dw_hh[2 * hd :], sums[2 * hd :])
    else:
        add_weight_grad(dgates[:, 2 * hd :], hn, dw_hh[2 * hd :], sums[:0])
    db_hh += sums


@jit
def gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, gx, gh, grz, rh, ghn, blocks):
    """One inference step for streaming (serial, no workspace). x (N, C); h (N, H) in/out;
    scratch: gx, gh (N, 3H), grz (N, 2H), rh, ghn (N, H); blocks: 1, or 3 to match
    :func:`gru_step_units` bitwise (``gemm.step_product``)."""
    hd = h.shape[1]
    x, h, w_ih, w_hh, b_ih, b_hh, gx, gh, grz, rh, ghn = borrow(
        (x, h, w_ih, w_hh, b_ih, b_hh, gx, gh, grz, rh, ghn)
    )
    step_product(x, w_ih, gx, blocks)
    if reset_after:
        step_product(h, w_hh, gh, blocks)
        for i in range(x.shape[0]):
            gru_cell_forward(gx[i], gh[i], b_ih, b_hh, h[i])
    else:
        step_product(h, w_hh[: 2 * hd], grz, 1)
        for i in range(x.shape[0]):
            gru_cell_reset(gx[i], grz[i], b_ih, b_hh, h[i], rh[i])
        step_product(rh, w_hh[2 * hd :], ghn, 1)
        for i in range(x.shape[0]):
            gru_cell_update(gx[i], ghn[i], b_ih, b_hh, h[i])


@jit
def gru_forward_units(
    x, w_ih, w_hh, b_ih, b_hh, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, out, out_col, out_rows, h, gates, hprev, hn, training, rmask, parts, threads,
):  # fmt: skip
    """:func:`gru_forward` (reset_after=True) for a batch in one chunk, each step's recurrent
    product and gate math split across ``parts`` threads by hidden units, like
    :func:`fastseq.kernels.lstm.lstm_forward_units` (input projection, W_hh read in place,
    every step in one parallel region when it can). Same arguments as gru_forward (without
    ``reset_after``), plus ``parts`` and ``threads``."""
    hd, nb = h.shape[1], h.shape[0]
    units = unit_bounds(hd, parts)
    w_ih_panels = input_panels(w_ih, x.shape[0])
    w_hh_panels = unit_recurrent_panels(w_hh, 3, units, lengths[0], nb)  # part p: h @ (its rows of W_hh)^T
    gh = np.empty((parts, nb, 3 * widest_part(units)), h.dtype)
    b_ih_p, b_hh_p, _, g_p = unit_operands(b_ih, b_hh, np.empty((0, hd), h.dtype), 3, units)
    zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(0))
    block, proj, s_next = unit_projection_start(x, w_ih, w_ih_panels, gates, lengths, parts)
    proj, base, s_next, h_buf, claims = steps_region_start(x, w_ih, w_ih_panels, offsets[0], lengths, reverse, block,
                                                           proj, s_next, parts, threads, h, rmask)  # fmt: skip
    step = (w_hh_panels, w_hh, gh, b_ih_p, b_hh_p, g_p, h, out, out_col, out_rows, hn, hprev, training, rmask, units,
            batch_sizes[0], offsets[0], lengths, reverse)  # fmt: skip
    if claims.shape[0]:
        gru_forward_steps_units(h_buf, proj, base, claims, *step)
        return
    h_in = np.empty((nb, hd), h.dtype)
    for s in range(lengths[0]):
        proj, base, s_next = unit_step_start(x, w_ih, w_ih_panels, offsets[0], lengths, s, reverse, block, parts,
                                             proj, base, s_next, h, rmask, batch_sizes[0, s], h_in)  # fmt: skip
        gru_forward_step_units(s, h_in, proj, base, *step)


@jit
def gru_part_step(s, p, h_in, h_next, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, h, out, out_col, out_rows,
                  hn, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`gru_forward_units` (see lstm.lstm_part_step). Training: h
    (unmasked: the z*h term reads it) to ``hprev``, the gates back to ``proj``'s rows, W_hn h
    + b_hn to ``hn``'s."""
    u0, u1 = units[p], units[p + 1]
    hu, n = u1 - u0, batch_sizes_c[s]
    if training:
        for i in range(n):
            copy_units(h[i], hprev[packed_row(0, offsets_c, lengths[i], i, s, reverse)], u0, u1)
    unit_product(h_in[:n], panels, w_hh, 3, p, u0, hu, gh[p, :n, : 3 * hu])
    g = g_p[p, : 3 * hu]
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        gather_units(proj[r - base], 3, u0, g)
        gru_cell_forward(g, gh[p, i, : 3 * hu], b_ih_p[p, : 3 * hu], b_hh_p[p, : 3 * hu], h[i, u0:u1])
        copy_units(h[i], out[output_row(out_rows, r), out_col:], u0, u1)
        if training:
            scatter_units(g, 3, u0, proj[r - base])
            copy_units(gh[p, i, 2 * hu : 3 * hu], hn[r, u0:u1], 0, hu)
    if h_next.shape[0]:
        masked_units(h, rmask, n, u0, u1, h_next)


@jit(parallel=True)
def gru_forward_steps_units(h_buf, proj, base, claims, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, h, out, out_col,
                            out_rows, hn, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths,
                            reverse):  # fmt: skip
    """Every step of :func:`gru_forward_units` in one parallel region (see
    lstm.forward_steps_units)."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for s in range(lengths[0]):
            at = s * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                gru_part_step(s, p, h_buf[s % 2], h_buf[(s + 1) % 2], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p,
                              g_p, h, out, out_col, out_rows, hn, hprev, training, rmask, units, batch_sizes_c,
                              offsets_c, lengths, reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def gru_forward_step_units(s, h_in, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, h, out, out_col, out_rows, hn,
                           hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Step s of :func:`gru_forward_units`, its parts across threads (see
    lstm.forward_step_units)."""
    for p in prange(units.shape[0] - 1):
        gru_part_step(s, p, h_in, h_in[:0], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, h, out, out_col,
                      out_rows, hn, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip


@jit
def gru_backward_units(
    x, w_ih, w_hh, chunk_rows, chunk_samples, batch_sizes, offsets, lengths, reverse, dout,
    out_col, dh, gates, hprev, hn, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh, rmask,
    part_w_ih, part_w_hh, parts, threads,
):  # fmt: skip
    """:func:`gru_backward` (reset_after=True) for :func:`gru_forward_units`' layout, as
    :func:`fastseq.kernels.lstm.lstm_backward_units` (:func:`gru_backward_part`; all steps
    in one region when ``threads`` >= ``parts``); dx split by rows, the weight gradients
    over all rows at once (``part_w_ih``, ``part_w_hh`` have no slices)."""
    hd, nb = dh.shape[1], dh.shape[0]
    units = unit_bounds(hd, parts)
    w_hh_panels = pack_unit_gate_rows(w_hh, 3, units)  # part p: dG_p @ (its gate rows of W_hh)
    w_ih_panels = pack_weights(any_layout(w_ih))
    g_p = np.empty((parts, 3 * widest_part(units)), dh.dtype)
    dg_p = np.zeros((parts, nb, 3 * widest_part(units)), dh.dtype)  # zero past a part's 3*hu
    partial = np.empty((2, parts, nb, hd), dh.dtype)  # read one, write the other each step
    dh_direct = np.empty((nb, hd), dh.dtype)  # the gradient reaching h through z*h
    step = (gates, hn, hprev, dh, dh_direct, partial, rmask, dout, out_col, g_p, dg_p, w_hh_panels, units,
            batch_sizes[0], offsets[0], lengths, reverse)  # fmt: skip
    if threads >= parts:
        gru_backward_steps_units(step_claims(lengths[0], parts), *step)
    else:
        for s in range(lengths[0] - 1, -1, -1):
            gru_backward_step_units(s, *step)
    # the gradient of the initial state, from the products of the first step's rows
    done = batch_sizes[0, 0]
    unit_initial_dh(partial[lengths[0] % 2], rmask, done, dh)
    for i in range(done):
        add_units(dh_direct[i], dh[i], 0, hd)
    gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, parts)
    gru_weight_grads(x, True, gates, hprev, hn, dw_ih, dw_hh, db_ih, db_hh)


@jit
def gru_backward_part(s, p, gates, hn, hprev, dh, dh_direct, partial, rmask, dout, out_col, g_p, dg_p, panels, units,
                      batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`gru_backward_units` (see lstm.lstm_backward_part): dh[:done]
    = partial summed over the parts, times the recurrent dropout mask, plus dh_direct, for
    its units; then its units' gradients for the step's rows (gates rows in: r, z, n, out:
    gradients of the pre-activations; hn rows in: W_hn h + b_hn, out: dn * r; hprev rows
    masked once read, as in gru_backward); then its share of dh: (dr, dz, dn * r of its
    units, compact in dg_p[p]) @ its gate rows of W_hh (panels[p])."""
    k = lengths[0] - 1 - s  # steps taken before this one
    n, done = batch_sizes_c[s], batch_sizes_c[s + 1] if k else 0
    partial_in, partial_out = partial[k % 2], partial[(k + 1) % 2]
    u0, u1 = units[p], units[p + 1]
    hu = u1 - u0
    for i in range(done):
        sum_unit_parts(partial_in, rmask, i, u0, u1, dh[i])
        add_units(dh_direct[i], dh[i], u0, u1)
    g = g_p[p, : 3 * hu]
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        gather_units(gates[r], 3, u0, g)
        gru_cell_backward(g, dh[i, u0:u1], dout[r, out_col + u0 : out_col + u1], hprev[r, u0:u1],
                          hn[r, u0:u1], dh_direct[i, u0:u1], True)  # fmt: skip
        if rmask.shape[0]:
            for j in range(u0, u1):
                hprev[r, j] *= rmask[i, j]
        scatter_units(g, 3, u0, gates[r])
        copy_units(g, dg_p[p, i], 0, 2 * hu)
        copy_units(hn[r, u0:u1], dg_p[p, i, 2 * hu :], 0, hu)
    gemm_packed(dg_p[p, :n], panels[p], partial_out[p, :n], OVERWRITE)


@jit(parallel=True)
def gru_backward_steps_units(claims, gates, hn, hprev, dh, dh_direct, partial, rmask, dout, out_col, g_p, dg_p,
                             panels, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Every step of :func:`gru_backward_units` in one parallel region, last step first (see
    lstm.forward_steps_units; claims: the steps' counters, ``sync.step_claims``)."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for k in range(lengths[0]):
            at = k * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                gru_backward_part(lengths[0] - 1 - k, p, gates, hn, hprev, dh, dh_direct, partial, rmask, dout,
                                  out_col, g_p, dg_p, panels, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def gru_backward_step_units(s, gates, hn, hprev, dh, dh_direct, partial, rmask, dout, out_col, g_p, dg_p, panels,
                            units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Step s of :func:`gru_backward_units`, its parts across threads (:func:`gru_backward_part`)."""
    for p in prange(units.shape[0] - 1):
        gru_backward_part(s, p, gates, hn, hprev, dh, dh_direct, partial, rmask, dout, out_col, g_p, dg_p, panels,
                          units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip


@jit(parallel=True)
def gru_step_units(x, h, w_ih, w_hh, b_ih, b_hh, h_in, gx, gh, b_ih_c, b_hh_c, units):
    """:func:`gru_step` (reset_after=True only) with the hidden units split across threads
    (one parallel region): part p computes units ``units[p] .. units[p+1]-1`` of every gate
    from its rows of W_ih and W_hh. Scratch: h_in (N, H); per part (parts, ...): gx, gh
    (N, 3*hu_max), b_ih_c, b_hh_c (3*hu_max,)."""
    copy_rows(h, h_in)
    for p in prange(units.shape[0] - 1):
        u0, u1 = units[p], units[p + 1]
        hu = u1 - u0
        part_step_operands(x, h_in, w_ih, w_hh, b_ih, b_hh, 3, u0, u1, gx[p], gh[p], b_ih_c[p], b_hh_c[p])
        for i in range(x.shape[0]):
            gru_cell_forward(gx[p, i, : 3 * hu], gh[p, i, : 3 * hu], b_ih_c[p, : 3 * hu], b_hh_c[p, : 3 * hu],
                             h[i, u0:u1])  # fmt: skip
