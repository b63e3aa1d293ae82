"""Sequence patterns: many-to-one, generation, truncated BPTT, sliding windows.

* many-to-one: :class:`LastStep` picks each sequence's last valid output (lengths and
  bidirectional aware);
* many-to-many: a recurrent layer followed by :class:`~fastseq.nn.Linear` over (T, N, .) and a
  loss with ``mask=length_mask(lengths, T)``;
* one-to-many: :func:`generate` samples step by step through the cells (temperature, top-k,
  seeded);
* encoder-decoder: :class:`~fastseq.nn.Seq2Seq` (teacher forcing) + :func:`generate` with the
  encoder's states (free running);
* truncated BPTT: :func:`truncated_bptt` windows, final states carried into the next window
  (plain arrays, so no gradient flows back), :func:`reset_states` per sample;
* :func:`sliding_windows` for time series.
"""

from __future__ import annotations

import numpy as np

from fastseq import _validate as v
from fastseq._module import Module
from fastseq.cells import GRUCell, LSTMCell, RNNCell
from fastseq.layers import GRU, LSTM, RNN, _RecurrentLayer


class LastStep(Module):
    """Many-to-one: each sequence's last valid output, (T, N, D*H) -> (N, D*H).

    The forward direction's columns (the first H) come from step ``lengths[n] - 1``; with
    ``bidirectional=True`` the reverse direction's columns (the last H) come from step 0,
    where the reverse pass ends. ``lengths`` None means every sequence is full length.
    ``backward(grad)`` scatters (N, D*H) back to (T, N, D*H) (zeros elsewhere).
    """

    uses_lengths = True

    def __init__(self, bidirectional=False, batch_first=False):
        self.bidirectional = v.flag("bidirectional", bidirectional)
        self.batch_first = v.flag("batch_first", batch_first)
        self.params, self.grads = {}, {}
        self._saved = None

    def config(self):
        return {"bidirectional": self.bidirectional, "batch_first": self.batch_first}

    def forward(self, out, lengths=None):
        out = np.asarray(out)
        if out.dtype.kind != "f" or out.ndim != 3:
            raise ValueError(
                f"out must be a 3-D float array {'(N, T, F)' if self.batch_first else '(T, N, F)'}; "
                f"received dtype {out.dtype}, shape {out.shape}"
            )
        tn = out.transpose(1, 0, 2) if self.batch_first else out
        steps, batch, features = tn.shape
        if self.bidirectional and features % 2:
            raise ValueError(f"bidirectional output needs an even feature count D*H; received {features}")
        last = np.full(batch, steps - 1) if lengths is None else v.lengths_array(lengths, steps, batch) - 1
        half = features // 2 if self.bidirectional else features
        cols = np.arange(features)
        time = np.where(cols[None, :] < half, last[:, None], 0)  # (N, F)
        picked = tn[time, np.arange(batch)[:, None], cols[None, :]]
        self._saved = (tn.shape, time, out.dtype) if self.training else None
        return picked

    def backward(self, grad):
        if self._saved is None:
            raise ValueError("LastStep.backward() needs a preceding forward() in training mode")
        shape, time, dtype = self._saved
        grad = np.asarray(grad)
        if grad.shape != (shape[1], shape[2]):
            raise ValueError(f"grad has shape {grad.shape}; expected (N, F) = {(shape[1], shape[2])}")
        full = np.zeros(shape, dtype)
        full[time, np.arange(shape[1])[:, None], np.arange(shape[2])[None, :]] = grad
        self._saved = None
        return full.transpose(1, 0, 2) if self.batch_first else full


def length_mask(lengths, steps):
    """(T, N) bool mask of the valid steps (for losses over padded batches)."""
    lengths = np.asarray(lengths)
    return np.arange(steps)[:, None] < lengths[None, :]


def sliding_windows(series, window, horizon=1, stride=1):
    """Inputs and targets for sequence-to-value forecasting, as strided views (no copy).

    Parameters
    ----------
    series : array (L,) or (L, F)
        One time series (F features; 1-D means F = 1).
    window : int
        Steps of history per sample.
    horizon : int, default 1
        Steps to predict after each window.
    stride : int, default 1
        Steps between consecutive windows' starts.

    Returns
    -------
    inputs : ndarray (M, window, F)
        Window m covers steps ``m*stride .. m*stride+window-1``; read-only view of ``series``.
    targets : ndarray (M, horizon, F)
        The ``horizon`` steps after each window; read-only view.

    ``M = (L - window - horizon) // stride + 1``. Transpose to (window, M, F) for the layers'
    time-major layout, or use ``batch_first=True``.
    """
    arr = np.asarray(series)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"series must be numeric; received dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"series must be (L,) or (L, F); received shape {np.shape(series)}")
    window = v.positive_int("window", window)
    horizon = v.positive_int("horizon", horizon)
    stride = v.positive_int("stride", stride)
    length = arr.shape[0]
    if window + horizon > length:
        raise ValueError(f"window + horizon = {window + horizon} must be <= the series length {length}")
    count = (length - window - horizon) // stride + 1
    views = np.lib.stride_tricks.sliding_window_view(arr, window + horizon, axis=0)  # (L-w-h+1, F, w+h)
    views = views[: (count - 1) * stride + 1 : stride].transpose(0, 2, 1)  # (M, w+h, F)
    return views[:, :window], views[:, window:]


def truncated_bptt(steps, k):
    """Windows ``(start, stop)`` of at most ``k`` steps covering ``range(steps)``.

    Stateful training: run each window from the previous window's final states
    (``model.final_states``, plain arrays, so the gradient stops at the window boundary) and
    back-propagate ``k`` steps at a time; :func:`reset_states` zeroes samples that start over.
    """
    steps = v.positive_int("steps", steps)
    k = v.positive_int("k", k)
    return [(s, min(s + k, steps)) for s in range(0, steps, k)]


def reset_states(states, reset):
    """Copy of ``states`` (as in ``model.final_states``: per recurrent layer an array
    (L*D, N, H) or an LSTM pair) with the samples where ``reset`` (N,) is True set to zero."""
    reset = np.asarray(reset, dtype=bool)

    def zeroed(a):
        a = np.array(a)
        if a.shape[-2] != reset.shape[0]:
            raise ValueError(f"reset has {reset.shape[0]} entries; the states have batch size {a.shape[-2]}")
        a[..., reset, :] = 0
        return a

    out = []
    for s in states:
        if s is None:
            out.append(None)
        elif isinstance(s, tuple):
            out.append(tuple(zeroed(a) for a in s))
        else:
            out.append(zeroed(s))
    return out


_CELL_OF = {RNN: RNNCell, LSTM: LSTMCell, GRU: GRUCell}
#: Layer config entries a cell takes too (the variant switches, bias and dtype).
_CELL_OPTIONS = ("bias", "dtype", "nonlinearity", "peephole", "reset_after")


def layer_cells(layer):
    """One cell per stacked layer of a unidirectional recurrent layer, sharing its parameter
    arrays (updates to either are seen by both): the step-by-step path of that layer."""
    if not isinstance(layer, _RecurrentLayer):
        raise TypeError(f"layer must be an RNN, LSTM or GRU; received {type(layer).__name__}")
    if layer.bidirectional:
        raise ValueError(
            "a bidirectional layer cannot run step by step (the reverse direction needs the future)"
        )
    config, cells = layer.config(), []
    for k in range(layer.num_layers):
        size = layer.input_size if k == 0 else layer.hidden_size
        kwargs = {k: config[k] for k in _CELL_OPTIONS if k in config}
        cell = _CELL_OF[type(layer)](size, layer.hidden_size, **kwargs)
        names = {n: f"{n}_l{k}" for n in cell.params}
        cell._bind(
            {n: layer.params[s] for n, s in names.items()}, {n: layer.grads[s] for n, s in names.items()}
        )
        cell.eval()
        cells.append(cell)
    return cells


def _sample(logits, temperature, top_k, rng):
    """One token per row of logits (N, K)."""
    if temperature == 0:
        return np.argmax(logits, axis=1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(z.shape[0])
    return np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), z.shape[1] - 1)


def generate(model, prime, steps, temperature=1.0, top_k=None, seed=None, state=None):
    """Sample a continuation token by token through the cell path (one-to-many).

    Parameters
    ----------
    model : Sequential
        Embedding, then unidirectional recurrent layers (Dropout is skipped), then modules
        mapping (N, H) to logits (N, K), e.g. Linear.
    prime : array of int, shape (P,) or (N, P)
        Tokens to feed first (P >= 1); the last one's logits give the first sample.
    steps : int
        Tokens to generate.
    temperature : float, default 1
        Logits are divided by it; 0 means greedy (argmax).
    top_k : int, optional
        Sample only among the k most likely tokens.
    seed : int, optional
        Seeds the sampling: the same seed gives the same tokens.
    state : list, optional
        Initial state per recurrent layer (e.g. ``Seq2Seq.encode``), batch N.

    Returns
    -------
    ndarray of int64, (steps,) or (N, steps) like ``prime``.
    """
    from fastseq.nn.modules import Dropout, Embedding

    prime = np.asarray(prime)
    if prime.dtype.kind not in "iu":
        raise TypeError(f"prime must be integer tokens; received dtype {prime.dtype}")
    if prime.ndim not in (1, 2) or prime.shape[-1] == 0:
        raise ValueError(f"prime must be (P,) or (N, P) with P >= 1; received shape {prime.shape}")
    steps = v.positive_int("steps", steps)
    temperature = v.finite_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; received {temperature}")
    if top_k is not None:
        top_k = v.positive_int("top_k", top_k)
    rng = np.random.default_rng(v.seed_option(seed))
    modules = list(model.modules)
    if not modules or not isinstance(modules[0], Embedding):
        raise ValueError("generate needs a Sequential that starts with an Embedding")
    tokens2 = prime[None, :] if prime.ndim == 1 else prime
    batch = tokens2.shape[0]
    rec = [m for m in modules if isinstance(m, _RecurrentLayer)]
    state = [None] * len(rec) if state is None else list(state)
    streams, k = [], 0
    for m in modules[1:]:
        if isinstance(m, _RecurrentLayer):
            for j, cell in enumerate(layer_cells(m)):
                hx = state[k]
                if hx is not None:
                    hx = tuple(a[j] for a in hx) if isinstance(hx, tuple) else hx[j]
                streams.append(("cell", cell.stream(hx=hx, batch=batch)))
            k += 1
        elif not isinstance(m, Dropout):
            streams.append(("head", m))
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    emb = modules[0]
    try:

        def logits_of(tok):
            x = emb(tok)
            for kind, s in streams:
                if kind == "cell":
                    out = s.step(x)
                    x = out[0] if isinstance(out, tuple) else out
                else:
                    x = s(x)
            return x

        for t in range(tokens2.shape[1]):
            logits = logits_of(tokens2[:, t])
        result = np.empty((batch, steps), np.int64)
        for t in range(steps):
            result[:, t] = _sample(logits, temperature, top_k, rng)
            if t + 1 < steps:
                logits = logits_of(result[:, t])
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)
    return result[0] if prime.ndim == 1 else result
