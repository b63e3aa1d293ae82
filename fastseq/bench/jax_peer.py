"""JAX as a peer of ``fastseq bench``: the layer as a JAX user writes it, jitted by XLA.

Each layer and direction projects the input of every step in one product, then runs the
recurrence with ``jax.lax.scan`` (torch's cell equations, gates in torch's order). Random
lengths: every sample runs T steps, its state frozen and its output zero past its length;
the reverse direction reads each sample's valid steps backwards (a per-sample gather).
A training step is ``jax.grad`` of ``sum(output * grad_out)`` with respect to the weights
and the input; a stream calls a jitted one-step function per step and waits for its state.
XLA runs on its own thread pool, which cannot be limited from here: with ``--threads``
fewer than the CPUs the peer does not run (``note``).
"""

from __future__ import annotations

import os

import numpy as np

from fastseq.bench.peers import cell_equations, direction_weights, require


def _step(jax, jnp, cell):
    """(state, gx_t, w_hh, b_hh) -> new state: one step of torch's cell equations
    (``peers.cell_equations``), with gx_t = x_t @ w_ih.T + b_ih; state h, or (h, c) for the
    LSTM."""
    lstm = cell == "lstm"

    def step(state, gx, w_hh, b_hh):
        h, c = state if lstm else (state, None)
        h, c = cell_equations(jnp, jax.nn.sigmoid, cell, gx, h @ w_hh.T + b_hh, h, c)
        return (h, c) if lstm else h

    return step


def build_layer(jax, jnp, cell, layers, directions, hidden):
    """fn(weights, x, lengths) -> (T, N, D*H): ``weights`` a list per layer of a list per
    direction of (w_ih, w_hh, b_ih, b_hh); x (T, N, C); lengths (N,) int, or None."""
    step = _step(jax, jnp, cell)
    lstm = cell == "lstm"

    def direction(w, x, mask, order):
        w_ih, w_hh, b_ih, b_hh = w
        if order is not None:  # reverse: each sample's valid steps backwards
            x = jnp.take_along_axis(x, order[:, :, None], axis=0)
        gx = x @ w_ih.T + b_ih
        h0 = jnp.zeros((x.shape[1], hidden), x.dtype)

        def body(state, inputs):
            gx_t, keep = inputs
            new = step(state, gx_t, w_hh, b_hh)
            if keep is not None:
                new = jax.tree_util.tree_map(lambda n, s: jnp.where(keep, n, s), new, state)
            h = new[0] if lstm else new
            return new, h if keep is None else jnp.where(keep, h, 0)

        _, out = jax.lax.scan(body, (h0, h0) if lstm else h0, (gx, mask))
        if order is not None:
            out = jnp.take_along_axis(out, order[:, :, None], axis=0)
        return out

    def layer_stack(weights, x, lengths):
        steps, batch = x.shape[0], x.shape[1]
        mask = None
        t = jnp.arange(steps)[:, None]
        if lengths is not None:
            mask = (t < lengths[None, :])[:, :, None]
            reverse_order = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
        else:
            reverse_order = jnp.broadcast_to(steps - 1 - t, (steps, batch))
        for k in range(layers):
            outs = [
                direction(weights[k][d], x, mask, reverse_order if d else None) for d in range(directions)
            ]
            x = outs[0] if directions == 1 else jnp.concatenate(outs, axis=-1)
        return x

    return layer_stack


class JaxPeer:
    """The same model in JAX (weights copied from fastseq), jitted."""

    name = "jax"

    def __init__(self, case, module, inputs, threads=None):
        require("jax")
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.case, self.inputs = jax, jnp, case, inputs
        self.note = ""
        if threads is not None and threads < len(os.sched_getaffinity(0)):
            self.note = "jax's thread pool cannot be limited (--threads)"
            return
        if case.dtype == "float64":
            jax.config.update("jax_enable_x64", True)  # else JAX computes float64 data in float32
        params = module.state_dict()
        to_jax = jnp.asarray
        if case.mode == "stream":
            self.weights = tuple(to_jax(w) for w in direction_weights(params))
        else:
            self.weights = [[tuple(to_jax(w) for w in direction_weights(params, k, d))
                             for d in range(case.directions)] for k in range(case.layers)]  # fmt: skip
        self.x = to_jax(inputs.x)
        self.lengths = None if inputs.lengths is None else to_jax(inputs.lengths.astype(np.int32))
        self.grad_out = to_jax(inputs.grad_out)

    def runner(self):
        if self.note:
            return None
        jax, jnp, case, x = self.jax, self.jnp, self.case, self.x
        if case.mode == "stream":
            step = _step(jax, jnp, case.cell)

            def cell_step(w, state, x_t):
                w_ih, w_hh, b_ih, b_hh = w
                return step(state, x_t @ w_ih.T + b_ih, w_hh, b_hh)

            one_step = jax.jit(cell_step)  # weights as arguments, not constants folded in
            h0 = jnp.zeros((case.batch, case.hidden_size), x.dtype)
            start = (h0, h0) if case.cell == "lstm" else h0
            rows = [x[t] for t in range(x.shape[0])]
            weights = self.weights

            def stream():
                state = start
                for x_t in rows:
                    state = jax.block_until_ready(one_step(weights, state, x_t))
                return state[0] if case.cell == "lstm" else state

            return stream
        layer = build_layer(jax, jnp, case.cell, case.layers, case.directions, case.hidden_size)
        weights, lengths, grad_out = self.weights, self.lengths, self.grad_out
        if case.mode == "forward":
            forward = jax.jit(layer)  # every array an argument (None: full lengths)
            return lambda: jax.block_until_ready(forward(weights, x, lengths))

        def loss(w, x, lengths, grad_out):
            return jnp.sum(layer(w, x, lengths) * grad_out)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: jax.block_until_ready(grads(weights, x, lengths, grad_out))
