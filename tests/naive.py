"""Slow, obviously-correct NumPy references for every cell, forward and backward.

Written independently of fastseq's kernels: one sample and one time step at a time, in
padded (T, N, ...) layout, with per-sample sequence reversal for the reverse direction.
Parameters use torch's names (``weight_ih_l0`` ...), as fastseq's ``state_dict`` does.
"""

from __future__ import annotations

import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# ---------------------------------------------------------------- one step of one sample
def step(cell, variant, p, x, state, rmask=None):
    """One step. p: dict w_ih, w_hh, b_ih, b_hh (zeros if no bias), w_peep. state: tuple of (H,).
    rmask (H,): recurrent dropout mask on the h the recurrent weights read (GRU: not z*h).

    Returns (new_state, cache).
    """
    h = state[0]
    m = np.ones_like(h) if rmask is None else rmask
    hm = h * m
    gx = p["w_ih"] @ x + p["b_ih"]
    if cell == "rnn":
        a = gx + p["w_hh"] @ hm + p["b_hh"]
        y = np.maximum(a, 0) if variant.get("nonlinearity") == "relu" else np.tanh(a)
        return (y,), (x, hm, m, a, y)
    if cell == "lstm":
        c = state[1]
        hd = h.shape[0]
        a = gx + p["w_hh"] @ hm + p["b_hh"]
        ai, af, ag, ao = (a[k * hd : (k + 1) * hd].copy() for k in range(4))
        if variant.get("peephole"):
            ai += p["w_peep"][0] * c
            af += p["w_peep"][1] * c
        i, f, g = sigmoid(ai), sigmoid(af), np.tanh(ag)
        c1 = f * c + i * g
        if variant.get("peephole"):
            ao = ao + p["w_peep"][2] * c1
        o = sigmoid(ao)
        h1 = o * np.tanh(c1)
        return (h1, c1), (x, hm, m, c, i, f, g, o, c1)
    # gru
    hd = h.shape[0]
    w_hh, b_hh = p["w_hh"], p["b_hh"]
    r = sigmoid(gx[:hd] + w_hh[:hd] @ hm + b_hh[:hd])
    z = sigmoid(gx[hd : 2 * hd] + w_hh[hd : 2 * hd] @ hm + b_hh[hd : 2 * hd])
    if variant.get("reset_after", True):
        hn = w_hh[2 * hd :] @ hm + b_hh[2 * hd :]
        n = np.tanh(gx[2 * hd :] + r * hn)
    else:
        hn = r * hm
        n = np.tanh(gx[2 * hd :] + w_hh[2 * hd :] @ hn + b_hh[2 * hd :])
    h1 = (1 - z) * n + z * h
    return (h1,), (x, h, hm, m, r, z, n, hn)


def step_backward(cell, variant, p, cache, dstate, g):
    """Backward of one step. dstate: gradient of the new state (tuple). g: dict of grads (+=).

    Returns (dx, dstate_prev).
    """
    if cell == "rnn":
        x, h, m, a, y = cache  # h: the masked h the recurrent weights read
        da = dstate[0] * ((a > 0) if variant.get("nonlinearity") == "relu" else (1 - y * y))
        g["w_ih"] += np.outer(da, x)
        g["w_hh"] += np.outer(da, h)
        g["b_ih"] += da
        g["b_hh"] += da
        return p["w_ih"].T @ da, ((p["w_hh"].T @ da) * m,)
    if cell == "lstm":
        x, h, m, c, i, f, gg, o, c1 = cache
        dh1, dc1 = dstate
        tc = np.tanh(c1)
        dao = dh1 * tc * o * (1 - o)
        dc = dc1 + dh1 * o * (1 - tc * tc)
        if variant.get("peephole"):
            dc = dc + dao * p["w_peep"][2]
        dai = dc * gg * i * (1 - i)
        daf = dc * c * f * (1 - f)
        dag = dc * i * (1 - gg * gg)
        dc_prev = dc * f
        if variant.get("peephole"):
            dc_prev = dc_prev + dai * p["w_peep"][0] + daf * p["w_peep"][1]
            g["w_peep"][0] += dai * c
            g["w_peep"][1] += daf * c
            g["w_peep"][2] += dao * c1
        da = np.concatenate([dai, daf, dag, dao])
        g["w_ih"] += np.outer(da, x)
        g["w_hh"] += np.outer(da, h)
        g["b_ih"] += da
        g["b_hh"] += da
        return p["w_ih"].T @ da, ((p["w_hh"].T @ da) * m, dc_prev)
    x, h, hm, m, r, z, n, hn = cache
    hd = h.shape[0]
    dh1 = dstate[0]
    dn = dh1 * (1 - z)
    dz = dh1 * (h - n)
    dh = dh1 * z  # direct path, unmasked
    dhm = np.zeros_like(h)  # gradient of the masked h
    dan = dn * (1 - n * n)
    daz = dz * z * (1 - z)
    w_hh = p["w_hh"]
    if variant.get("reset_after", True):
        dr = dan * hn
        dar = dr * r * (1 - r)
        dhn = dan * r  # gradient of W_hn h + b_hn
        g["w_hh"][2 * hd :] += np.outer(dhn, hm)
        g["b_hh"][2 * hd :] += dhn
        dhm = dhm + w_hh[2 * hd :].T @ dhn
    else:
        drh = w_hh[2 * hd :].T @ dan
        dar = drh * hm * r * (1 - r)
        g["w_hh"][2 * hd :] += np.outer(dan, hn)
        g["b_hh"][2 * hd :] += dan
        dhm = dhm + drh * r
    da_rz = np.concatenate([dar, daz])
    g["w_hh"][: 2 * hd] += np.outer(da_rz, hm)
    g["b_hh"][: 2 * hd] += da_rz
    dhm = dhm + w_hh[: 2 * hd].T @ da_rz
    dh = dh + dhm * m
    da = np.concatenate([dar, daz, dan])
    g["w_ih"] += np.outer(da, x)
    g["b_ih"] += da
    return p["w_ih"].T @ da, (dh,)


# ------------------------------------------------------------------- a whole layer stack
N_STATES = {"rnn": 1, "lstm": 2, "gru": 1}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _direction_params(params, layer, direction, gh, hd, dtype, suffix_only=False):
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    p = {
        "w_ih": params["weight_ih" + sfx],
        "w_hh": params["weight_hh" + sfx],
        "b_ih": params.get("bias_ih" + sfx, np.zeros(gh, dtype)),
        "b_hh": params.get("bias_hh" + sfx, np.zeros(gh, dtype)),
        "w_peep": params.get("weight_peephole" + sfx, np.zeros((3, hd), dtype)),
    }
    return sfx, p


def _order(length, direction):
    return range(length - 1, -1, -1) if direction else range(length)


def layer_forward(cell, variant, params, x, h0, lengths, num_layers, bidirectional, masks=None, rmasks=None):
    """x (T, N, C); h0: tuple of (L*D, N, H). masks: list of (T, N, D*H) dropout masks
    applied to the output of layers 0..L-2 (or None). rmasks: {(layer, direction): (N, H)}
    recurrent dropout masks (or None). Returns out, final states, tape."""
    steps, batch, _ = x.shape
    dirs = 2 if bidirectional else 1
    hd = h0[0].shape[2]
    gh = GATES[cell] * hd
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    final = tuple(np.zeros_like(s) for s in h0)
    tape = []
    inp = x
    for layer in range(num_layers):
        out = np.zeros((steps, batch, dirs * hd), x.dtype)
        caches = {}
        for d in range(dirs):
            _, p = _direction_params(params, layer, d, gh, hd, x.dtype)
            for b in range(batch):
                state = tuple(s[layer * dirs + d, b].copy() for s in h0)
                rmask = None if rmasks is None else rmasks[layer, d][b]
                for t in _order(lengths[b], d):
                    state, caches[d, b, t] = step(cell, variant, p, inp[t, b], state, rmask)
                    out[t, b, d * hd : (d + 1) * hd] = state[0]
                for f, s in zip(final, state, strict=True):
                    f[layer * dirs + d, b] = s
        tape.append(caches)
        if masks is not None and layer < num_layers - 1:
            out = out * masks[layer]
        inp = out
    return inp, final, tape


def layer_backward(
    cell, variant, params, tape, grad_out, grad_final, lengths, num_layers, bidirectional, masks=None
):
    """Returns dx (T, N, C), d initial states (tuple), grads (dict keyed like params)."""
    steps, batch, _ = grad_out.shape
    dirs = 2 if bidirectional else 1
    hd = grad_final[0].shape[2]
    gh = GATES[cell] * hd
    dtype = grad_out.dtype
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    d_init = tuple(np.zeros_like(s) for s in grad_final)
    dout = grad_out
    for layer in range(num_layers - 1, -1, -1):
        cols = params[f"weight_ih_l{layer}"].shape[1]
        dx = np.zeros((steps, batch, cols), dtype)
        for d in range(dirs):
            sfx, p = _direction_params(params, layer, d, gh, hd, dtype)
            g = {k: np.zeros_like(v) for k, v in p.items()}
            for b in range(batch):
                dstate = [s[layer * dirs + d, b].copy() for s in grad_final]
                for t in reversed(list(_order(lengths[b], d))):
                    dstate[0] = dstate[0] + dout[t, b, d * hd : (d + 1) * hd]
                    dxt, dstate = step_backward(cell, variant, p, tape[layer][d, b, t], tuple(dstate), g)
                    dstate = list(dstate)
                    dx[t, b] += dxt
                for di, s in zip(d_init, dstate, strict=True):
                    di[layer * dirs + d, b] = s
            names = {
                "w_ih": "weight_ih",
                "w_hh": "weight_hh",
                "b_ih": "bias_ih",
                "b_hh": "bias_hh",
                "w_peep": "weight_peephole",
            }
            for k, name in names.items():
                if name + sfx in grads:
                    grads[name + sfx] += g[k]
        dout = dx if layer == 0 or masks is None else dx * masks[layer - 1]
    return dout, d_init, grads
