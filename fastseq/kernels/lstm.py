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
from fastseq.kernels.common import (
    add_parts,
    chunk_projection_start,
    chunk_team,
    chunk_weight_grads,
    copy_rows,
    copy_unit_columns,
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
    weight_grads,
    widest_part,
    zero_padding,
)
from fastseq.kernels.gemm import (
    OVERWRITE,
    gemm_large,
    gemm_packed,
    gemm_step_rows,
    gemm_step_rows_back,
    large_b,
    pack_weights,
    step_product,
)
from fastseq.kernels.refs import any_layout, borrow, hold
from fastseq.kernels.sync import part_done, step_claims, take_part, wait_or_take


@jit(inline=True)
def lstm_gates_forward(g, gh, b_ih, b_hh, w_peep, peephole, c, h):
    """One sample, one step. g (4H,) in: input projection, out: activations i, f, g, o.
    gh (4H,) in: recurrent GEMM row; overwritten (scratch: the pre-activations).
    b_ih, b_hh (4H,), w_peep (3, H). c, h (H,) in/out. Inlined into
    :func:`lstm_cell_forward` (one row per call) and :func:`lstm_rows_forward` (a step's rows).

    Written as short loops, each touching few arrays from index 0. One fused loop over the
    four gates paid about 200 ns per row (fitted from the times below); LLVM vectorised it
    behind a run-time overlap check between every array it writes and every gate block it
    reads (about 100 pointer pairs), the likely cause. Measured (float32, one thread,
    Zen 5, ns per unit, fused / these loops): H = 16: 14.2 / 6.8; 64: 4.2 / 2.0; 256:
    1.6 / 1.2; 1024: 1.0 / 1.0 (1.2 / 1.3 with peepholes). A loop over
    ``range(2 * hd, 3 * hd)`` did not vectorise (0.86 ns per element against 0.15): the
    loops below all start at 0 and add the block offset.
    """
    hd = h.shape[0]
    for j in range(4 * hd):
        gh[j] += g[j] + b_ih[j] + b_hh[j]
    if peephole:
        for j in range(hd):
            gh[j] += w_peep[0, j] * c[j]
            gh[hd + j] += w_peep[1, j] * c[j]
    for j in range(2 * hd):
        g[j] = sigmoid(gh[j])
    for j in range(hd):
        g[2 * hd + j] = tanh(gh[2 * hd + j])
    for j in range(hd):
        c[j] = g[hd + j] * c[j] + g[j] * g[2 * hd + j]
    if peephole:
        for j in range(hd):
            gh[3 * hd + j] += w_peep[2, j] * c[j]
    for j in range(hd):
        g[3 * hd + j] = sigmoid(gh[3 * hd + j])
    for j in range(hd):
        h[j] = g[3 * hd + j] * tanh(c[j])


@jit
def lstm_cell_forward(g, gh, b_ih, b_hh, w_peep, peephole, c, h):
    """:func:`lstm_gates_forward` for one row (the split and streaming kernels)."""
    lstm_gates_forward(g, gh, b_ih, b_hh, w_peep, peephole, c, h)


@jit
def lstm_rows_forward(g, g_rows, gh, b_ih, b_hh, w_peep, peephole, c, h, k0):
    """:func:`lstm_gates_forward` for the n = len(g_rows) rows of a step in one call: row i
    reads g[g_rows[i]] (R, 4H), gh[i] (n, 4H) and updates c[k0 + i], h[k0 + i] (N, H).

    One call per row paid a fixed cost of about 50 ns (the views it receives, the call):
    measured (float32, one thread, Zen 5, ns per row, a call per row / this): H = 16: 114 /
    73; 32: 120 / 73-77; 64: 136 / 99-107; 128: 192-202 / 156-188; 256: 343-353 / 299-335;
    1024: 1307-1353 / 1259-1279."""
    for i in range(g_rows.shape[0]):
        lstm_gates_forward(g[g_rows[i]], gh[i], b_ih, b_hh, w_peep, peephole, c[k0 + i], h[k0 + i])


@jit(inline=True)
def lstm_gates_backward(g, dh, dout, dc, c1, c0, w_peep, peephole):
    """One sample, one step. g (4H,) in: activations i, f, g, o; out: gradients of the
    pre-activations. dh (H,) in: gradient from the next step; dout (H,) in: gradient of this
    output. dc (H,) in/out: gradient of c' in, of c out. c1 (H,) c', c0 (H,) c. Inlined
    into :func:`lstm_cell_backward` and :func:`lstm_rows_backward`, compiled with their
    flags: both drop ``reassoc`` (see ``fastseq._jit``)."""
    hd = dc.shape[0]
    one = dc.dtype.type(1)
    for j in range(hd):
        ig = g[j]
        fg = g[hd + j]
        gg = g[2 * hd + j]
        og = g[3 * hd + j]
        tc = tanh(c1[j])
        grad_h = dh[j] + dout[j]
        dao = (grad_h * tc) * (og * (one - og))
        grad_c = dc[j] + (grad_h * og) * (one - tc * tc)
        if peephole:
            grad_c += dao * w_peep[2, j]
        dai = (grad_c * gg) * (ig * (one - ig))
        daf = (grad_c * c0[j]) * (fg * (one - fg))
        dag = (grad_c * ig) * (one - gg * gg)
        grad_c0 = grad_c * fg
        if peephole:
            grad_c0 += dai * w_peep[0, j] + daf * w_peep[1, j]
        dc[j] = grad_c0
        g[j] = dai
        g[hd + j] = daf
        g[2 * hd + j] = dag
        g[3 * hd + j] = dao


@jit(reassociate=False)
def lstm_cell_backward(g, dh, dout, dc, c1, c0, w_peep, peephole):
    """:func:`lstm_gates_backward` for one row (the split kernels)."""
    lstm_gates_backward(g, dh, dout, dc, c1, c0, w_peep, peephole)


@jit(reassociate=False)
def lstm_rows_backward(gates, rows, dh, dout, out_col, dc, cnew, cprev, w_peep, peephole, k0):
    """:func:`lstm_gates_backward` for the n = len(rows) rows of a step in one call (see
    :func:`lstm_rows_forward`): row i reads and overwrites gates[rows[i]] (R, 4H), reads
    dout[rows[i], out_col:out_col+H], cnew and cprev there (R, H), and dh[k0 + i], dc[k0 + i]
    (N, H), dc updated."""
    hd = dh.shape[1]
    for i in range(rows.shape[0]):
        r, k = rows[i], k0 + i
        lstm_gates_backward(gates[r], dh[k], dout[r, out_col : out_col + hd], dc[k], cnew[r], cprev[r], w_peep,
                            peephole)  # fmt: skip


@jit(parallel=True)
def lstm_forward(
    x, w_ih, w_hh, b_ih, b_hh, w_peep, peephole, chunk_rows, chunk_samples, batch_sizes,
    offsets, lengths, reverse, out, out_col, out_rows, h, c, gates, hprev, cprev, cnew, training, rmask,
    x_rows,
):  # fmt: skip
    """Forward pass of one layer and direction. ``x_rows``: see
    :func:`fastseq.kernels.common.projection_block`."""
    hd = h.shape[1]
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, b_ih, b_hh, w_peep, out, out_rows, h, c, gates, hprev, cprev, cnew, rmask, x_rows = borrow(
        (x, w_ih, w_hh, b_ih, b_hh, w_peep, out, out_rows, h, c, gates, hprev, cprev, cnew, rmask, x_rows)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    # read by every chunk at every step
    w_hh_panels = step_panels(any_layout(w_hh.T), chunk_samples, lengths, True)
    w_ih_panels, full, projected = chunk_projection_start(x, w_ih, gates, chunk_samples, x_rows)
    owned = (w_hh_panels, w_ih_panels, full)  # held to the end
    w_hh_panels, w_ih_panels, full = borrow(owned)
    n_chunks = chunk_samples.shape[0] - 1
    team = chunk_team(n_chunks)
    for ch in prange(n_chunks):
        r0, r1, s0, nc, block = start_chunk(
            x, w_ih, w_ih_panels, full, chunk_rows, chunk_samples, np.int64(ch), projected
        )
        zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(ch))
        proj, base, s_next = full, 0, 0
        ordered = step_ordered(reverse, full, lengths[s0 : s0 + nc])  # rows of proj: see there
        gh = np.empty((nc, 4 * hd), h.dtype)
        hm = np.empty((nc if rmask.shape[0] else 0, hd), h.dtype)
        # a step's rows of the workspace, of proj
        rows, proj_rows = np.empty(nc, np.int64), np.empty(nc, np.int64)
        scratch = (block, gh, hm, rows, proj_rows)  # held to the chunk's end
        block, gh, hm, rows, proj_rows = borrow(scratch)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            if s == s_next:
                proj, base, s_next = projection_block(x, w_ih, w_ih_panels, r0, offsets[ch], lengths[s0 : s0 + nc],
                                                      s, reverse, full, block, x_rows)  # fmt: skip
            h_in = masked_rows(h, rmask, s0, n, hm)
            gemm_step_rows(h_in, w_hh.T, w_hh_panels, gh[:n])
            for i in range(n):
                k = s0 + i
                rows[i] = r = packed_row(r0, offsets[ch], lengths[k], i, s, reverse)
                proj_rows[i] = packed_row(r0, offsets[ch], lengths[k], i, s, reverse and not ordered) - base
                if training:
                    copy_units(h_in[i], hprev[r], 0, hd)
                    copy_units(c[k], cprev[r], 0, hd)
            if n == 1:  # inlined: a call costs about 100 ns here (see lstm_rows_forward)
                lstm_gates_forward(proj[proj_rows[0]], gh[0], b_ih, b_hh, w_peep, peephole, c[s0], h[s0])
            else:
                lstm_rows_forward(proj, proj_rows[:n], gh, b_ih, b_hh, w_peep, peephole, c, h, s0)
            for i in range(n):
                k, r = s0 + i, rows[i]
                copy_units(h[k], out[output_row(out_rows, r), out_col:], 0, hd)
                if training:
                    copy_units(c[k], cnew[r], 0, hd)
        hold(scratch)
    set_team(team)
    hold(owned)


@jit(inline=True)
def lstm_columns_gates(g, bias, w_peep, peephole, cT, hT, n):
    """Body of :func:`lstm_columns_forward`, inlined with ``peephole`` a literal: with the
    flag a run-time value, the branches in the loops kept them scalar (6x slower)."""
    hd = hT.shape[0]
    for u in range(2 * hd):  # i, f
        row, bu = g[u], bias[u]
        if peephole:
            pu, cr = w_peep[u // hd, u % hd], cT[u % hd]
            for i in range(n):
                row[i] = sigmoid(row[i] + bu + pu * cr[i])
        else:
            for i in range(n):
                row[i] = sigmoid(row[i] + bu)
    for u in range(2 * hd, 3 * hd):  # g
        row, bu = g[u], bias[u]
        for i in range(n):
            row[i] = tanh(row[i] + bu)
    for j in range(hd):  # c', o, h'
        ig, fg, gg, og, cr, hr = g[j], g[hd + j], g[2 * hd + j], g[3 * hd + j], cT[j], hT[j]
        bo = bias[3 * hd + j]
        if peephole:
            po = w_peep[2, j]
            for i in range(n):
                cv = fg[i] * cr[i] + ig[i] * gg[i]
                cr[i] = cv
                ov = sigmoid(og[i] + bo + po * cv)
                og[i] = ov  # kept for backward in training
                hr[i] = ov * tanh(cv)
        else:
            for i in range(n):
                cv = fg[i] * cr[i] + ig[i] * gg[i]
                cr[i] = cv
                ov = sigmoid(og[i] + bo)
                og[i] = ov
                hr[i] = ov * tanh(cv)


@jit
def lstm_columns_forward(g, bias, w_peep, peephole, cT, hT, n):
    """The gate math of a step in the transposed layout (``columns.forward_columns``), for
    the first n samples. g (4H, >= n) in: the step's product [W_ih | W_hh] @ [x; h], a
    sample per column; overwritten (activations). bias (4H,): b_ih + b_hh. w_peep (3, H).
    cT, hT (H, >= n) in/out: the state, a sample per column. Every loop runs along one
    row of n samples: no per-sample loop start or overlap check as in the row layout. On
    return g holds the activations i, f, g, o (the training forward keeps them)."""
    if peephole:
        lstm_columns_gates(g, bias, w_peep, True, cT, hT, n)
    else:
        lstm_columns_gates(g, bias, w_peep, False, cT, hT, n)


@jit(inline=True)
def lstm_columns_grads(gt, cell, cprev, dhT, doutT, dcT, w_peep, peephole, peep_sums, n):
    """Body of :func:`lstm_columns_backward`, inlined with ``peephole`` a literal."""
    hd = dcT.shape[0]
    one = dcT.dtype.type(1)
    for j in range(hd):
        ig, fg, gg, og = gt[j], gt[hd + j], gt[2 * hd + j], gt[3 * hd + j]
        c1, c0, dh, do, dc = cell[j], cprev[j], dhT[j], doutT[j], dcT[j]
        pi, pf, po = w_peep[0, j], w_peep[1, j], w_peep[2, j]
        for i in range(n):
            tc = tanh(c1[i])
            grad_h = dh[i] + do[i]
            o = og[i]
            dao = (grad_h * tc) * (o * (one - o))
            grad_c = dc[i] + (grad_h * o) * (one - tc * tc)
            if peephole:
                grad_c += dao * po
            iv, fv, gv = ig[i], fg[i], gg[i]
            dai = (grad_c * gv) * (iv * (one - iv))
            daf = (grad_c * c0[i]) * (fv * (one - fv))
            grad_c0 = grad_c * fv
            if peephole:
                grad_c0 += dai * pi + daf * pf
            dc[i] = grad_c0
            ig[i] = dai
            fg[i] = daf
            gg[i] = (grad_c * iv) * (one - gv * gv)
            og[i] = dao
        if peephole:
            si, sf, so = peep_sums[0, j], peep_sums[1, j], peep_sums[2, j]
            for i in range(n):
                si += ig[i] * c0[i]
                sf += fg[i] * c0[i]
                so += og[i] * c1[i]
            peep_sums[0, j], peep_sums[1, j], peep_sums[2, j] = si, sf, so


@jit(reassociate=False)
def lstm_columns_backward(gt, cell, cprev, dhT, doutT, dcT, w_peep, peephole, peep_sums, n):
    """The gate gradients of a step in the transposed layout (``columns.backward_columns``),
    for its n samples, the math of :func:`lstm_gates_backward` along rows of samples. gt
    (4H, n) in: the activations i, f, g, o; out: the gradients of the pre-activations. cell
    (H, n) in: c'; cprev (H, >= n) in: c. dhT, doutT (H, >= n) in: the gradient from the
    next step and of this output; dcT (H, >= n) in/out: of c' in, of c out. peep_sums (3,
    H) += the peephole gradients (when ``peephole``). Without ``reassoc`` like the row
    kernels (see ``fastseq._jit``)."""
    if peephole:
        lstm_columns_grads(gt, cell, cprev, dhT, doutT, dcT, w_peep, True, peep_sums, n)
    else:
        lstm_columns_grads(gt, cell, cprev, dhT, doutT, dcT, w_peep, False, peep_sums, n)


@jit(parallel=True)
def lstm_backward(
    x, w_ih, w_hh, w_peep, peephole, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, dout, out_col, dh, dc, gates, hprev, cprev, cnew, dx, accumulate_dx, dw_ih, dw_hh,
    db_ih, db_hh, dw_peep, rmask, part_w_ih, part_w_hh,
):  # fmt: skip
    """Backward pass of one layer and direction; ``dc`` (N, H) in/out like ``dh``.

    ``dw_peep`` (3, H) += the peephole gradients (when ``peephole``).
    """
    hd = dh.shape[1]
    n_chunks = chunk_samples.shape[0] - 1
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, w_peep, dout, dh, dc, gates, hprev, cprev, cnew, dx, rmask, part_w_ih, part_w_hh = borrow(
        (x, w_ih, w_hh, w_peep, dout, dh, dc, gates, hprev, cprev, cnew, dx, rmask, part_w_ih, part_w_hh)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    # B = W_hh of the per-step dh = dG @ W_hh
    w_hh_panels = step_panels(any_layout(w_hh), chunk_samples, lengths, False)
    w_ih_panels = pack_weights(any_layout(w_ih))  # B = W_ih of every chunk's dx = dG @ W_ih
    pieces = one_chunk_pieces(chunk_samples, gates.shape[0])
    part_b = np.empty((part_w_ih.shape[0], 4 * hd), dh.dtype)
    part_peep = np.zeros((n_chunks, 3, hd), dh.dtype)
    owned = (w_hh_panels, w_ih_panels, part_b, part_peep)  # held to the end
    w_hh_panels, w_ih_panels, part_b, part_peep = borrow(owned)
    for ch in prange(n_chunks):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        scratch = (np.empty((nc, 4 * hd), dh.dtype), np.empty(nc, np.int64))  # held to the chunk's end
        dg, rows = borrow(scratch)  # rows: a step's rows of the workspace
        for s in range(lengths[s0] - 1, -1, -1):
            n = batch_sizes[ch, s]
            for i in range(n):
                rows[i] = packed_row(r0, offsets[ch], lengths[s0 + i], i, s, reverse)
            lstm_rows_backward(gates, rows[:n], dh, dout, out_col, dc, cnew, cprev, w_peep, peephole, s0)
            for i in range(n):
                copy_units(gates[rows[i]], dg[i], 0, 4 * hd)
            gemm_step_rows_back(dg[:n], w_hh, w_hh_panels, dh[s0 : s0 + n])
            mask_rows(dh, rmask, s0, n)
        if not pieces:  # else after the loop, split across threads
            gemm_large(gates[r0:r1], large_b(w_ih), w_ih_panels, dx[r0:r1], accumulate_dx)
        if part_w_ih.shape[0]:
            chunk_weight_grads(gates[r0:r1], x[r0:r1], hprev[r0:r1], part_w_ih[ch], part_w_hh[ch], part_b[ch])
        if peephole:
            peephole_sums(gates[r0:r1], cprev[r0:r1], cnew[r0:r1], part_peep[ch])
        hold(scratch)
    if pieces:
        gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, pieces)
    weight_grads(gates, x, hprev, part_w_ih, part_w_hh, part_b, dw_ih, dw_hh, db_ih, db_hh)
    if peephole:
        add_parts(part_peep, dw_peep)
    hold(owned)


@jit
def peephole_sums(dgates, cprev, cnew, out):
    """out (3, H) += the peephole gradients of rows dgates (Rc, 4H), cprev, cnew (Rc, H)."""
    hd = out.shape[1]
    for r in range(dgates.shape[0]):
        for j in range(hd):
            out[0, j] += dgates[r, j] * cprev[r, j]
            out[1, j] += dgates[r, hd + j] * cprev[r, j]
            out[2, j] += dgates[r, 3 * hd + j] * cnew[r, j]


@jit
def lstm_forward_units(
    x, w_ih, w_hh, b_ih, b_hh, w_peep, peephole, chunk_rows, chunk_samples, batch_sizes,
    offsets, lengths, reverse, out, out_col, out_rows, h, c, gates, hprev, cprev, cnew, training, rmask, parts,
    threads,
):  # fmt: skip
    """:func:`lstm_forward` for a batch in one chunk, each step's recurrent product and gate
    math split across ``parts`` threads by hidden units (see common.unit_bounds); the input
    projection is split by rows (of W_ih for short inputs: common.unit_projection). Short
    sequences of one or two samples read W_hh in place (common.unit_recurrent_panels). When
    the whole projection is computed first (training, or one block) and numba's team has
    ``threads`` >= ``parts``, every step runs in one parallel region
    (:func:`forward_steps_units`), else a region per step (:func:`forward_step_units`).
    Same arguments, plus ``parts`` and ``threads`` (numba's active thread count)."""
    hd, nb = h.shape[1], h.shape[0]
    units = unit_bounds(hd, parts)
    w_ih_panels = input_panels(w_ih, x.shape[0])
    w_hh_panels = unit_recurrent_panels(w_hh, 4, units, lengths[0], nb)  # part p: h @ (its rows of W_hh)^T
    gh = np.empty((parts, nb, 4 * widest_part(units)), h.dtype)
    # the gate math runs on compact rows (gate q of the part's unit u at q * hu + u), so
    # that it vectorises like the full rows of lstm_forward
    b_ih_p, b_hh_p, peep_p, g_p = unit_operands(b_ih, b_hh, w_peep, 4, units)
    zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(0))
    block, proj, s_next = unit_projection_start(x, w_ih, w_ih_panels, gates, lengths, parts)
    proj, base, s_next, h_buf, claims = steps_region_start(x, w_ih, w_ih_panels, offsets[0], lengths, reverse, block,
                                                           proj, s_next, parts, threads, h, rmask)  # fmt: skip
    step = (w_hh_panels, w_hh, gh, b_ih_p, b_hh_p, peep_p, g_p, peephole, c, h, out, out_col, out_rows, cnew, hprev,
            cprev, training, rmask, units, batch_sizes[0], offsets[0], lengths, reverse)  # fmt: skip
    if claims.shape[0]:
        forward_steps_units(h_buf, proj, base, claims, *step)
        return
    h_in = np.empty((nb, hd), h.dtype)
    for s in range(lengths[0]):
        proj, base, s_next = unit_step_start(x, w_ih, w_ih_panels, offsets[0], lengths, s, reverse, block, parts,
                                             proj, base, s_next, h, rmask, batch_sizes[0, s], h_in)  # fmt: skip
        forward_step_units(s, h_in, proj, base, *step)


@jit
def lstm_part_step(s, p, h_in, h_next, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, peep_p, g_p, peephole, c, h,
                   out, out_col, out_rows, cnew, hprev, cprev, training, rmask, units, batch_sizes_c, offsets_c,
                   lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`lstm_forward_units`: its units' product and gate math for
    the step's rows. h_in (N, H) in: the (masked) state every part's product reads; h_next
    (N, H) or no rows: where the part writes its units of the next step's h_in
    (``common.masked_units``); proj: the projection from packed row ``base``; panels,
    b_ih_p, b_hh_p, peep_p, g_p: per part (common.unit_operands); batch_sizes_c, offsets_c:
    the chunk's rows of ``batch_sizes`` and ``offsets``."""
    u0, u1 = units[p], units[p + 1]
    hu, n = u1 - u0, batch_sizes_c[s]
    if training:
        for i in range(n):
            r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
            copy_units(h_in[i], hprev[r], u0, u1)
            copy_units(c[i], cprev[r], u0, u1)
    unit_product(h_in[:n], panels, w_hh, 4, p, u0, hu, gh[p, :n, : 4 * hu])
    g = g_p[p, : 4 * hu]
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        gather_units(proj[r - base], 4, u0, g)
        lstm_cell_forward(g, gh[p, i, : 4 * hu], b_ih_p[p, : 4 * hu], b_hh_p[p, : 4 * hu], peep_p[p],
                          peephole, c[i, u0:u1], h[i, u0:u1])  # fmt: skip
        copy_units(h[i], out[output_row(out_rows, r), out_col:], u0, u1)
        if training:
            scatter_units(g, 4, u0, proj[r - base])
            copy_units(c[i], cnew[r], u0, u1)
    if h_next.shape[0]:
        masked_units(h, rmask, n, u0, u1, h_next)


@jit(parallel=True)
def forward_steps_units(h_buf, proj, base, claims, panels, w_hh, gh, b_ih_p, b_hh_p, peep_p, g_p, peephole, c, h,
                        out, out_col, out_rows, cnew, hprev, cprev, training, rmask, units, batch_sizes_c, offsets_c,
                        lengths, reverse):  # fmt: skip
    """Every step of :func:`lstm_forward_units` in one parallel region (kernels.sync): thread
    t takes part t of each step, then waits for the others. h_buf (2, N, H): the state the
    products read at even and odd steps (h_buf[0] filled first); claims: the steps' counters
    (``sync.step_claims``). Other arguments: :func:`lstm_part_step`'s."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for s in range(lengths[0]):
            at = s * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                lstm_part_step(s, p, h_buf[s % 2], h_buf[(s + 1) % 2], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p,
                               peep_p, g_p, peephole, c, h, out, out_col, out_rows, cnew, hprev, cprev, training,
                               rmask, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def forward_step_units(s, h_in, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, peep_p, g_p, peephole, c, h, out,
                       out_col, out_rows, cnew, hprev, cprev, training, rmask, units, batch_sizes_c, offsets_c,
                       lengths, reverse):  # fmt: skip
    """Step s of :func:`lstm_forward_units`, its parts across threads (:func:`lstm_part_step`;
    h_in filled first). A parallel function of its own, so that the kernel's time loop
    around it stays serial code."""
    for p in prange(units.shape[0] - 1):
        lstm_part_step(s, p, h_in, h_in[:0], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, peep_p, g_p, peephole, c,
                       h, out, out_col, out_rows, cnew, hprev, cprev, training, rmask, units, batch_sizes_c,
                       offsets_c, lengths, reverse)  # fmt: skip


@jit
def lstm_backward_units(
    x, w_ih, w_hh, w_peep, peephole, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, dout, out_col, dh, dc, gates, hprev, cprev, cnew, dx, accumulate_dx, dw_ih, dw_hh,
    db_ih, db_hh, dw_peep, rmask, part_w_ih, part_w_hh, parts, threads,
):  # fmt: skip
    """:func:`lstm_backward` for :func:`lstm_forward_units`' layout: at each step each part
    takes its units' gate gradients and its share of dh = dG @ W_hh (its gate rows of W_hh,
    every unit of dh: partial sums added in part order at the next step)
    (:func:`lstm_backward_part`), all steps in one parallel region when numba's team has
    ``threads`` >= ``parts`` (:func:`backward_steps_units`), else a region per step; dx
    split by rows. ``part_w_ih``, ``part_w_hh`` have no slices (weight gradients over all
    rows at once)."""
    hd, nb = dh.shape[1], dh.shape[0]
    units = unit_bounds(hd, parts)
    w_hh_panels = pack_unit_gate_rows(w_hh, 4, units)  # part p: dG_p @ (its gate rows of W_hh)
    w_ih_panels = pack_weights(any_layout(w_ih))
    _, _, peep_p, g_p = unit_operands(w_peep[0, :0], w_peep[0, :0], w_peep, 4, units)  # compact rows
    dg_p = np.zeros((parts, nb, 4 * widest_part(units)), dh.dtype)  # zero past a part's 4*hu
    partial = np.empty((2, parts, nb, hd), dh.dtype)  # read one, write the other each step
    step = (gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev, peep_p, peephole, g_p, dg_p, w_hh_panels,
            units, batch_sizes[0], offsets[0], lengths, reverse)  # fmt: skip
    if threads >= parts:
        backward_steps_units(step_claims(lengths[0], parts), *step)
    else:
        for s in range(lengths[0] - 1, -1, -1):
            backward_step_units(s, *step)
    # the gradient of the initial state, from the products of the first step's rows
    unit_initial_dh(partial[lengths[0] % 2], rmask, batch_sizes[0, 0], dh)
    gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, parts)
    no_parts = np.empty((0, 4 * hd), dh.dtype)
    weight_grads(gates, x, hprev, part_w_ih, part_w_hh, no_parts, dw_ih, dw_hh, db_ih, db_hh)
    if peephole:
        peephole_sums(gates, cprev, cnew, dw_peep)


@jit
def lstm_backward_part(s, p, gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev, peep_p, peephole, g_p, dg_p,
                       panels, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`lstm_backward_units`: dh[:done] (the rows step s+1's
    products reached; later rows still hold their incoming gradient) = partial (2, parts,
    N, H), the half step s+1 wrote, summed over the parts, times the recurrent dropout
    mask, for its units; then its units' gate gradients for the step's rows (gates rows in:
    activations, out: gradients of the pre-activations, compact in dg_p[p]); then the
    other half's [p, :n] = dg_p[p, :n] @ its gate rows of W_hh (panels[p])."""
    k = lengths[0] - 1 - s  # steps taken before this one
    n, done = batch_sizes_c[s], batch_sizes_c[s + 1] if k else 0
    partial_in, partial_out = partial[k % 2], partial[(k + 1) % 2]
    u0, u1 = units[p], units[p + 1]
    hu = u1 - u0
    for i in range(done):
        sum_unit_parts(partial_in, rmask, i, u0, u1, dh[i])
    g = g_p[p, : 4 * hu]
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        gather_units(gates[r], 4, u0, g)
        lstm_cell_backward(g, dh[i, u0:u1], dout[r, out_col + u0 : out_col + u1], dc[i, u0:u1],
                           cnew[r, u0:u1], cprev[r, u0:u1], peep_p[p], peephole)  # fmt: skip
        scatter_units(g, 4, u0, gates[r])
        copy_units(g, dg_p[p, i], 0, 4 * hu)
    gemm_packed(dg_p[p, :n], panels[p], partial_out[p, :n], OVERWRITE)


@jit(parallel=True)
def backward_steps_units(claims, gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev, peep_p, peephole, g_p,
                         dg_p, panels, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Every step of :func:`lstm_backward_units` in one parallel region, last step first (see
    lstm.forward_steps_units; claims: the steps' counters, ``sync.step_claims``)."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for k in range(lengths[0]):
            at = k * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                lstm_backward_part(lengths[0] - 1 - k, p, gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev,
                                   peep_p, peephole, g_p, dg_p, panels, units, batch_sizes_c, offsets_c, lengths,
                                   reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def backward_step_units(s, gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev, peep_p, peephole, g_p, dg_p,
                        panels, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Step s of :func:`lstm_backward_units`, its parts across threads (:func:`lstm_backward_part`)."""
    for p in prange(units.shape[0] - 1):
        lstm_backward_part(s, p, gates, dh, partial, rmask, dout, out_col, dc, cnew, cprev, peep_p, peephole, g_p,
                           dg_p, panels, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip


@jit
def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, peephole, gx, gh, blocks):
    """One inference step for streaming (serial, no workspace). x (N, C); h, c (N, H)
    in/out; gx, gh (N, 4H) scratch; blocks: 1, or 4 to match :func:`lstm_step_units`
    bitwise (``gemm.step_product``)."""
    x, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, gx, gh = borrow(
        (x, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, gx, gh)
    )
    step_product(x, w_ih, gx, blocks)
    step_product(h, w_hh, gh, blocks)
    for i in range(x.shape[0]):
        lstm_cell_forward(gx[i], gh[i], b_ih, b_hh, w_peep, peephole, c[i], h[i])


@jit(parallel=True)
def lstm_step_units(
    x, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, peephole, h_in, gx, gh, b_ih_c, b_hh_c, peep_c, units
):
    """:func:`lstm_step` with the hidden units split across threads (one parallel region):
    part p computes units ``units[p] .. units[p+1]-1`` of every gate from its rows of W_ih
    and W_hh. Scratch: h_in (N, H); per part (parts, ...): gx, gh (N, 4*hu_max), b_ih_c,
    b_hh_c (4*hu_max,), peep_c (3, hu_max)."""
    copy_rows(h, h_in)
    for p in prange(units.shape[0] - 1):
        u0, u1 = units[p], units[p + 1]
        hu = u1 - u0
        part_step_operands(x, h_in, w_ih, w_hh, b_ih, b_hh, 4, u0, u1, gx[p], gh[p], b_ih_c[p], b_hh_c[p])
        copy_unit_columns(w_peep, u0, hu, peep_c[p])
        for i in range(x.shape[0]):
            lstm_cell_forward(gx[p, i, : 4 * hu], gh[p, i, : 4 * hu], b_ih_c[p, : 4 * hu], b_hh_c[p, : 4 * hu],
                              peep_c[p], peephole, c[i, u0:u1], h[i, u0:u1])  # fmt: skip
