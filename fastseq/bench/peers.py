"""What fastseq is compared with, on the same weights: torch.nn, ONNX Runtime (inference),
JAX (XLA, ``lax.scan``) and a plain NumPy implementation.

Every peer takes ``(case, module, inputs, threads)`` and gives ``runner()``: a callable that
runs one timed unit of the case, or None when the peer cannot run the case (``note`` says
why). The ONNX Runtime and JAX runners return what they computed (the output, the stream's
last h; JAX's training step its gradients), which ``tests/test_peers.py`` checks against
fastseq's (torch.nn's own results: ``tests/test_torch_parity.py``).
"""

from __future__ import annotations

import numpy as np

from fastseq.registry import CELLS


class PeerUnavailable(RuntimeError):
    """The peer cannot run (e.g. torch is not installed)."""


#: The packages each peer needs (``fastseq[peers]`` installs them all).
PEER_PACKAGES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx"), "jax": ("jax", "jaxlib"),
                 "numpy": ()}  # fmt: skip
#: How to install them (for the CLI's message when one is missing).
PEER_INSTALL = {"torch": "pip install torch==2.13.0", "onnxruntime": "pip install onnxruntime onnx",
                "jax": "pip install jax"}  # fmt: skip


def missing_packages(peer: str) -> list:
    """The packages ``peer`` needs that cannot be imported here."""
    import importlib.util

    return [name for name in PEER_PACKAGES[peer] if importlib.util.find_spec(name) is None]


def require(peer: str) -> None:
    """Raise PeerUnavailable, naming the missing packages and the pip command, unless the
    packages ``peer`` needs can be imported."""
    missing = missing_packages(peer)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise PeerUnavailable(f"--compare {peer} needs {' and '.join(missing)}, which {verb} not installed: "
                              f"{PEER_INSTALL[peer]} (or pip install 'fastseq[peers]')")  # fmt: skip


def direction_weights(params, layer=None, direction=0):
    """(w_ih, w_hh, b_ih, b_hh) of one layer and direction from a torch-named state dict
    (gates in torch's order; zeros for a layer without biases); ``layer`` None: a cell's."""
    sfx = "" if layer is None else f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
    zeros = np.zeros(w_hh.shape[0], w_hh.dtype)
    return w_ih, w_hh, params.get("bias_ih" + sfx, zeros), params.get("bias_hh" + sfx, zeros)


class TorchPeer:
    """The same model through ``torch.nn`` (weights copied from fastseq)."""

    name = "torch"
    note = ""

    def __init__(self, case, module, inputs, threads=None):
        require("torch")
        import torch

        self.torch, self.case, self.inputs = torch, case, inputs
        if threads is not None:
            torch.set_num_threads(threads)
        dt = torch.float32 if case.dtype == "float32" else torch.float64
        spec = CELLS[case.cell]
        if case.mode == "stream":
            net = getattr(torch.nn, spec.torch_cell)(case.input_size, case.hidden_size)
        else:
            net = getattr(torch.nn, spec.torch_layer)(case.input_size, case.hidden_size, case.layers,
                                                      bidirectional=case.bidirectional)  # fmt: skip
        net = net.to(dt)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in module.state_dict().items()})
        self.net = net.train(case.mode == "train")
        self.x = torch.from_numpy(inputs.x)
        self.grad_out = torch.from_numpy(inputs.grad_out)
        self.lengths = None if inputs.lengths is None else torch.from_numpy(inputs.lengths)

    def _layer(self, x):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        if self.lengths is None:
            return self.net(x)[0]
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        return pad_packed_sequence(self.net(packed)[0], total_length=x.shape[0])[0]

    def runner(self):
        torch, net, x = self.torch, self.net, self.x
        if self.case.mode == "stream":

            def stream():
                with torch.no_grad():
                    h = None
                    for t in range(x.shape[0]):
                        h = net(x[t], h)
                return h

            return stream
        if self.case.mode == "forward":

            def forward():
                with torch.no_grad():
                    return self._layer(x)

            return forward
        xg = x.clone().requires_grad_(True)

        def train():
            out = self._layer(xg)
            out.backward(self.grad_out)
            net.zero_grad(set_to_none=True)
            xg.grad = None

        return train


class NumpyPeer:
    """A plain NumPy implementation, as a user would write it from a textbook.

    Forward and stream modes at full length; training steps and random lengths are not
    implemented (the report says so instead of a ratio).
    """

    name = "numpy"

    def __init__(self, case, module, inputs, threads=None):
        self.case, self.inputs = case, inputs
        self.params = module.state_dict()
        self.note = ""
        if case.mode == "train":
            self.note = "numpy peer has no training step"
        elif inputs.lengths is not None:
            self.note = "numpy peer runs full lengths only"

    def runner(self):
        if self.note:
            return None
        case, p, x = self.case, self.params, self.inputs.x
        if case.mode == "stream":
            w = direction_weights(p)

            def stream():
                h = np.zeros((x.shape[1], case.hidden_size), x.dtype)
                c = np.zeros_like(h)
                for t in range(x.shape[0]):
                    h, c = numpy_step(case.cell, w, x[t], h, c)
                return h

            return stream
        return lambda: numpy_layer(case, p, x)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def numpy_step(cell, w, x, h, c):
    """One textbook step; returns (h, c) (c unchanged for RNN/GRU)."""
    w_ih, w_hh, b_ih, b_hh = w
    return cell_equations(np, _sigmoid, cell, x @ w_ih.T + b_ih, h @ w_hh.T + b_hh, h, c)


def cell_equations(xp, sigmoid, cell, gx, gh, h, c):
    """torch's cell equations from a step's projections, biases included: gx = x @ w_ih.T +
    b_ih, gh = h @ w_hh.T + b_hh (N, G*H), gates in torch's order. Returns (h', c') (c
    unchanged for RNN/GRU). ``xp``: numpy or jax.numpy, ``sigmoid`` a function of it."""
    if cell == "rnn":
        return xp.tanh(gx + gh), c
    hd = h.shape[-1]
    if cell == "lstm":
        a = gx + gh
        i, f, o = sigmoid(a[:, :hd]), sigmoid(a[:, hd : 2 * hd]), sigmoid(a[:, 3 * hd :])
        c = f * c + i * xp.tanh(a[:, 2 * hd : 3 * hd])
        return o * xp.tanh(c), c
    r = sigmoid(gx[:, :hd] + gh[:, :hd])
    z = sigmoid(gx[:, hd : 2 * hd] + gh[:, hd : 2 * hd])
    n = xp.tanh(gx[:, 2 * hd :] + r * gh[:, 2 * hd :])
    return (1 - z) * n + z * h, c


def numpy_layer(case, p, x):
    """Textbook multi-layer (bi)directional forward over (T, N, C)."""
    inp = x
    for k in range(case.layers):
        outs = []
        for d in range(case.directions):
            w = direction_weights(p, k, d)
            h = np.zeros((x.shape[1], case.hidden_size), x.dtype)
            c = np.zeros_like(h)
            out = np.empty((x.shape[0], x.shape[1], case.hidden_size), x.dtype)
            steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
            for t in steps:
                h, c = numpy_step(case.cell, w, inp[t], h, c)
                out[t] = h
            outs.append(out)
        inp = np.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return inp


def _onnxruntime_peer(*args, **kwargs):
    from fastseq.bench.onnx_peer import OnnxRuntimePeer

    return OnnxRuntimePeer(*args, **kwargs)


def _jax_peer(*args, **kwargs):
    from fastseq.bench.jax_peer import JaxPeer

    return JaxPeer(*args, **kwargs)


PEERS = {"torch": TorchPeer, "onnxruntime": _onnxruntime_peer, "jax": _jax_peer, "numpy": NumpyPeer}
