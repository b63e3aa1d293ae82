"""Glue between the public classes and the kernels.

For one layer and direction: allocate the workspace, make the one kernel call, and return
what backward needs. Layers (many steps, packed rows) and cells (one step) both come here,
so every cell's math lives only in its kernel module.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastseq._threads import one_region_threads, partial_weight_grads, project_whole_input
from fastseq.kernels.columns import backward_columns, forward_columns
from fastseq.kernels.gemm import panel_columns
from fastseq.kernels.gru import gru_backward, gru_backward_units, gru_forward, gru_forward_units
from fastseq.kernels.lstm import lstm_backward, lstm_backward_units, lstm_forward, lstm_forward_units
from fastseq.kernels.rnn import rnn_backward, rnn_backward_units, rnn_forward, rnn_forward_units
from fastseq.registry import CELLS

#: Internal names of one direction's parameters, in the kernels' argument order.
WEIGHT_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_peep")


def absent_arrays(gate_rows, hidden, dtype):
    """Zero stand-ins for parameters a module does not have (``bias=False``, no peepholes):
    the kernels always take every argument. ``b_ih``, ``b_hh`` (G*H,), ``w_peep`` (3, H)."""
    return {
        "b_ih": np.zeros(gate_rows, dtype),
        "b_hh": np.zeros(gate_rows, dtype),
        "w_peep": np.zeros((3, hidden), dtype),
    }


def kernel_arrays(keys, table, absent):
    """``WEIGHT_KEYS`` -> arrays for a kernel: ``table[keys[k]]`` (parameters or their
    gradients, by public name) where the module has that parameter, else ``absent[k]``."""
    return {k: table[keys[k]] if k in keys else absent[k] for k in WEIGHT_KEYS}


class CellOptions(NamedTuple):
    """Cell variant switches (all False/True defaults give torch's cells)."""

    relu: bool = False  # RNN: relu instead of tanh
    peephole: bool = False  # LSTM: peephole connections
    reset_after: bool = True  # GRU: reset gate after the hidden GEMM (torch)


#: ``out_rows`` of a pass whose output is packed (see :func:`forward`).
NO_ROWS = np.empty(0, np.int64)


def no_mask(hidden, dtype):
    """The ``rmask`` of a pass without recurrent dropout: (0, H)."""
    return np.empty((0, hidden), dtype)


def projects_in_blocks(packing, w_hh, reverse, training) -> bool:
    """Whether a forward pass projects its input a block of steps at a time inside the kernel
    (inference), keeping no (R, G*H) projection; training keeps it for backward. So does a
    batch in one chunk that splits its projection across threads (bounded by
    _threads.ONE_CHUNK_PROJECTION_BYTES), and a reverse pass over unequal lengths split by
    units (its blocks are in time order; the chunks' kernels build reverse blocks in step
    order, ``kernels.common.step_ordered``). ``w_hh`` (G*H, H)."""
    row_bytes = w_hh.shape[0] * w_hh.dtype.itemsize
    return not (
        training
        or (reverse and not packing.equal_lengths and packing.unit_parts)
        or project_whole_input(packing, w_hh, packing.rows, row_bytes)
    )


#: The LSTM's and RNN's inference runs in the transposed layout
#: (``kernels.columns.forward_columns``) up to this hidden size, when the chunks' steps have
#: COLUMNS_MIN_SAMPLES samples on average; at unequal lengths only up to
#: COLUMNS_UNEQUAL_MAX_HIDDEN. Measured (float32,
#: Zen 5, the kernels alone, both threads, T=50, C=H, median time columns / rows): equal
#: lengths, N=64-1024: H=8 0.28-0.32, H=16 0.54-0.59, H=24 0.67-0.69, H=32 0.80-0.86, H=40
#: 0.85-0.89, H=48 0.91-0.99, H=64 1.2-1.5; chunks of 16 samples (N=32): H=16 0.81, H=32
#: 1.25; of 1-8: 1.8-5.0 (a step streams all of W for a panel of NR=32 columns). Random
#: lengths: H=16: N=256 0.71, N=1024 (T=100) 0.56, N=64 1.08; H=32: N=1024 0.93, N=256 1.01,
#: N=64 1.53 (the shrinking batch's last steps). The RNN (fifteenth session, the same way):
#: H=16: N=64-1024 0.75-0.93 (N=32 0.94), random lengths N=256 0.75, N=1024 (T=100) 0.60;
#: H=32: 1.00 at N=64-256, 1.17 at N=1024, random lengths 1.21; H=48 0.92, H=64 1.13.
COLUMNS_MAX_HIDDEN = {"lstm": 40, "rnn": 16}
COLUMNS_UNEQUAL_MAX_HIDDEN = {"lstm": 16, "rnn": 16}
COLUMNS_MIN_SAMPLES = 32
#: Training (the forward keeping its workspace, and backward) runs in the transposed layout
#: up to COLUMNS_TRAIN_MAX_HIDDEN (COLUMNS_UNEQUAL_MAX_HIDDEN at unequal lengths), when the
#: chunks' steps have on average at least COLUMNS_TRAIN_MIN_SAMPLES samples and
#: COLUMNS_TRAIN_SAMPLES_PER_UNIT per hidden unit. Measured (float32, Zen 5, both threads,
#: a training step, A/B medians in process, columns / rows), LSTM, T=50 unless said, by
#: samples per chunk: 128: H=16 0.50-0.56 (T=20, 100), 24 0.69, 32 0.77, 48 0.71, 64 0.85,
#: 96 0.89, 128 0.93; 512: H=16 0.53 (T=20), 0.46 (T=100), 32 0.83, 48 0.79, 64 1.05-1.11
#: (T=20, 50); 256: H=64 0.89; 1024: H=16 0.60; 64: H=64 0.99; 32: H=16 0.56, 32 0.85; 16:
#: H=32 1.25, 64 1.55 (the target shape 32x100x64); 8: H=32 1.93. Random lengths, 128 per
#: chunk: H=16 0.61, 32 0.95, 48 1.05; 512 per chunk, H=16 0.53; 2 layers x 2 directions,
#: H=16 0.67. RNN, H=16: 512 per chunk 0.82 (T=20), 128 0.75 (T=100), 64 0.93, 32 0.98,
#: 16 1.02; random lengths 0.95-1.0; H=24 1.18, 32 1.42, 48 1.06 (its row kernels read x and
#: dout in place and keep less per row). See docs/performance.md.
COLUMNS_TRAIN_MAX_HIDDEN = {"lstm": 48, "rnn": 16}
COLUMNS_TRAIN_MIN_SAMPLES = {"lstm": 32, "rnn": 64}
COLUMNS_TRAIN_SAMPLES_PER_UNIT = 2


def runs_in_columns(cell, packing, hidden, training, rmask) -> bool:
    """Whether a forward pass (and in training its backward) runs in the transposed layout
    (see COLUMNS_MAX_HIDDEN, COLUMNS_TRAIN_MAX_HIDDEN): the LSTM and the RNN, without
    recurrent dropout, not split by units."""
    if cell not in COLUMNS_MAX_HIDDEN or rmask is not None or packing.unit_parts:
        return False
    cap = (COLUMNS_TRAIN_MAX_HIDDEN if training else COLUMNS_MAX_HIDDEN)[cell]
    if not packing.equal_lengths:
        cap = min(cap, COLUMNS_UNEQUAL_MAX_HIDDEN[cell])
    if hidden > cap:
        return False
    if training:
        samples = max(COLUMNS_TRAIN_MIN_SAMPLES[cell], COLUMNS_TRAIN_SAMPLES_PER_UNIT * hidden)
    else:
        samples = COLUMNS_MIN_SAMPLES
    chunks, longest = packing.batch_sizes.shape
    return packing.rows >= samples * chunks * longest


def forward(cell, opts, w, x, states, packing, out, out_col, reverse, training, take=np.empty,
            rmask=None, out_rows=None, x_rows=None, calls=None):  # fmt: skip
    """Run one layer and direction forward.

    Parameters
    ----------
    cell : str
        Registry key.
    opts : CellOptions
    w : dict
        ``WEIGHT_KEYS`` -> arrays (see the shapes legend in fastseq.kernels; ``w_peep``
        (3, H) is only read for a peephole LSTM).
    x : ndarray (R, C), or (T*N, C) with ``x_rows``
        Packed input, or the unpacked input when ``x_rows`` is given.
    states : tuple of ndarray (N, H)
        Initial state(s) in state order (``packing.sort``), overwritten with the final state(s).
    packing : fastseq._packing.Packing
    out : ndarray (R, D*H), or (T*N, D*H) with ``out_rows``
        Output; columns ``out_col:out_col+H`` are written.
    reverse, training : bool
    take : callable (shape, dtype) -> ndarray
        Allocator for the workspace (a layer's pool, or np.empty).
    rmask : ndarray (N, H), optional
        Recurrent (variational) dropout mask in state order, applied to the state every
        recurrent GEMM reads, the same at every step; kept in the workspace for backward.
    out_rows : ndarray (R,) of int64, optional
        Row of ``out`` for each packed row (``packing.out_rows``): the output is written
        unpacked, at time-major rows t*N + sample. None: ``out`` is packed.
    x_rows : ndarray (R,) of int64, optional
        Row of ``x`` for each packed row (``packing.out_rows``): the kernel gathers the input
        rows itself. Only where :func:`projects_in_blocks` holds and the packing is not
        split by units.

    Returns
    -------
    dict or None
        The workspace backward needs (training), else None. The LSTM and the RNN at small H
        run in the transposed layout (:func:`runs_in_columns`, with other thresholds in
        training and inference): where only one of the two does, the same outputs and
        states within rounding, not bitwise.
    """
    rows, hd, dt = packing.rows, states[0].shape[1], x.dtype
    in_blocks = projects_in_blocks(packing, w["w_hh"], reverse, training)
    if x_rows is not None and (not in_blocks or packing.unit_parts):
        raise ValueError("x_rows needs a pass that projects in blocks, split by chunks")
    x_rows = NO_ROWS if x_rows is None else x_rows
    out_rows = NO_ROWS if out_rows is None else out_rows
    if runs_in_columns(cell, packing, hd, training, rmask):
        lstm = cell == "lstm"
        ws = columns_workspace(cell, packing.batch, x.shape[1], hd, rows if training else 0, take, dt)
        _call(calls, forward_columns, x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_peep"], lstm,
              opts.peephole if lstm else opts.relu, *packing.kernel_args, reverse, out, out_col,
              out_rows, states[0], states[-1], x_rows, *(ws[k] for k in COLUMNS_KEYS))  # fmt: skip
        return dict(ws, x=x) if training else None
    gates = take((0 if in_blocks else rows, CELLS[cell].gates * hd), dt)
    ws_rows = rows if training else 0
    hprev = take((ws_rows, hd), dt)
    pk = (*packing.kernel_args, reverse)
    rmask = no_mask(hd, dt) if rmask is None else rmask
    ws = {"x": x, "gates": gates, "hprev": hprev, "rmask": rmask}
    if cell == "rnn":
        args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], opts.relu, *pk,
                out, out_col, out_rows, states[0], gates, hprev, training, rmask)  # fmt: skip
        if packing.unit_parts:
            _call(calls, rnn_forward_units, *args, packing.unit_parts, one_region_threads())
        else:
            _call(calls, rnn_forward, *args, x_rows)
    elif cell == "lstm":
        ws["cprev"] = take((ws_rows, hd), dt)
        ws["cnew"] = take((ws_rows, hd), dt)
        args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_peep"], opts.peephole, *pk,
                out, out_col, out_rows, states[0], states[1], gates, hprev, ws["cprev"], ws["cnew"], training,
                rmask)  # fmt: skip
        if packing.unit_parts:
            _call(calls, lstm_forward_units, *args, packing.unit_parts, one_region_threads())
        else:
            _call(calls, lstm_forward, *args, x_rows)
    else:
        ws["hn"] = take((ws_rows, hd), dt)
        args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], *pk,
                out, out_col, out_rows, states[0], gates, hprev, ws["hn"], training, rmask)  # fmt: skip
        if packing.unit_parts:  # reset_after only (_threads.unit_parts)
            _call(calls, gru_forward_units, *args, packing.unit_parts, one_region_threads())
        else:
            _call(calls, gru_forward, *args[:5], opts.reset_after, *args[5:], x_rows)
    return ws if training else None


#: The forward kernels whose last argument is :func:`fastseq._threads.one_region_threads`,
#: asked again at every call (it depends on the kernels running at the time).
REGION_THREADS_KERNELS = (rnn_forward_units, lstm_forward_units, gru_forward_units)


def _call(calls, kernel, *args):
    """``kernel(*args)``, first appending ``(kernel, args)`` to ``calls`` unless it is None."""
    if calls is not None:
        calls.append((kernel, args))
    kernel(*args)


#: The transposed layout's workspace, in ``columns.forward_columns``' argument order.
COLUMNS_KEYS = ("gates_t", "cell_t", "c_init", "xh")


def columns_workspace(cell, batch, input_size, hidden, rows, take, dtype):
    """The flat workspace buffers of a pass in the transposed layout (see
    ``kernels.columns``) over ``rows`` packed rows: gates_t (R*G*H,), cell_t (R*H,) and
    c_init (N*H,) (LSTM, else empty), xh (R*P*NR,). ``rows`` 0 (inference): all empty."""
    nr = panel_columns(dtype)
    lstm = cell == "lstm"
    return {
        "gates_t": take((rows * CELLS[cell].gates * hidden,), dtype),
        "cell_t": take((rows * hidden if lstm else 0,), dtype),
        "c_init": take((batch * hidden if lstm and rows else 0,), dtype),
        "xh": take((rows * (input_size + hidden + nr - 1) // nr * nr,), dtype),
    }


#: Workspace entries that belong to the kernels (not the layer input "x").
SCRATCH_KEYS = ("gates", "hprev", "cprev", "cnew", "hn", *COLUMNS_KEYS)


def backward(cell, opts, w, ws, dout, out_col, dstates, packing, reverse, dx, accumulate_dx, grads,
             take=np.empty, give=None):  # fmt: skip
    """Run one layer and direction backward, consuming ``ws`` (its buffers are overwritten).

    ``dout`` (R, D*H): gradient of the packed output (columns ``out_col:out_col+H`` read).
    ``dstates``: tuple of (N, H), gradient of the final state(s) in state order,
    overwritten with the gradient of the initial state(s). ``dx`` (R, C): written, or added
    to when ``accumulate_dx``. ``grads``: ``WEIGHT_KEYS`` -> arrays the parameter gradients
    are added into. ``take(shape, dtype)`` allocates the scratch for per-chunk partial
    weight gradients (none when :func:`fastseq._threads.partial_weight_grads` says 0),
    handed to ``give`` afterwards (a layer's workspace pool).
    """
    pk = (*packing.kernel_args, reverse)
    w_ih, w_hh = w["w_ih"], w["w_hh"]
    if "gates_t" in ws:  # the transposed layout (runs_in_columns)
        lstm = cell == "lstm"
        backward_columns(w_ih, w_hh, w["w_peep"], lstm, opts.peephole if lstm else opts.relu, *pk, dout, out_col,
                         dstates[0], dstates[-1], *(ws[k] for k in COLUMNS_KEYS), dx, accumulate_dx,
                         *(grads[k] for k in WEIGHT_KEYS))  # fmt: skip
        return
    n_parts = partial_weight_grads(packing, w_ih.shape[1] + w_hh.shape[1])
    parts = (
        take((n_parts,) + w_ih.shape, w_ih.dtype),
        take((n_parts,) + w_hh.shape, w_hh.dtype),
    )
    x, gates, hprev, rmask = ws["x"], ws["gates"], ws["hprev"], ws["rmask"]
    if cell == "rnn":
        args = (x, w_ih, w_hh, opts.relu, *pk, dout, out_col, dstates[0], gates, hprev, dx, accumulate_dx,
                grads["w_ih"], grads["w_hh"], grads["b_ih"], grads["b_hh"], rmask, *parts)  # fmt: skip
        if packing.unit_parts:
            rnn_backward_units(*args, packing.unit_parts, one_region_threads())
        else:
            rnn_backward(*args)
    elif cell == "lstm":
        args = (x, w_ih, w_hh, w["w_peep"], opts.peephole, *pk, dout, out_col, dstates[0], dstates[1],
                gates, hprev, ws["cprev"], ws["cnew"], dx, accumulate_dx, grads["w_ih"], grads["w_hh"],
                grads["b_ih"], grads["b_hh"], grads["w_peep"], rmask, *parts)  # fmt: skip
        if packing.unit_parts:
            lstm_backward_units(*args, packing.unit_parts, one_region_threads())
        else:
            lstm_backward(*args)
    else:
        args = (x, w_ih, w_hh, *pk, dout, out_col, dstates[0], gates, hprev, ws["hn"], dx, accumulate_dx,
                grads["w_ih"], grads["w_hh"], grads["b_ih"], grads["b_hh"], rmask, *parts)  # fmt: skip
        if packing.unit_parts:  # reset_after only
            gru_backward_units(*args, packing.unit_parts, one_region_threads())
        else:
            gru_backward(*args[:3], opts.reset_after, *args[3:])
    if give is not None:
        for part in parts:
            give(part)
