"""Compile (or load from the disk cache) every kernel specialisation fastseq uses."""

from __future__ import annotations

import math

import numba
import numpy as np

from fastseq import _engine, _threads, cells, layers
from fastseq.kernels import columns, common, gru, lstm, rnn
from fastseq.registry import CELLS

KERNELS = {
    "rnn_forward": rnn.rnn_forward, "rnn_backward": rnn.rnn_backward,
    "lstm_forward": lstm.lstm_forward, "lstm_backward": lstm.lstm_backward,
    "lstm_forward_units": lstm.lstm_forward_units, "lstm_backward_units": lstm.lstm_backward_units,
    "gru_forward": gru.gru_forward, "gru_backward": gru.gru_backward,
    "rnn_step": rnn.rnn_step, "lstm_step": lstm.lstm_step, "gru_step": gru.gru_step,
    "rnn_forward_units": rnn.rnn_forward_units, "rnn_backward_units": rnn.rnn_backward_units,
    "gru_forward_units": gru.gru_forward_units, "gru_backward_units": gru.gru_backward_units,
    "rnn_step_units": rnn.rnn_step_units, "lstm_step_units": lstm.lstm_step_units,
    "gru_step_units": gru.gru_step_units,
    "add_weight_grad": common.add_weight_grad, "weight_grads": common.weight_grads,
    "gather_rows": common.gather_rows, "unpack_rows": common.unpack_rows,
    "team_thread_ids": _threads.team_thread_ids,
    "forward_columns": columns.forward_columns, "backward_columns": columns.backward_columns,
}  # fmt: skip

_LAYERS = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}
_CELLS = {"rnn": cells.RNNCell, "lstm": cells.LSTMCell, "gru": cells.GRUCell}


def tasks(dtypes=("float32", "float64")):
    """(description, callable) pairs: a tiny forward + backward of every cell and dtype,
    through a layer and through a cell, which is exactly what real calls compile."""
    out = []
    for dtype in dtypes:
        for name, cls in _LAYERS.items():
            out.append(
                (
                    f"{name} {dtype}",
                    lambda cls=cls, dt=dtype, name=name: _exercise(cls, _CELLS[name], np.dtype(dt)),
                )
            )
    return out


def _exercise(layer_cls, cell_cls, dtype):
    layer = layer_cls(2, 3, num_layers=2, bidirectional=True, dtype=dtype, seed=0)
    x = np.zeros((3, 2, 2), dtype)
    out, _ = layer(x, lengths=[3, 2])
    layer.backward(np.ones_like(out))
    layer = layer_cls(2, 3, batch_first=True, dtype=dtype, seed=0)  # strided (N, T, C) views
    out, _ = layer(x.transpose(1, 0, 2), lengths=[3, 2])
    layer.backward(np.ones_like(out))
    cell = cell_cls(2, 3, dtype=dtype, seed=0)
    h = cell(x[0])
    cell.backward(tuple(np.ones_like(s) for s in h) if isinstance(h, tuple) else np.ones_like(h))
    cell.stream(batch=2).step(x[0])
    # Batches of 3 with large recurrent weights split each step by hidden units
    # (_threads.split_bytes): the smallest H whose W_hh (G*H, H) reaches the threshold. A
    # batch of one runs the same split kernels (no signature of its own), and both split
    # whenever numba has two threads or more.
    gates = CELLS[layer_cls._cell].gates
    bounds = _threads.split_bytes(3)
    if bounds is not None:
        hidden = math.isqrt(int(bounds[0]) // (gates * dtype.itemsize)) + 1
        layer = layer_cls(2, hidden, dtype=dtype, seed=0)
        out, _ = layer(np.zeros((3, 3, 2), dtype), lengths=[3, 2, 1])
        layer.backward(np.ones_like(out))
    # The LSTM and the RNN at small H over wide chunks run in the transposed layout
    # (_engine.runs_in_columns): training, and inference reading x unpacked (batch first)
    if layer_cls._cell in _engine.COLUMNS_TRAIN_MAX_HIDDEN:
        hidden = 2
        wide = max(
            _engine.COLUMNS_TRAIN_MIN_SAMPLES[layer_cls._cell],
            hidden * _engine.COLUMNS_TRAIN_SAMPLES_PER_UNIT,
        )
        layer = layer_cls(2, hidden, batch_first=True, dtype=dtype, seed=0)
        x = np.zeros((wide * numba.config.NUMBA_NUM_THREADS, 2, 2), dtype)
        out, _ = layer(x)
        layer.backward(np.ones_like(out))
        layer.eval()(x)
    # Streams with large weights and enough rows split each step by hidden units: the
    # smallest C = H and N that reach the thresholds
    hidden = math.isqrt(_threads.STREAM_SPLIT_BYTES // (2 * gates * dtype.itemsize)) + 1
    batch = -(-_threads.STREAM_SPLIT_WORK // (2 * gates * hidden * hidden * dtype.itemsize))
    stream = cell_cls(hidden, hidden, dtype=dtype, seed=0).stream(batch=batch)
    if stream.unit_parts:
        stream.step(np.zeros((batch, hidden), dtype))


def cache_status() -> dict:
    """Kernel name -> number of specialisations in numba's disk cache (None if unknown)."""
    status = {}
    for name, kernel in KERNELS.items():
        try:
            status[name] = len(kernel._cache._cache_file._load_index())  # numba internals
        except Exception:  # noqa: BLE001 - purely informational
            status[name] = None
    return status


def cache_dir() -> str:
    """Where numba keeps fastseq's compiled kernels."""
    try:
        return str(rnn.rnn_forward._cache._cache_path)
    except AttributeError:
        return "unknown"
