"""Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu (G = 1).

Workspace kept for backward: ``gates`` (R, H) holds h' (the activation's output, from which
its derivative is computed) and ``hprev`` (R, H).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastseq._jit import jit
from fastseq.kernels.activations import tanh
from fastseq.kernels.common import (
    chunk_projection_start,
    chunk_team,
    chunk_weight_grads,
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
    own_rows,
    pack_unit_gate_rows,
    packed_row,
    part_step_operands,
    projection_block,
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
def rnn_cell_forward(g, gh, b_ih, b_hh, relu, h):
    """One sample, one step. g (H,) in: input projection, out: h'. gh (H,) in: recurrent
    GEMM row. b_ih, b_hh (H,). h (H,) out: h'."""
    zero = h.dtype.type(0)
    for j in range(h.shape[0]):
        a = g[j] + b_ih[j] + gh[j] + b_hh[j]
        if relu:
            y = zero if a < zero else a  # NaN passes through, as in torch
        else:
            y = tanh(a)
        h[j] = y
        g[j] = y


@jit(inline=True)
def rnn_cell_backward(g, dh, dout, relu):
    """One sample, one step. g (H,) in: h', out: gradient of the pre-activation.
    dh (H,) in: gradient from the next step; dout (H,) in: gradient of this output."""
    zero = g.dtype.type(0)
    one = g.dtype.type(1)
    for j in range(g.shape[0]):
        y = g[j]
        grad = dh[j] + dout[j]
        if relu:
            g[j] = grad if y > zero else zero
        else:
            g[j] = grad * (one - y * y)


@jit(inline=True)
def rnn_columns_gates(g, bias, relu, hT, n):
    """Body of :func:`rnn_columns_forward`, inlined with ``relu`` a literal."""
    zero = hT.dtype.type(0)
    for j in range(hT.shape[0]):
        row, hr, bj = g[j], hT[j], bias[j]
        for i in range(n):
            a = row[i] + bj
            if relu:
                hr[i] = zero if a < zero else a  # NaN passes through, as in torch
            else:
                hr[i] = tanh(a)


@jit
def rnn_columns_forward(g, bias, relu, hT, n):
    """A step's nonlinearity in the transposed layout (``columns.forward_columns``), for the
    first n samples: hT (H, >= n) out = act(g + bias), g (H, >= n) in: the step's product
    [W_ih | W_hh] @ [x; h], a sample per column; bias (H,): b_ih + b_hh."""
    if relu:
        rnn_columns_gates(g, bias, True, hT, n)
    else:
        rnn_columns_gates(g, bias, False, hT, n)


@jit(inline=True)
def rnn_columns_grads(gt, dhT, doutT, relu, n):
    """Body of :func:`rnn_columns_backward`, inlined with ``relu`` a literal."""
    zero, one = dhT.dtype.type(0), dhT.dtype.type(1)
    for j in range(dhT.shape[0]):
        row, dh, do = gt[j], dhT[j], doutT[j]
        for i in range(n):
            y = row[i]
            grad = dh[i] + do[i]
            if relu:
                row[i] = grad if y > zero else zero
            else:
                row[i] = grad * (one - y * y)


@jit
def rnn_columns_backward(gt, dhT, doutT, relu, n):
    """A step's gradients in the transposed layout (``columns.backward_columns``), for its n
    samples, the math of :func:`rnn_cell_backward` along rows of samples: gt (H, n) in: h',
    out: the gradient of the pre-activation. dhT, doutT (H, >= n) in: the gradient from the
    next step and of this output."""
    if relu:
        rnn_columns_grads(gt, dhT, doutT, True, n)
    else:
        rnn_columns_grads(gt, dhT, doutT, False, n)


@jit(parallel=True)
def rnn_forward(
    x, w_ih, w_hh, b_ih, b_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, out, out_col, out_rows, h, gates, hprev, training, rmask, x_rows,
):  # fmt: skip
    """Forward pass of one layer and direction; ``relu`` selects the nonlinearity. ``x_rows``:
    see :func:`fastseq.kernels.common.projection_block`."""
    hd = h.shape[1]
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, b_ih, b_hh, out, out_rows, h, gates, hprev, rmask, x_rows = borrow(
        (x, w_ih, w_hh, b_ih, b_hh, out, out_rows, h, gates, hprev, rmask, x_rows)
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
        gh = np.empty((nc, hd), h.dtype)
        hm = np.empty((nc if rmask.shape[0] else 0, hd), h.dtype)
        hc, mask_c = own_rows(h, s0, nc), rmask[s0 : s0 + nc]  # the chunk's states, its own
        scratch = (block, gh, hm, hc)  # held to the chunk's end
        block, gh, hm, hc = borrow(scratch)
        for s in range(lengths[s0]):
            n = batch_sizes[ch, s]
            if s == s_next:
                proj, base, s_next = projection_block(x, w_ih, w_ih_panels, r0, offsets[ch], lengths[s0 : s0 + nc],
                                                      s, reverse, full, block, x_rows)  # fmt: skip
            h_in = masked_rows(hc, mask_c, 0, n, hm)
            gemm_step_rows(h_in, w_hh.T, w_hh_panels, gh[:n])
            for i in range(n):
                k = s0 + i
                r = packed_row(r0, offsets[ch], lengths[k], i, s, reverse)
                q = packed_row(r0, offsets[ch], lengths[k], i, s, reverse and not ordered) - base
                if training:
                    copy_units(h_in[i], hprev[r], 0, hd)
                rnn_cell_forward(proj[q], gh[i], b_ih, b_hh, relu, hc[i])
                copy_units(hc[i], out[output_row(out_rows, r), out_col:], 0, hd)
        copy_rows(hc, h[s0 : s0 + nc])  # the chunk's final states
        hold(scratch)
    set_team(team)
    hold(owned)


@jit(parallel=True)
def rnn_backward(
    x, w_ih, w_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths, reverse,
    dout, out_col, dh, gates, hprev, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh, rmask,
    part_w_ih, part_w_hh,
):  # fmt: skip
    """Backward pass of one layer and direction (consumes the forward's workspace)."""
    hd = dh.shape[1]
    n_chunks = chunk_samples.shape[0] - 1
    # the arrays of the time loops, without reference counts (kernels.refs)
    x, w_ih, w_hh, dout, dh, gates, hprev, dx, rmask, part_w_ih, part_w_hh = borrow(
        (x, w_ih, w_hh, dout, dh, gates, hprev, dx, rmask, part_w_ih, part_w_hh)
    )
    chunk_rows, chunk_samples, batch_sizes, offsets, lengths = borrow(
        (chunk_rows, chunk_samples, batch_sizes, offsets, lengths)
    )
    # B = W_hh of the per-step dh = dG @ W_hh
    w_hh_panels = step_panels(any_layout(w_hh), chunk_samples, lengths, False)
    w_ih_panels = pack_weights(any_layout(w_ih))  # B = W_ih of every chunk's dx = dG @ W_ih
    pieces = one_chunk_pieces(chunk_samples, gates.shape[0])
    part_b = np.empty((part_w_ih.shape[0], hd), dh.dtype)
    owned = (w_hh_panels, w_ih_panels, part_b)  # held to the end
    w_hh_panels, w_ih_panels, part_b = borrow(owned)
    for ch in prange(n_chunks):
        r0, r1, s0 = chunk_rows[ch], chunk_rows[ch + 1], chunk_samples[ch]
        nc = chunk_samples[ch + 1] - s0
        scratch = np.empty((nc, hd), dh.dtype)  # held to the chunk's end
        dg = borrow(scratch)
        for s in range(lengths[s0] - 1, -1, -1):
            n = batch_sizes[ch, s]
            for i in range(n):
                k = s0 + i
                r = packed_row(r0, offsets[ch], lengths[k], i, s, reverse)
                rnn_cell_backward(gates[r], dh[k], dout[r, out_col : out_col + hd], relu)
                copy_units(gates[r], dg[i], 0, hd)
            gemm_step_rows_back(dg[:n], w_hh, w_hh_panels, dh[s0 : s0 + n])
            mask_rows(dh, rmask, s0, n)
        if not pieces:  # else after the loop, split across threads
            gemm_large(gates[r0:r1], large_b(w_ih), w_ih_panels, dx[r0:r1], accumulate_dx)
        if part_w_ih.shape[0]:
            chunk_weight_grads(gates[r0:r1], x[r0:r1], hprev[r0:r1], part_w_ih[ch], part_w_hh[ch], part_b[ch])
        hold(scratch)
    if pieces:
        gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, pieces)
    weight_grads(gates, x, hprev, part_w_ih, part_w_hh, part_b, dw_ih, dw_hh, db_ih, db_hh)
    hold(owned)


@jit
def rnn_step(x, h, w_ih, w_hh, b_ih, b_hh, relu, gx, gh):
    """One inference step for streaming (serial, no workspace). x (N, C); h (N, H) in/out;
    gx, gh (N, H) scratch."""
    x, h, w_ih, w_hh, b_ih, b_hh, gx, gh = borrow((x, h, w_ih, w_hh, b_ih, b_hh, gx, gh))  # kernels.refs
    step_product(x, w_ih, gx, 1)
    step_product(h, w_hh, gh, 1)
    for i in range(x.shape[0]):
        rnn_cell_forward(gx[i], gh[i], b_ih, b_hh, relu, h[i])


@jit
def rnn_forward_units(
    x, w_ih, w_hh, b_ih, b_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths,
    reverse, out, out_col, out_rows, h, gates, hprev, training, rmask, parts, threads,
):  # fmt: skip
    """:func:`rnn_forward` for a batch in one chunk, each step's recurrent product and
    activation split across ``parts`` threads by hidden units, like
    :func:`fastseq.kernels.lstm.lstm_forward_units` (input projection, W_hh read in place,
    every step in one parallel region when it can). Same arguments as rnn_forward, plus
    ``parts`` and ``threads``."""
    hd, nb = h.shape[1], h.shape[0]
    units = unit_bounds(hd, parts)
    w_ih_panels = input_panels(w_ih, x.shape[0])
    w_hh_panels = unit_recurrent_panels(w_hh, 1, units, lengths[0], nb)  # part p: h @ (its rows of W_hh)^T
    gh = np.empty((parts, nb, widest_part(units)), h.dtype)
    b_ih_p, b_hh_p, _, g_p = unit_operands(b_ih, b_hh, np.empty((0, hd), h.dtype), 1, units)
    zero_padding(out, out_col, hd, out_rows, lengths, chunk_rows, chunk_samples, np.int64(0))
    block, proj, s_next = unit_projection_start(x, w_ih, w_ih_panels, gates, lengths, parts)
    proj, base, s_next, h_buf, claims = steps_region_start(x, w_ih, w_ih_panels, offsets[0], lengths, reverse, block,
                                                           proj, s_next, parts, threads, h, rmask)  # fmt: skip
    step = (w_hh_panels, w_hh, gh, b_ih_p, b_hh_p, g_p, relu, h, out, out_col, out_rows, hprev, training, rmask, units,
            batch_sizes[0], offsets[0], lengths, reverse)  # fmt: skip
    if claims.shape[0]:
        rnn_forward_steps_units(h_buf, proj, base, claims, *step)
        return
    h_in = np.empty((nb, hd), h.dtype)
    for s in range(lengths[0]):
        proj, base, s_next = unit_step_start(x, w_ih, w_ih_panels, offsets[0], lengths, s, reverse, block, parts,
                                             proj, base, s_next, h, rmask, batch_sizes[0, s], h_in)  # fmt: skip
        rnn_forward_step_units(s, h_in, proj, base, *step)


@jit
def rnn_part_step(s, p, h_in, h_next, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, relu, h, out, out_col,
                  out_rows, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`rnn_forward_units` (see lstm.lstm_part_step). Training: the
    masked state to ``hprev``, h' back to ``proj``'s rows."""
    u0, u1 = units[p], units[p + 1]
    hu, n = u1 - u0, batch_sizes_c[s]
    if training:
        for i in range(n):
            copy_units(h_in[i], hprev[packed_row(0, offsets_c, lengths[i], i, s, reverse)], u0, u1)
    unit_product(h_in[:n], panels, w_hh, 1, p, u0, hu, gh[p, :n, :hu])
    g = g_p[p, :hu]
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        gather_units(proj[r - base], 1, u0, g)
        rnn_cell_forward(g, gh[p, i, :hu], b_ih_p[p, :hu], b_hh_p[p, :hu], relu, h[i, u0:u1])
        copy_units(h[i], out[output_row(out_rows, r), out_col:], u0, u1)
        if training:
            copy_units(h[i], proj[r - base], u0, u1)
    if h_next.shape[0]:
        masked_units(h, rmask, n, u0, u1, h_next)


@jit(parallel=True)
def rnn_forward_steps_units(h_buf, proj, base, claims, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, relu, h, out, out_col,
                            out_rows, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths,
                            reverse):  # fmt: skip
    """Every step of :func:`rnn_forward_units` in one parallel region (see
    lstm.forward_steps_units)."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for s in range(lengths[0]):
            at = s * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                rnn_part_step(s, p, h_buf[s % 2], h_buf[(s + 1) % 2], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p,
                              g_p, relu, h, out, out_col, out_rows, hprev, training, rmask, units, batch_sizes_c,
                              offsets_c, lengths, reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def rnn_forward_step_units(s, h_in, proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, relu, h, out, out_col,
                           out_rows, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths,
                           reverse):  # fmt: skip
    """Step s of :func:`rnn_forward_units`, its parts across threads (see
    lstm.forward_step_units)."""
    for p in prange(units.shape[0] - 1):
        rnn_part_step(s, p, h_in, h_in[:0], proj, base, panels, w_hh, gh, b_ih_p, b_hh_p, g_p, relu, h, out, out_col,
                      out_rows, hprev, training, rmask, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip


@jit
def rnn_backward_units(
    x, w_ih, w_hh, relu, chunk_rows, chunk_samples, batch_sizes, offsets, lengths, reverse,
    dout, out_col, dh, gates, hprev, dx, accumulate_dx, dw_ih, dw_hh, db_ih, db_hh, rmask,
    part_w_ih, part_w_hh, parts, threads,
):  # fmt: skip
    """:func:`rnn_backward` for :func:`rnn_forward_units`' layout, as
    :func:`fastseq.kernels.lstm.lstm_backward_units` (:func:`rnn_backward_part`; all steps
    in one region when ``threads`` >= ``parts``); dx split by rows, the weight gradients
    over all rows at once (``part_w_ih``, ``part_w_hh`` have no slices)."""
    hd, nb = dh.shape[1], dh.shape[0]
    units = unit_bounds(hd, parts)
    w_hh_panels = pack_unit_gate_rows(w_hh, 1, units)  # part p: dG_p @ (its rows of W_hh)
    w_ih_panels = pack_weights(any_layout(w_ih))
    dg_p = np.zeros((parts, nb, widest_part(units)), dh.dtype)  # zero past a part's hu
    partial = np.empty((2, parts, nb, hd), dh.dtype)  # read one, write the other each step
    step = (gates, dh, partial, rmask, dout, out_col, relu, dg_p, w_hh_panels, units, batch_sizes[0], offsets[0],
            lengths, reverse)  # fmt: skip
    if threads >= parts:
        rnn_backward_steps_units(step_claims(lengths[0], parts), *step)
    else:
        for s in range(lengths[0] - 1, -1, -1):
            rnn_backward_step_units(s, *step)
    # the gradient of the initial state, from the products of the first step's rows
    unit_initial_dh(partial[lengths[0] % 2], rmask, batch_sizes[0, 0], dh)
    gemm_split_rows(gates, large_b(w_ih), w_ih_panels, dx, accumulate_dx, parts)
    no_parts = np.empty((0, hd), dh.dtype)
    weight_grads(gates, x, hprev, part_w_ih, part_w_hh, no_parts, dw_ih, dw_hh, db_ih, db_hh)


@jit
def rnn_backward_part(s, p, gates, dh, partial, rmask, dout, out_col, relu, dg_p, panels, units, batch_sizes_c,
                      offsets_c, lengths, reverse):  # fmt: skip
    """Part p of step s of :func:`rnn_backward_units` (see lstm.lstm_backward_part): its
    units' gradients of the pre-activation for the step's rows (gates rows in: h', out: the
    gradients), then its share of dh through its rows of W_hh."""
    k = lengths[0] - 1 - s  # steps taken before this one
    n, done = batch_sizes_c[s], batch_sizes_c[s + 1] if k else 0
    partial_in, partial_out = partial[k % 2], partial[(k + 1) % 2]
    u0, u1 = units[p], units[p + 1]
    hu = u1 - u0
    for i in range(done):
        sum_unit_parts(partial_in, rmask, i, u0, u1, dh[i])
    for i in range(n):
        r = packed_row(0, offsets_c, lengths[i], i, s, reverse)
        rnn_cell_backward(gates[r, u0:u1], dh[i, u0:u1], dout[r, out_col + u0 : out_col + u1], relu)
        copy_units(gates[r, u0:u1], dg_p[p, i], 0, hu)
    gemm_packed(dg_p[p, :n], panels[p], partial_out[p, :n], OVERWRITE)


@jit(parallel=True)
def rnn_backward_steps_units(claims, gates, dh, partial, rmask, dout, out_col, relu, dg_p, panels, units,
                             batch_sizes_c, offsets_c, lengths, reverse):  # fmt: skip
    """Every step of :func:`rnn_backward_units` in one parallel region, last step first (see
    lstm.forward_steps_units; claims: the steps' counters, ``sync.step_claims``)."""
    parts = units.shape[0] - 1
    for t in prange(parts):
        for k in range(lengths[0]):
            at = k * (parts + 1)
            p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
            while p >= 0:
                rnn_backward_part(lengths[0] - 1 - k, p, gates, dh, partial, rmask, dout, out_col, relu, dg_p,
                                  panels, units, batch_sizes_c, offsets_c, lengths, reverse)  # fmt: skip
                part_done(claims, at, parts)
                p = wait_or_take(claims, at, parts)


@jit(parallel=True)
def rnn_backward_step_units(s, gates, dh, partial, rmask, dout, out_col, relu, dg_p, panels, units, batch_sizes_c,
                            offsets_c, lengths, reverse):  # fmt: skip
    """Step s of :func:`rnn_backward_units`, its parts across threads (:func:`rnn_backward_part`)."""
    for p in prange(units.shape[0] - 1):
        rnn_backward_part(s, p, gates, dh, partial, rmask, dout, out_col, relu, dg_p, panels, units, batch_sizes_c,
                          offsets_c, lengths, reverse)  # fmt: skip


@jit(parallel=True)
def rnn_step_units(x, h, w_ih, w_hh, b_ih, b_hh, relu, h_in, gx, gh, b_ih_c, b_hh_c, units):
    """:func:`rnn_step` with the hidden units split across threads (one parallel region):
    part p computes units ``units[p] .. units[p+1]-1`` from its rows of W_ih and W_hh.
    Scratch: h_in (N, H); per part (parts, ...): gx, gh (N, hu_max), b_ih_c, b_hh_c
    (hu_max,)."""
    copy_rows(h, h_in)
    for p in prange(units.shape[0] - 1):
        u0, u1 = units[p], units[p + 1]
        hu = u1 - u0
        part_step_operands(x, h_in, w_ih, w_hh, b_ih, b_hh, 1, u0, u1, gx[p], gh[p], b_ih_c[p], b_hh_c[p])
        for i in range(x.shape[0]):
            rnn_cell_forward(gx[p, i, :hu], gh[p, i, :hu], b_ih_c[p, :hu], b_hh_c[p, :hu], relu, h[i, u0:u1])
