"""Single-step cells with torch's API: RNNCell, LSTMCell, GRUCell (generation, streaming)."""

from __future__ import annotations

from threading import get_ident

import numpy as np

from fastseq import _engine
from fastseq import _validate as v
from fastseq._jit import entry_point
from fastseq._module import Module, uniform_init
from fastseq._packing import Packing
from fastseq._threads import (
    MAIN_THREAD,
    RUNNING,
    keep_workers_off_caller,
    kernel_threads,
    num_chunks,
    stream_parts,
    stream_units,
    weight_grads_call_blas,
)
from fastseq.kernels.gru import gru_step, gru_step_units
from fastseq.kernels.lstm import lstm_step, lstm_step_units
from fastseq.kernels.rnn import rnn_step, rnn_step_units
from fastseq.layers import state_arrays
from fastseq.registry import CELLS


class _RecurrentCell(Module):
    """Shared implementation of the cells: one time step, forward and backward.

    In training mode every forward keeps its step's workspace on a stack and each backward
    consumes the most recent one, so a sequence unrolled through the cell is
    back-propagated by calling backward in reverse step order (as autograd would).
    Eval mode keeps nothing; use it for generation.
    """

    _cell = ""

    def _setup(self, input_size, hidden_size, bias, dtype, seed, opts, forget_bias=0.0):
        self.input_size = v.positive_int("input_size", input_size)
        self.hidden_size = v.positive_int("hidden_size", hidden_size)
        self.bias = v.flag("bias", bias)
        self.dtype = v.dtype_option(dtype)
        forget_bias = v.forget_bias_option(forget_bias, self.bias)
        self._opts = opts
        hd = self.hidden_size
        gh = CELLS[self._cell].gates * hd
        shapes = {"weight_ih": (gh, self.input_size), "weight_hh": (gh, hd)}
        self._keys = {"w_ih": "weight_ih", "w_hh": "weight_hh"}
        if self.bias:
            shapes["bias_ih"] = shapes["bias_hh"] = (gh,)
            self._keys.update(b_ih="bias_ih", b_hh="bias_hh")
        if opts.peephole:
            shapes["weight_peephole"] = (3, hd)
            self._keys["w_peep"] = "weight_peephole"
        self.params = uniform_init(np.random.default_rng(v.seed_option(seed)), shapes, hd, self.dtype)
        if forget_bias:
            self.params["bias_ih"][hd : 2 * hd] += self.dtype.type(forget_bias)
        self._bind(self.params, {name: np.zeros_like(p) for name, p in self.params.items()})
        self._stack = []
        self._packing = None

    def _bind(self, params, grads):
        super()._bind(params, grads)
        gh, hd = CELLS[self._cell].gates * self.hidden_size, self.hidden_size
        self._weights = _engine.kernel_arrays(self._keys, params, _engine.absent_arrays(gh, hd, self.dtype))
        self._grad_views = _engine.kernel_arrays(self._keys, grads, _engine.absent_arrays(gh, hd, self.dtype))

    def __repr__(self):
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}, bias={self.bias}, dtype={self.dtype.name})"

    def stream(self, hx=None, batch=None):
        """A :class:`Stream` for step-by-step inference with this cell's (live) weights.

        Parameters
        ----------
        hx : array (N, H) or (H,); LSTMCell: pair (h, c); optional
            Initial state (copied); None means zeros.
        batch : int, optional
            N. None (and no hx): unbatched, ``step`` takes (C,) and returns (H,).
        """
        return Stream(self, hx, batch)

    def _step_packing(self, batch):
        if self._packing is None or self._packing.batch != batch:
            self._packing = Packing(None, 1, batch, num_chunks(batch))
        return self._packing

    def forward(self, x, hx=None):
        """One step.

        Parameters
        ----------
        x : array (N, C) or unbatched (C,)
        hx : array (N, H) or (H,); LSTMCell: pair (h, c); None (default) means zeros.

        Returns
        -------
        h' : ndarray (N, H) or (H,); LSTMCell: pair (h', c')
        """
        x = v.float_array("x", x, self.dtype)
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"x has shape {x.shape}; expected (N, C) or (C,) with C = input_size = {self.input_size}"
            )
        unbatched = x.ndim == 1
        x2 = x[None, :] if unbatched else x
        batch = x2.shape[0]
        if batch == 0:
            raise ValueError(f"x has shape {x.shape}; the batch axis must not be empty")
        spec = CELLS[self._cell]
        shape = (self.hidden_size,) if unbatched else (batch, self.hidden_size)
        states = state_arrays(
            "hx", hx, spec.n_states, shape, "(N, H)" if not unbatched else "(H,)", self.dtype
        )
        packing = self._step_packing(batch)
        states = tuple(np.zeros((batch, self.hidden_size), self.dtype) if s is None
                       else packing.sort(s.reshape(batch, self.hidden_size)) for s in states)  # fmt: skip
        x_packed = packing.pack(x2[None])
        out = np.empty((batch, self.hidden_size), self.dtype)
        with kernel_threads(packing, self._weights["w_hh"], forward=True):
            ws = _engine.forward(self._cell, self._opts, self._weights, x_packed, states, packing, out, 0, False,
                                 self.training)  # fmt: skip
        if self.training:
            self._stack.append((ws, packing, unbatched))
        result = [packing.unsort(s)[0] if unbatched else packing.unsort(s) for s in states]
        return result[0] if spec.n_states == 1 else tuple(result)

    def backward(self, grad):
        """Back-propagate the most recent training-mode step not yet back-propagated.

        Parameters
        ----------
        grad : array like h' ; LSTMCell: pair (grad_h, grad_c), either may be None

        Returns
        -------
        dx : ndarray like x
        dhx : ndarray like hx; LSTMCell: pair (dh, dc)
        """
        if not self._stack:
            raise ValueError(
                "backward() needs a preceding forward() in training mode that has not been "
                "back-propagated yet: call cell.train() and forward() first"
            )
        spec = CELLS[self._cell]
        ws, packing, unbatched = self._stack[-1]
        batch = packing.batch
        shape = (self.hidden_size,) if unbatched else (batch, self.hidden_size)
        grads = state_arrays("grad", grad, spec.n_states, shape, "the shape of h'", self.dtype)
        self._stack.pop()
        grads = [np.zeros((batch, self.hidden_size), self.dtype) if g is None
                 else g.reshape(batch, self.hidden_size) for g in grads]  # fmt: skip
        # The step's output is its new h: its gradient enters through dout; dstates carry
        # only the extra cell-state gradient of an LSTM.
        dout = packing.pack(grads[0][None])
        dstates = (np.zeros((batch, self.hidden_size), self.dtype),) + tuple(
            packing.sort(g) for g in grads[1:]
        )
        dx = np.empty((batch, self.input_size), self.dtype)
        blas = weight_grads_call_blas(self._cell, packing, [self.input_size], self.hidden_size, self.dtype)
        with kernel_threads(packing, self._weights["w_hh"], blas):
            _engine.backward(self._cell, self._opts, self._weights, ws, dout, 0, dstates, packing, False, dx, False,
                             self._grad_views)  # fmt: skip
        dx = packing.unpack(dx)[0]
        result = [packing.unsort(s)[0] if unbatched else packing.unsort(s) for s in dstates]
        return (dx[0] if unbatched else dx), (result[0] if spec.n_states == 1 else tuple(result))


class RNNCell(_RecurrentCell):
    """Elman RNN cell, as ``torch.nn.RNNCell``: h' = act(W_ih x + b_ih + W_hh h + b_hh).

    Parameters: ``weight_ih`` (H, C), ``weight_hh`` (H, H), ``bias_ih``, ``bias_hh`` (H,).
    """

    _cell = "rnn"

    def __init__(
        self, input_size, hidden_size, bias=True, nonlinearity="tanh", *, dtype=np.float32, seed=None
    ):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; received {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self._setup(
            input_size, hidden_size, bias, dtype, seed, _engine.CellOptions(relu=nonlinearity == "relu")
        )


class LSTMCell(_RecurrentCell):
    """LSTM cell, as ``torch.nn.LSTMCell`` (gates i, f, g, o); state is a pair (h, c).

    Parameters: ``weight_ih`` (4H, C), ``weight_hh`` (4H, H), ``bias_ih``, ``bias_hh`` (4H,),
    and with ``peephole=True`` ``weight_peephole`` (3, H). ``forget_bias`` is added to the
    forget slice of ``bias_ih`` at initialisation.
    """

    _cell = "lstm"

    def __init__(
        self,
        input_size,
        hidden_size,
        bias=True,
        *,
        dtype=np.float32,
        seed=None,
        peephole=False,
        forget_bias=0.0,
    ):
        opts = _engine.CellOptions(peephole=v.flag("peephole", peephole))
        self._setup(input_size, hidden_size, bias, dtype, seed, opts, forget_bias)


class GRUCell(_RecurrentCell):
    """GRU cell, as ``torch.nn.GRUCell`` (gates r, z, n); ``reset_after=False`` gives Cho et
    al.'s variant n = tanh(W_in x + b_in + W_hn (r*h) + b_hn).

    Parameters: ``weight_ih`` (3H, C), ``weight_hh`` (3H, H), ``bias_ih``, ``bias_hh`` (3H,).
    """

    _cell = "gru"

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32, seed=None, reset_after=True):
        opts = _engine.CellOptions(reset_after=v.flag("reset_after", reset_after))
        self._setup(input_size, hidden_size, bias, dtype, seed, opts)


class Stream:
    """Step-by-step inference with a cell: the fast path for generation and serving.

    State and scratch buffers are allocated once; each :meth:`step` checks its input cheaply,
    runs one kernel call (no workspace) and returns the new state. The kernel is serial,
    except for steps with large weights and enough rows (``fastseq._threads.stream_parts``):
    those split their hidden units across threads, and ``unit_parts`` says into how many
    parts (0: serial), when stepped on the main thread while no other fastseq kernel runs
    (otherwise the serial kernel, which gives bitwise the same result; see
    ``fastseq._threads.MAIN_THREAD`` for why).
    The cell's parameters are used live, so in-place updates and ``load_state_dict`` take
    effect at the next step. Create with ``cell.stream(hx=None, batch=None)``.
    """

    def __init__(self, cell, hx=None, batch=None):
        self.cell = cell
        spec = CELLS[cell._cell]
        self._n_states = spec.n_states
        if batch is not None:
            batch = v.positive_int("batch", batch)
        if hx is not None and batch is None:
            first = hx[0] if isinstance(hx, (tuple, list)) and spec.n_states == 2 else hx
            first = np.asarray(first)
            batch = first.shape[0] if first.ndim == 2 else None
        self.unbatched = batch is None
        self.batch = 1 if batch is None else batch
        n, hd, dt = self.batch, cell.hidden_size, cell.dtype
        self._x_shape = (cell.input_size,) if self.unbatched else (n, cell.input_size)
        self._states = tuple(np.zeros((n, hd), dt) for _ in range(spec.n_states))
        self.reset(hx)
        w = cell._weights
        weights = (w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
        # Large weights: each step's units split across threads (_threads.stream_parts);
        # GRU's reset_after=False needs r for every unit before its second product, so not it.
        # Both results are bitwise the same (_threads.stream_units), so step() may pick either.
        parts = stream_parts(n, w["w_ih"], w["w_hh"])
        self.unit_parts = 0 if cell._cell == "gru" and not cell._opts.reset_after else parts
        kernel, self._args = self._serial_kernel(cell, weights, spec.gates if self.unit_parts else 1)
        split, self._split_args = self._split_kernel(cell, weights) if self.unit_parts else (None, ())
        # Each kernel's compiled function, found at its first step (_jit.entry_point).
        self._kernel = self._first_call("_kernel", kernel)
        self._split = None if split is None else self._first_call("_split", split)
        # What step() returns, copied: the state arrays, or their only row when unbatched.
        self._views = tuple(s[0] if self.unbatched else s for s in self._states)
        self._dtype = dt

    def _first_call(self, attribute, kernel):
        """Stand-in for ``kernel`` until its first step: finds its compiled function for the
        step's argument types (compiling or loading it), stores that as ``attribute`` (unless
        something else was stored there meanwhile) and runs it. Steps then call it directly:
        step() passes the same types every time."""

        def first_call(*args):
            run = entry_point(kernel, args)
            if getattr(self, attribute) is first_call:
                setattr(self, attribute, run)
            run(*args)

        return first_call

    def _serial_kernel(self, cell, weights, blocks):
        n, hd, dt, o = self.batch, cell.hidden_size, cell.dtype, cell._opts
        gx = np.empty((n, CELLS[cell._cell].gates * hd), dt)
        gh = np.empty_like(gx)
        if cell._cell == "rnn":
            return rnn_step, (self._states[0], *weights, o.relu, gx, gh)
        if cell._cell == "lstm":
            return lstm_step, (*self._states, *weights, cell._weights["w_peep"], o.peephole, gx, gh, blocks)
        scratch = (np.empty((n, 2 * hd), dt), np.empty((n, hd), dt), np.empty((n, hd), dt))
        return gru_step, (self._states[0], *weights, o.reset_after, gx, gh, *scratch, blocks)

    def _split_kernel(self, cell, weights):
        n, hd, dt, o, parts = self.batch, cell.hidden_size, cell.dtype, cell._opts, self.unit_parts
        units = np.array(stream_units(hd, parts), np.int64)
        wide = int(np.max(np.diff(units)))  # units of the widest part
        rows = CELLS[cell._cell].gates * wide  # its compact gate row
        gx = np.empty((parts, n, rows), dt)
        biases = np.empty((2, parts, rows), dt)
        scratch = (np.empty((n, hd), dt), gx, np.empty_like(gx), biases[0], biases[1])
        if cell._cell == "rnn":
            return rnn_step_units, (self._states[0], *weights, o.relu, *scratch, units)
        if cell._cell == "lstm":
            peep = np.empty((parts, 3, wide), dt)
            return lstm_step_units, (
                *self._states,
                *weights,
                cell._weights["w_peep"],
                o.peephole,
                *scratch,
                peep,
                units,
            )
        return gru_step_units, (self._states[0], *weights, *scratch, units)

    def reset(self, hx=None):
        """Set the state to ``hx`` (same forms as ``cell.stream``), or to zeros."""
        shape = (self.cell.hidden_size,) if self.unbatched else (self.batch, self.cell.hidden_size)
        described = "(H,)" if self.unbatched else "(N, H)"
        given = state_arrays("hx", hx, self._n_states, shape, described, self.cell.dtype)
        for state, value in zip(self._states, given, strict=True):
            state[...] = 0 if value is None else value.reshape(state.shape)

    @property
    def state(self):
        """Copy of the current state: h, or (h, c) for an LSTM cell."""
        if self._n_states == 1:
            return self._views[0].copy()
        return self._views[0].copy(), self._views[1].copy()

    def step(self, x):
        """Advance one step with input x ((N, C), or (C,) unbatched); returns the new state
        (a copy), h' or (h', c')."""
        # One cheap test for the usual case: an aligned, writeable C-contiguous array of
        # the cell's dtype (native dtypes are singletons) and shape; else validate and copy.
        if (
            type(x) is not np.ndarray
            or x.dtype is not self._dtype
            or x.shape != self._x_shape
            or not x.flags.carray
        ):
            x = v.float_array("x", x, self.cell.dtype)
            v.shape("x", x, self._x_shape, "(C,)" if self.unbatched else "(N, C)")
            x = np.array(x, order="C")
        if self.unbatched:
            x = x.reshape(self.batch, -1)
        # Split across threads only on the main thread and when no other fastseq kernel runs
        # (_threads.MAIN_THREAD, RUNNING).
        running = RUNNING
        running.append(None)
        try:
            if self._split is not None and len(running) == 1 and get_ident() == MAIN_THREAD:
                keep_workers_off_caller()  # steps may come after idle time (real-time input)
                self._split(x, *self._split_args)
            else:
                self._kernel(x, *self._args)
        finally:
            running.pop()
        views = self._views  # self.state, inline: the property's call cost 0.06 us a step
        if len(views) == 1:
            return views[0].copy()
        return views[0].copy(), views[1].copy()
