"""Multi-layer recurrent layers with torch's API and weight layout: RNN, LSTM, GRU."""

from __future__ import annotations

import operator

import numpy as np

from fastseq import _engine
from fastseq import _validate as v
from fastseq._module import Module, uniform_init
from fastseq._packing import reuse_packing
from fastseq._pool import WorkspacePool
from fastseq._threads import (
    kernel_threads,
    num_chunks,
    one_region_threads,
    unit_parts,
    weight_grads_call_blas,
)
from fastseq.registry import CELLS


def state_arrays(name, value, n_states, expected, described, dtype, hint="", hint_batch=None):
    """Validate a state argument (hx, grad_h_n, ...) into a list of arrays or Nones.

    One-state cells take an array; LSTM takes a pair (h, c). None means zeros.
    """
    if n_states == 1:
        items = [value]
    else:
        if value is None:
            items = [None, None]
        elif not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(
                f"{name} must be a pair (h, c) of arrays for an LSTM; received "
                f"{type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
            )
        else:
            items = list(value)
    suffixes = ("",) if n_states == 1 else ("[0] (h)", "[1] (c)")
    arrays = []
    for item, suffix in zip(items, suffixes, strict=True):
        if item is None:
            arrays.append(None)
            continue
        arr = v.float_array(name + suffix, item, dtype)
        batch_hint = hint if arr.ndim == 3 and arr.shape[1] == hint_batch != expected[1] else ""
        v.shape(name + suffix, arr, expected, described, batch_hint)
        arrays.append(arr)
    return arrays


#: Roles of a recorded kernel argument that an :class:`EvalPlan` fills in at every call.
_IN, _OUT, _STATE, _SCRATCH, _THREADS = range(5)


class EvalPlan:
    """The kernel calls of a layer's eval forward for one input layout, made again without
    the layer's decisions.

    An eval call (``check_finite`` off, ``x`` an ndarray of the layer's dtype) whose key
    (:meth:`key`: the input's shape, strides, dtype and writeable flag, and ``lengths``)
    is the previous such call's records its kernel calls (``_engine.forward``'s
    ``calls``); the plan built from them serves later calls with that key, and ``hx``
    None or arrays of the layer's dtype and state shape, while the layer's parameters are
    the same arrays, until ``train()`` or ``_bind``. Each call then fills in the arrays of
    this call (the layer's input and output, the states, scratch the kernels write first)
    and the threads of a one-region split, and skips the validation, the threading and
    layout decisions
    (``_threads.unit_parts``, ``Packing.built_from``, :meth:`_RecurrentLayer._gathers_input`,
    ``_engine.projects_in_blocks`` and ``runs_in_columns``) and the kernels' arguments built
    per call. The calls and their results are those of the layer's own path. Measured
    (Zen 5, A/B in one process, 11 rounds, planned / layer path): eval forward N=1, T=20,
    C=H=32: LSTM 0.890, GRU 0.875, RNN 0.853 (about 3 of 21-30 us); LSTM N=4 0.900; RNN
    N=32, T=100, H=64: random lengths 0.967, full 0.980; larger calls unchanged (LSTM
    N=64, T=100, H=256 0.996). A stateful call (``hx`` the previous call's final states,
    N=1, T=20, H=32, in one process, plan / layer path): LSTM 0.779, GRU 0.783, RNN 0.732;
    LSTM N=4, H=128 0.931."""

    __slots__ = ("_key", "_batch_first", "_weights", "packing", "gathers", "threads", "_calls")

    @staticmethod
    def key(x, lengths):
        """What a plan depends on in a call's arguments (``x`` a validated ndarray), or None
        for ``lengths`` that are not an int64 ndarray (converted, so never the same object)."""
        if lengths is None:
            given = None
        elif type(lengths) is np.ndarray and lengths.dtype == np.int64:
            given = lengths.shape, lengths.tobytes()
        else:
            return None
        return x.shape, x.strides, x.dtype, x.flags.writeable, given

    def __init__(self, layer, key, packing, gathers, record):
        """``record``: (kernel, args, layer input, output, states) of each layer and
        direction's call, in order (:meth:`_RecurrentLayer._run_forward`)."""
        self._key, self._batch_first = key, layer.batch_first
        self._weights = tuple(layer.params.values())
        self.packing, self.gathers = packing, gathers
        self.threads = kernel_threads.decide(packing, layer._recurrent_weights, forward=True)
        kept = [*self._weights, *layer._absent.values(), *packing.kernel_args, _engine.NO_ROWS]
        if not packing.identity:
            kept.append(packing.out_rows)
        kept = {id(a) for a in kept}
        self._calls = []
        for kernel, args, layer_in, out, states in record:
            roles = {id(layer_in): (_IN, None), id(out): (_OUT, None)}
            roles.update((id(s), (_STATE, k)) for k, s in enumerate(states))
            template, slots = list(args), []
            for i, arg in enumerate(args):
                role = roles.get(id(arg))
                if role is None and type(arg) is np.ndarray and arg.size and id(arg) not in kept:
                    role = (_SCRATCH, (arg.shape, arg.dtype))  # a workspace the kernel fills
                if role is not None:
                    slots.append((i, *role))
                    template[i] = None  # the call's arrays are not kept
            if kernel in _engine.REGION_THREADS_KERNELS:
                slots.append((len(args) - 1, _THREADS, None))
            self._calls.append((kernel, template, tuple(slots)))

    def serves(self, layer, x, lengths) -> bool:
        """Whether this plan makes the kernel calls of ``layer.forward(x, hx, lengths)``
        (with any valid ``hx``: the kernels take the initial states in arrays of their own)."""
        return (
            type(x) is np.ndarray
            and not (layer.training or layer.check_finite)
            and layer.batch_first == self._batch_first
            and self.key(x, lengths) == self._key
            and all(map(operator.is_, layer.params.values(), self._weights))
        )

    def call(self, index, layer_in, out, states):
        """Make the ``index``-th recorded call (layer * D + direction) on this call's arrays."""
        kernel, template, slots = self._calls[index]
        args = template.copy()
        for i, role, extra in slots:
            if role == _IN:
                args[i] = layer_in
            elif role == _OUT:
                args[i] = out
            elif role == _STATE:
                args[i] = states[extra]
            elif role == _SCRATCH:
                args[i] = np.empty(*extra)
            else:
                args[i] = one_region_threads()
        kernel(*args)


class _RecurrentLayer(Module):
    """Shared implementation of :class:`RNN`, :class:`LSTM` and :class:`GRU`."""

    _cell = ""

    def _setup(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
               bidirectional, dtype, seed, opts, forget_bias=0.0, check_finite=False,
               recurrent_dropout=0.0):  # fmt: skip
        self.input_size = v.positive_int("input_size", input_size)
        self.hidden_size = v.positive_int("hidden_size", hidden_size)
        self.num_layers = v.positive_int("num_layers", num_layers)
        self.bias = v.flag("bias", bias)
        self.batch_first = v.flag("batch_first", batch_first)
        self.dropout = v.probability("dropout", dropout)
        self.recurrent_dropout = v.probability("recurrent_dropout", recurrent_dropout)
        self.bidirectional = v.flag("bidirectional", bidirectional)
        self.dtype = v.dtype_option(dtype)
        forget_bias = v.forget_bias_option(forget_bias, self.bias)
        self.check_finite = v.flag("check_finite", check_finite)
        self._opts = opts
        self._rng = np.random.default_rng(v.seed_option(seed))
        self.num_directions = 2 if self.bidirectional else 1
        spec = CELLS[self._cell]
        gh, hd = spec.gates * self.hidden_size, self.hidden_size

        shapes, self._keys = {}, []
        for layer in range(self.num_layers):
            cols = self.input_size if layer == 0 else self.num_directions * hd
            per_dir = []
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                keys = {"w_ih": "weight_ih" + sfx, "w_hh": "weight_hh" + sfx}
                shapes[keys["w_ih"]] = (gh, cols)
                shapes[keys["w_hh"]] = (gh, hd)
                if self.bias:
                    keys["b_ih"], keys["b_hh"] = "bias_ih" + sfx, "bias_hh" + sfx
                    shapes[keys["b_ih"]] = shapes[keys["b_hh"]] = (gh,)
                if opts.peephole:
                    keys["w_peep"] = "weight_peephole" + sfx
                    shapes[keys["w_peep"]] = (3, hd)
                per_dir.append(keys)
            self._keys.append(per_dir)
        self.params = uniform_init(self._rng, shapes, hd, self.dtype)
        if forget_bias:
            for per_dir in self._keys:
                for keys in per_dir:
                    self.params[keys["b_ih"]][hd : 2 * hd] += self.dtype.type(forget_bias)
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self._absent = _engine.absent_arrays(gh, hd, self.dtype)
        self._absent_grads = _engine.absent_arrays(gh, hd, self.dtype)
        self._cache = None
        self._pool = WorkspacePool()
        self._packing = None  # the last forward's row layout (_packing.reuse_packing)
        self._plan = None  # an EvalPlan for the eval calls like the last two
        self._plan_key = None  # EvalPlan.key of the last eval call a plan could serve

    def train(self, mode: bool = True):
        """Switch training mode on (default) or off; eval mode also frees pooled workspaces."""
        super().train(mode)
        self._plan = self._plan_key = None
        if not self.training:
            self._pool.clear()
        return self

    def _bind(self, params, grads):
        super()._bind(params, grads)
        self._plan = self._plan_key = None

    def config(self):
        """Constructor arguments (JSON-serialisable) that rebuild this layer's architecture."""
        names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "recurrent_dropout", "check_finite")  # fmt: skip
        cfg = {k: getattr(self, k) for k in names}
        cfg["dtype"] = self.dtype.name
        if self._cell == "rnn":
            cfg["nonlinearity"] = self.nonlinearity
        elif self._cell == "lstm":
            cfg["peephole"] = self._opts.peephole
        else:
            cfg["reset_after"] = self._opts.reset_after
        return cfg

    @property
    def _recurrent_weights(self):
        """Layer 0's W_hh (every layer's has this shape): it sets the threading policy."""
        return self.params[self._keys[0][0]["w_hh"]]

    def _direction_arrays(self, layer, direction, table, absent):
        return _engine.kernel_arrays(self._keys[layer][direction], table, absent)

    def __repr__(self):
        opts = [f"{self.input_size}", f"{self.hidden_size}", f"num_layers={self.num_layers}"]
        opts += [f"{k}={getattr(self, k)}" for k in ("bias", "batch_first", "dropout", "bidirectional")]
        if self.recurrent_dropout:
            opts.append(f"recurrent_dropout={self.recurrent_dropout}")
        return f"{type(self).__name__}({', '.join(opts)}, dtype={self.dtype.name})"

    # ------------------------------------------------------------------ forward
    def forward(self, x, hx=None, lengths=None):
        """Run the layer over a batch of sequences.

        Parameters
        ----------
        x : array, shape (T, N, C), or (N, T, C) with ``batch_first``, or unbatched (T, C)
            Input sequences, of the layer's dtype.
        hx : array (D*num_layers, N, H), or unbatched (D*num_layers, H); LSTM: pair (h0, c0)
            Initial states; None (default) means zeros. Either element of an LSTM pair may
            be None.
        lengths : array of int, shape (N,), optional
            Valid steps of each sample, any order, each in [1, T]. Outputs at padded steps
            are 0; final states are taken after each sample's last valid step; the reverse
            direction starts at each sample's last valid step. Batched input only.

        Returns
        -------
        out : ndarray, shape (T, N, D*H) (or (N, T, D*H) / (T, D*H), like ``x``)
            Last layer's output at every step, directions concatenated.
        h_n : ndarray (D*num_layers, N, H); LSTM: pair (h_n, c_n)
            Final state of every layer and direction.
        """
        plan = self._plan
        served = plan is not None and plan.serves(self, x, lengths)
        if served:
            states0 = self._planned_states(hx, x.ndim == 2, x.shape[0] if self.batch_first else x.shape[-2])
            if states0 is not None:
                x3 = x[:, None, :] if x.ndim == 2 else (x.transpose(1, 0, 2) if self.batch_first else x)
                return self._forward(x3, x.ndim == 2, states0, plan.packing, plan)
        given = x
        x = v.float_array("x", x, self.dtype)
        if x.ndim not in (2, 3):
            raise ValueError(
                f"x has {x.ndim} dimension(s) (shape {x.shape}); expected a 3-D batch "
                f"{'(N, T, C)' if self.batch_first else '(T, N, C)'} or an unbatched 2-D (T, C)"
            )
        unbatched = x.ndim == 2
        if unbatched:
            if lengths is not None:
                raise ValueError(
                    "lengths needs batched 3-D input; received unbatched x of shape " + str(x.shape)
                )
            x3 = x[:, None, :]
        else:
            x3 = x.transpose(1, 0, 2) if self.batch_first else x
        steps, batch, features = x3.shape
        if features != self.input_size:
            layout = "(T, C)" if unbatched else ("(N, T, C)" if self.batch_first else "(T, N, C)")
            hint = ""
            if self.input_size in x.shape[:-1]:
                hint = " The features must be the last axis."
            raise ValueError(
                f"x has shape {x.shape}; expected {layout} with C = input_size = {self.input_size}.{hint}"
            )
        if steps == 0 or batch == 0:
            raise ValueError(f"x has shape {x.shape}; the time and batch axes must not be empty")
        spec = CELLS[self._cell]
        n_dirs, hd = self.num_directions, self.hidden_size
        n_state_rows = self.num_layers * n_dirs
        if hx is None:  # zeros (the common call: no messages to build)
            states0 = [None] * spec.n_states
        else:
            state_shape = (n_state_rows, hd) if unbatched else (n_state_rows, batch, hd)
            described = "(D*num_layers, H)" if unbatched else "(D*num_layers, N, H)"
            layout = "(N, T, C)" if self.batch_first else "(T, N, C)"
            hint = f"x was read as {layout}, so N = {batch}. Did you mean batch_first={not self.batch_first}?"
            states0 = state_arrays("hx", hx, spec.n_states, state_shape, described, self.dtype, hint, steps)
        w_hh = self._recurrent_weights
        parts = unit_parts(batch, w_hh, splits=self._opts.reset_after)  # GRU: the split's variant
        chunks = 1 if parts else num_chunks(batch)
        packing = self._packing
        if packing is None or not packing.built_from(lengths, steps, batch, chunks, parts):
            if lengths is not None:
                lengths = v.lengths_array(lengths, steps, batch)
            packing = reuse_packing(packing, lengths, steps, batch, chunks, parts)
        self._packing = packing
        if self.check_finite:
            for k, s in enumerate(states0):
                if s is not None:
                    v.finite("hx" if spec.n_states == 1 else f"hx[{k}]", s)
        if unbatched:
            states0 = [s if s is None else s[:, None, :] for s in states0]  # None: zeros
        plan_key = None  # the plan serves this key already when ``served`` (hx checked here)
        if x is given and not (served or self.training or self.check_finite):
            plan_key = EvalPlan.key(x, lengths)
        return self._forward(x3, unbatched, states0, packing, None, plan_key)

    def _planned_states(self, hx, unbatched, batch):
        """``hx`` as :meth:`_forward`'s ``states0`` where it is what a valid call passes
        (None, or arrays, an LSTM's pair of arrays or None, of the layer's dtype and state
        shape), for an eval plan's call; else None (the layer's own path checks it)."""
        n_states = CELLS[self._cell].n_states
        if hx is None:
            return [None] * n_states
        if n_states == 1:
            items = (hx,)
        elif type(hx) in (tuple, list) and len(hx) == 2:
            items = hx
        else:
            return None
        rows, hd = self.num_layers * self.num_directions, self.hidden_size
        shape = (rows, hd) if unbatched else (rows, batch, hd)
        states0 = []
        for s in items:
            if s is not None and (type(s) is not np.ndarray or s.dtype != self.dtype or s.shape != shape):
                return None
            states0.append(s if s is None or not unbatched else s[:, None, :])
        return states0

    def _forward(self, x3, unbatched, states0, packing, plan, plan_key=None):
        """:meth:`forward` from the validated input ``x3`` (T, N, C), initial states (list
        of (L*D, N, H) or None) and row layout on: through ``plan`` (an :class:`EvalPlan`
        that serves this call) or, without one, through the kernels' decisions; ``plan_key``
        (an eval call that a plan could serve, else None): a plan is built when the
        previous such call had the same key."""
        steps, batch, features = x3.shape
        n_dirs, hd, n_states = self.num_directions, self.hidden_size, len(states0)
        n_state_rows = self.num_layers * n_dirs
        final = [np.zeros((n_state_rows, batch, hd), self.dtype) for _ in states0]  # sorted_states
        self._pool.start_step()
        training = self.training
        x_rows = None
        record = None
        if plan_key is not None:
            record = [] if plan_key == self._plan_key else None
            self._plan_key = plan_key
        if plan.gathers if plan is not None else self._gathers_input(packing, x3, training):
            # Inference: the kernels gather the input rows into their block projections
            # (kernels' ``x_rows``); no packed copy of x.
            layer_in, x_rows = x3.reshape(steps * batch, features), packing.out_rows
        else:
            layer_in = packed_x = packing.pack(x3, self._pool.take)
        if self.check_finite:
            self._check_packed("x", layer_in, packing, ValueError)
        output = None
        if not packing.identity:
            # The last layer writes the (T, N, D*H) output itself (kernels' ``out_rows``),
            # zeros at padded steps included: no packed output to unpack after.
            output = packing.padded_array(n_dirs * hd, self.dtype)
        decided = None if plan is None else plan.threads
        with kernel_threads(packing, self._recurrent_weights, forward=True, decided=decided):
            layers_ws = self._run_forward(
                packing, layer_in, states0, final, training, output, x_rows, plan, record
            )
        if record is not None:
            self._plan = EvalPlan(self, plan_key, packing, x_rows is not None, record)
        layer_in = layers_ws.pop()
        if self.check_finite:
            self._check_packed("out", layer_in, packing, FloatingPointError)
        self._cache = None
        if training:
            self._cache = {"packing": packing, "layers": layers_ws,
                           "out_shape": None, "unbatched": unbatched}  # fmt: skip
        if packing.identity:  # output and packed_x are views of these arrays
            output = packing.unpack(layer_in)
        elif not training and x_rows is None:  # training keeps the packed input for backward
            self._pool.give(packed_x)
        if unbatched:
            output, final = output[:, 0, :], [f[:, 0, :] for f in final]
        elif self.batch_first:
            output = output.transpose(1, 0, 2)
        if training:
            self._cache["out_shape"] = output.shape
        return output, (final[0] if n_states == 1 else tuple(final))

    def _gathers_input(self, packing, x3, training):
        """Whether the first layer's kernels read the input ``x3`` (T, N, C) unpacked
        (``x_rows``): inference over a packing that is not the identity (lengths, or several
        chunks), split by chunks, with x C-contiguous (a view of T*N rows) and writeable (the
        kernels are compiled for writeable arrays; a read-only one would compile them again),
        and every direction projecting a block at a time. ``check_finite`` checks packed
        rows."""
        if training or self.check_finite or packing.identity or packing.unit_parts:
            return False
        flags = x3.flags
        if not (flags.c_contiguous and flags.writeable):
            return False
        w_hh = self._recurrent_weights
        return _engine.projects_in_blocks(packing, w_hh, False, False) and (
            self.num_directions == 1 or _engine.projects_in_blocks(packing, w_hh, True, False)
        )

    def _run_forward(self, packing, layer_in, states0, final, training, output=None, x_rows=None, plan=None,
                     record=None):  # fmt: skip
        """All layers and directions; returns the per-layer workspaces + the last output
        (packed, or ``output`` (T, N, D*H) when given: the last layer writes it unpacked).
        ``states0``: each state (D*num_layers, N, H), or None for zeros.
        ``x_rows``: the first layer's input is unpacked (see :meth:`_gathers_input`).
        ``plan``: an :class:`EvalPlan` makes the kernel calls; ``record``: a list that gets
        each layer and direction's call, for a plan (:meth:`EvalPlan.__init__`)."""
        n_dirs, hd = self.num_directions, self.hidden_size
        layers_ws = []
        take = self._pool.take if training else np.empty  # workspaces (none in eval)
        for layer in range(self.num_layers):
            out_rows = None
            if layer == self.num_layers - 1 and output is not None:
                out, out_rows = output.reshape(-1, n_dirs * hd), packing.out_rows
            elif layer == self.num_layers - 1 and not training:  # the caller's, never back in the pool
                out = np.empty((packing.rows, n_dirs * hd), self.dtype)
            else:
                out = self._pool.take((packing.rows, n_dirs * hd), self.dtype)
            dirs_ws = []
            for direction in range(n_dirs):
                row = layer * n_dirs + direction
                states = packing.sorted_states(states0, row, hd, self.dtype, final)
                if plan is not None:
                    plan.call(row, layer_in, out, states)
                    ws = None  # eval: no workspace
                else:
                    weights = self._direction_arrays(layer, direction, self.params, self._absent)
                    rmask = None
                    if training and self.recurrent_dropout > 0:
                        rmask = packing.sort(self._dropout_mask((packing.batch, hd), self.recurrent_dropout))
                    calls = None if record is None else []
                    ws = _engine.forward(self._cell, self._opts, weights, layer_in, states, packing, out,
                                         direction * hd, direction == 1, training, take, rmask, out_rows,
                                         x_rows if layer == 0 else None, calls)  # fmt: skip
                    if record is not None:
                        record.append((*calls[0], layer_in, out, states))
                packing.unsort_into(final, row, states)
                dirs_ws.append(ws)
            mask = None
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                # drawn in (T, N) order, then packed: the same mask whatever the row layout
                # (chunk count, unit split)
                padded = (packing.steps, packing.batch, out.shape[1])
                mask = packing.pack(self._dropout_mask(padded, self.dropout))
                out *= mask  # backward needs only the masked output (the next layer's input)
            layers_ws.append((dirs_ws, mask))
            if layer > 0 and not training:
                self._pool.give(layer_in)  # the previous layer's output, consumed
            layer_in = out
        return layers_ws + [layer_in if output is None else output]

    @staticmethod
    def _check_packed(name, packed, packing, error):
        """check_finite on packed rows (valid steps only), or on an unpacked (T, N, F) output
        (zeros at padded steps), naming the time step and sample."""
        bad = ~np.isfinite(packed)
        if not bad.any():
            return
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        if packed.ndim == 3:
            step, sample, col = first
        elif packing.identity:
            (step, sample), col = divmod(first[0], packing.batch), first[1]
        else:
            step, sample, col = int(packing.row_time[first[0]]), int(packing.row_sample[first[0]]), first[1]
        raise error(f"{name} has {int(bad.sum())} non-finite value(s); the first at time step {step}, sample "
                    f"{sample}, feature {col}: {packed[first]}")  # fmt: skip

    def _dropout_mask(self, shape, p):
        """Inverted dropout: 0 with probability p, else 1/(1-p)."""
        if p >= 1.0:
            return np.zeros(shape, self.dtype)
        keep = self._rng.random(shape, dtype=self.dtype) >= p
        return keep.astype(self.dtype) / self.dtype.type(1.0 - p)

    # ----------------------------------------------------------------- backward
    def backward(self, grad_output, grad_h_n=None):
        """Back-propagate through the preceding training-mode forward.

        Parameter gradients are added into :attr:`grads`. Each forward can be
        back-propagated once: backward consumes (and frees) the forward's workspace, so a
        second call raises ValueError until the next forward.

        Parameters
        ----------
        grad_output : array, same shape as the forward's ``out``
            Gradient of the loss with respect to ``out``.
        grad_h_n : array like ``h_n``; LSTM: pair like ``(h_n, c_n)``; optional
            Gradient with respect to the final states; None (or None elements) means zero.

        Returns
        -------
        dx : ndarray, same shape as ``x``
            Gradient with respect to the input (zero at padded steps).
        dhx : ndarray like ``hx`` (D*num_layers, N, H); LSTM: pair (dh0, dc0)
            Gradient with respect to the initial states.
        """
        cache = self._cache
        if cache is None:
            raise ValueError(
                "backward() needs a preceding forward() in training mode: call layer.train() "
                "and forward() first (each forward can be back-propagated once)"
            )
        spec = CELLS[self._cell]
        g = v.float_array("grad_output", grad_output, self.dtype)
        v.shape("grad_output", g, cache["out_shape"], "the forward's output shape")
        packing, unbatched = cache["packing"], cache["unbatched"]
        n_dirs, hd, batch = self.num_directions, self.hidden_size, packing.batch
        n_state_rows = self.num_layers * n_dirs
        state_shape = (n_state_rows, hd) if unbatched else (n_state_rows, batch, hd)
        dfinal = state_arrays("grad_h_n", grad_h_n, spec.n_states, state_shape, "h_n's shape", self.dtype)

        dfinal = [s if s is None or not unbatched else s[:, None, :] for s in dfinal]  # None: zeros
        dinitial = [np.zeros((n_state_rows, batch, hd), self.dtype) for _ in dfinal]  # sorted_states
        if unbatched:
            g3 = g[:, None, :]
        else:
            g3 = g.transpose(1, 0, 2) if self.batch_first else g
        dout = packing.pack(g3, self._pool.take)
        if self.check_finite:
            self._check_packed("grad_output", dout, packing, ValueError)
            for k, d in enumerate(dfinal):
                if d is not None:
                    v.finite("grad_h_n" if spec.n_states == 1 else f"grad_h_n[{k}]", d)
        self._cache = None  # every check passed: this backward consumes the workspace
        sizes = [self.input_size] + [n_dirs * hd] * (self.num_layers - 1)
        blas = weight_grads_call_blas(self._cell, packing, sizes, hd, self.dtype)
        with kernel_threads(packing, self._recurrent_weights, blas):
            for layer in range(self.num_layers - 1, -1, -1):
                dirs_ws, _ = cache["layers"][layer]
                cols = self.input_size if layer == 0 else n_dirs * hd
                dx = self._pool.take((packing.rows, cols), self.dtype)
                for direction in range(n_dirs):
                    row = layer * n_dirs + direction
                    dstates = packing.sorted_states(dfinal, row, hd, self.dtype, dinitial)
                    weights = self._direction_arrays(layer, direction, self.params, self._absent)
                    grads = self._direction_arrays(layer, direction, self.grads, self._absent_grads)
                    _engine.backward(self._cell, self._opts, weights, dirs_ws[direction], dout,
                                     direction * hd, dstates, packing, direction == 1, dx,
                                     direction == 1, grads, self._pool.take, self._pool.give)  # fmt: skip
                    packing.unsort_into(dinitial, row, dstates)
                # What this layer consumed goes back to the pool for the next training step,
                # except views of the user's arrays (packed input and gradient, when the
                # packing is the identity).
                if layer < self.num_layers - 1 or not packing.identity:
                    self._pool.give(dout)
                for ws in dirs_ws:
                    for key in _engine.SCRATCH_KEYS:
                        if key in ws:
                            self._pool.give(ws[key])
                if layer > 0 or not packing.identity:
                    self._pool.give(dirs_ws[0]["x"])
                if layer > 0:
                    mask = cache["layers"][layer - 1][1]
                    if mask is not None:
                        dx *= mask
                    dout = dx
        if self.check_finite:
            self._check_packed("dx", dx, packing, FloatingPointError)
            for name, g in self.grads.items():
                v.finite(f"grads[{name!r}]", g, error=FloatingPointError)
        dx_full = packing.unpack(dx)
        if not packing.identity:  # else dx_full is a view of dx
            self._pool.give(dx)
        if unbatched:
            dx_full, dinitial = dx_full[:, 0, :], [d[:, 0, :] for d in dinitial]
        elif self.batch_first:
            dx_full = dx_full.transpose(1, 0, 2)
        return dx_full, (dinitial[0] if spec.n_states == 1 else tuple(dinitial))


_COMMON_DOC = """
    Parameters
    ----------
    input_size : int
        C, features of each input step.
    hidden_size : int
        H, features of the hidden state.
    num_layers : int, default 1
        Stacked layers; layer k > 0 takes layer k-1's output.{extra}
    bias : bool, default True
        Use ``bias_ih``/``bias_hh``.
    batch_first : bool, default False
        Input and output are (N, T, features) instead of (T, N, features).
    dropout : float, default 0
        Dropout probability on the outputs of every layer but the last (training only).
    bidirectional : bool, default False
        Add a reverse direction; outputs concatenate both (D = 2).
    dtype : np.float32 or np.float64, keyword-only
        Precision of parameters, inputs and outputs.
    seed : int, optional, keyword-only
        Seeds initialisation and dropout masks (reproducible).
    check_finite : bool, default False, keyword-only
        Fail fast: forward raises ValueError if x or hx holds NaN/inf at a valid step and
        FloatingPointError if the output does; backward does the same for the incoming
        gradients and for dx and every parameter gradient. Messages name the tensor and the
        first offending time step and sample.
    recurrent_dropout : float, default 0, keyword-only
        Variational recurrent dropout (Gal & Ghahramani 2016; Keras' ``recurrent_dropout``):
        in training, each layer and direction draws one mask per sample and hidden unit,
        (N, H), and applies it to the state the recurrent weights read at every step (the
        same mask at every step, scaled by 1/(1-p)). GRU: the z*h term reads the unmasked
        state, as in Keras. Forward and backward; no effect in eval mode.{variant}

    Parameters are in :attr:`params` under torch's names: ``weight_ih_l{{k}}`` (G*H, C or
    D*H), ``weight_hh_l{{k}}`` (G*H, H), ``bias_ih_l{{k}}``, ``bias_hh_l{{k}}`` (G*H,), with a
    ``_reverse`` suffix for the reverse direction; gates stacked in order {gates}.
    Initialised from U(-1/sqrt(H), 1/sqrt(H)) like torch.
"""


class RNN(_RecurrentLayer):
    _cell = "rnn"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, *, dtype=np.float32,
                 seed=None, check_finite=False, recurrent_dropout=0.0):  # fmt: skip
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; received {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        opts = _engine.CellOptions(relu=nonlinearity == "relu")
        self._setup(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, dtype, seed, opts, check_finite=check_finite,
                    recurrent_dropout=recurrent_dropout)  # fmt: skip


RNN.__doc__ = (
    "Elman RNN, h' = act(W_ih x + b_ih + W_hh h + b_hh), as ``torch.nn.RNN``.\n"
    + _COMMON_DOC.format(
        extra="\n    nonlinearity : {'tanh', 'relu'}, default 'tanh'", variant="", gates="(G = 1)"
    )
)


class LSTM(_RecurrentLayer):
    _cell = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None,
                 peephole=False, forget_bias=0.0, check_finite=False,
                 recurrent_dropout=0.0):  # fmt: skip
        opts = _engine.CellOptions(peephole=v.flag("peephole", peephole))
        self._setup(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, dtype, seed, opts, forget_bias, check_finite=check_finite,
                    recurrent_dropout=recurrent_dropout)  # fmt: skip


LSTM.__doc__ = (
    "Long short-term memory, as ``torch.nn.LSTM``; hx and h_n are pairs (h, c).\n"
    + _COMMON_DOC.format(
        extra="",
        variant="\n    peephole : bool, default False, keyword-only\n        Peephole connections: i and f see c_{t-1}, o sees c_t, through\n"
        "        ``weight_peephole_l{k}`` (3, H), rows i, f, o.\n    forget_bias : float, default 0, keyword-only\n"
        "        Added to the forget-gate slice of ``bias_ih`` at initialisation (1.0 helps long\n        dependencies).",
        gates="i, f, g, o (G = 4)",
    )
)


class GRU(_RecurrentLayer):
    _cell = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, *, dtype=np.float32, seed=None,
                 reset_after=True, check_finite=False, recurrent_dropout=0.0):  # fmt: skip
        opts = _engine.CellOptions(reset_after=v.flag("reset_after", reset_after))
        self._setup(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                    bidirectional, dtype, seed, opts, check_finite=check_finite,
                    recurrent_dropout=recurrent_dropout)  # fmt: skip


GRU.__doc__ = "Gated recurrent unit, as ``torch.nn.GRU``.\n" + _COMMON_DOC.format(
    extra="",
    variant="\n    reset_after : bool, default True, keyword-only\n        True: n = tanh(W_in x + b_in + r*(W_hn h + b_hn)) (torch). False: the reset gate\n"
    "        is applied before the hidden GEMM, n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)\n        (Cho et al. 2014, Keras ``reset_after=False``).",
    gates="r, z, n (G = 3)",
)
