"""Model containers: Sequential (a chain of modules) and Seq2Seq (encoder-decoder).

Both chain forward and backward through their modules and keep every parameter and gradient
in one flat buffer (``flat_params``, ``flat_grads``): each module's arrays are views into it,
so optimisers, clipping and an MPI allreduce touch one array. Checkpoints are a ``.npz`` of
the parameters plus a ``.json`` architecture file (no pickle); :func:`load` rebuilds the model
and validates the parameters like ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastseq._module import Module, aligned_empty
from fastseq.layers import GRU, LSTM, RNN, _RecurrentLayer
from fastseq.nn.modules import Dropout, Embedding, Linear
from fastseq.nn.sequence import LastStep

CHECKPOINT_FORMAT = "fastseq-checkpoint"
CHECKPOINT_VERSION = 1
#: Module types a checkpoint may name.
MODULE_TYPES = {cls.__name__: cls for cls in (RNN, LSTM, GRU, Linear, Embedding, Dropout, LastStep)}


def _flatten(owner, children):
    """Copy the parameters and gradients of ``children`` ({prefix: module}) into one flat
    buffer each and make every module use views of them. Sets ``owner.params``/``grads``
    (prefixed names) and ``owner.flat_params``/``flat_grads``."""
    dtypes = {p.dtype for m in children.values() for p in m.params.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"all modules must share one dtype for the flat parameter buffer; received {sorted(d.name for d in dtypes)}"
        )
    dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
    total = sum(p.size for m in children.values() for p in m.params.values())
    # starting ALIGN_BYTES aligned: so does every view when the arrays before it are
    # multiples of 64 bytes (the usual weight shapes)
    flat_params, flat_grads = aligned_empty((total,), dtype), aligned_empty((total,), dtype)
    params, grads, offset = {}, {}, 0
    for prefix, module in children.items():
        for name, p in module.params.items():
            key = f"{prefix}.{name}"
            params[key] = flat_params[offset : offset + p.size].reshape(p.shape)
            grads[key] = flat_grads[offset : offset + p.size].reshape(p.shape)
            params[key][...] = p
            grads[key][...] = module.grads[name]
            offset += p.size
    owner._bind(params, grads)
    owner.flat_params, owner.flat_grads = flat_params, flat_grads


def _split(table, prefix):
    """Entries of ``table`` under ``prefix.``, with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in table.items() if k.startswith(start)}


class _Container(Module):
    """Shared parts: children, train/eval, zero_grad, _bind, save."""

    def _children(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def _bind(self, params, grads):
        super()._bind(params, grads)
        for prefix, module in self._children().items():
            module._bind(_split(params, prefix), _split(grads, prefix))
            if isinstance(module, _Container):
                module.flat_params = module.flat_grads = None  # now views of this buffer

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._children().values():
            module.train(mode)
        return self

    def zero_grad(self) -> None:
        if self.flat_grads is not None:
            self.flat_grads.fill(0)
        else:
            super().zero_grad()

    @property
    def dtype(self):
        return (
            self.flat_params.dtype if self.flat_params is not None else next(iter(self.params.values())).dtype
        )

    def save(self, path, metadata=None):
        """Write ``path.npz`` (parameters) and ``path.json`` (architecture + ``metadata``, a
        JSON-serialisable dict). Returns the two paths."""
        return save(self, path, metadata)


class Sequential(_Container):
    """Modules applied in order; recurrent layers get ``lengths`` and their initial states.

    ``model(x, lengths=None, state=None)`` runs every module: a recurrent layer (RNN, LSTM,
    GRU) receives ``lengths`` and its entry of ``state`` and passes its output on, its final
    state is collected in :attr:`final_states`; modules with ``uses_lengths`` (e.g.
    :class:`~fastseq.nn.LastStep`) receive ``lengths``; others receive the output of the
    previous one. ``model.backward(grad, grad_state=None)`` runs the modules' backward in
    reverse and returns the gradient of the input (None when the first module is an
    Embedding); the gradients of the initial states are in :attr:`grad_initial_states`.

    Parameters are named ``"{index}.{name}"`` (e.g. ``"1.weight_ih_l0"``), as torch's
    ``nn.Sequential`` does, and live in one flat buffer, :attr:`flat_params` (gradients:
    :attr:`flat_grads`). Optimisers and clipping given the model use the flat buffers.
    """

    def __init__(self, *modules):
        for k, m in enumerate(modules):
            if not isinstance(m, Module) or isinstance(m, type):
                raise TypeError(f"module {k} must be a fastseq module instance; received {m!r}")
        if not modules:
            raise ValueError("Sequential needs at least one module")
        self.modules = list(modules)
        self.training = True
        self.final_states = []
        self.grad_initial_states = []
        _flatten(self, self._children())

    def _children(self):
        return {str(k): m for k, m in enumerate(self.modules)}

    def __repr__(self):
        inner = ",\n".join(f"  ({k}): {m!r}" for k, m in enumerate(self.modules))
        return f"Sequential(\n{inner}\n)"

    @property
    def recurrent_layers(self):
        """The recurrent layers, in order (one ``state`` entry each)."""
        return [m for m in self.modules if isinstance(m, _RecurrentLayer)]

    def config(self):
        return {"type": "Sequential", "modules": [_spec(m) for m in self.modules]}

    def forward(self, x, lengths=None, state=None):
        """Run the chain. ``state``: None, or a list with one entry per recurrent layer (its
        ``hx``, or None). Returns the last module's output."""
        n_rec = len(self.recurrent_layers)
        if state is None:
            state = [None] * n_rec
        elif not isinstance(state, (list, tuple)) or len(state) != n_rec:
            raise ValueError(
                f"state must be a list with one entry per recurrent layer ({n_rec}); received "
                + (f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__)
            )
        finals, k = [], 0
        for m in self.modules:
            if isinstance(m, _RecurrentLayer):
                x, h_n = m(x, state[k], lengths)
                finals.append(h_n)
                k += 1
            elif getattr(m, "uses_lengths", False):
                x = m(x, lengths)
            else:
                x = m(x)
        self.final_states = finals
        return x

    def backward(self, grad, grad_state=None):
        """Back-propagate ``grad`` (gradient of the output); ``grad_state``: None or one entry
        per recurrent layer (gradient of its final state). Returns the input gradient."""
        n_rec = len(self.recurrent_layers)
        if grad_state is None:
            grad_state = [None] * n_rec
        elif not isinstance(grad_state, (list, tuple)) or len(grad_state) != n_rec:
            raise ValueError(f"grad_state must be a list with one entry per recurrent layer ({n_rec})")
        dinit, k = [], n_rec
        for i in range(len(self.modules) - 1, -1, -1):
            m = self.modules[i]
            if isinstance(m, _RecurrentLayer):
                k -= 1
                grad, dh = m.backward(grad, grad_state[k])
                dinit.insert(0, dh)
            else:
                grad = m.backward(grad)
                if grad is None and i > 0:
                    raise ValueError(
                        f"module {i} ({type(m).__name__}) returns no input gradient; it must come first"
                    )
        self.grad_initial_states = dinit
        return grad


class Seq2Seq(_Container):
    """Encoder-decoder: the encoder's final states start the decoder.

    ``model(src, tgt_in, src_lengths=None, tgt_lengths=None)`` runs the encoder over ``src``
    and the decoder over ``tgt_in`` (teacher forcing: the true previous tokens), the decoder's
    k-th recurrent layer starting from the encoder's k-th final state (their shapes must
    match). ``backward(grad)`` sends the decoder's initial-state gradients back into the
    encoder. Free-running decoding: :func:`fastseq.nn.generate` with ``state=`` from
    :meth:`encode`. Parameters are ``encoder.*`` and ``decoder.*`` in one flat buffer.
    """

    def __init__(self, encoder, decoder):
        for name, part in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(part, Sequential):
                raise TypeError(f"{name} must be a fastseq.nn.Sequential; received {type(part).__name__}")
        enc, dec = encoder.recurrent_layers, decoder.recurrent_layers
        if len(enc) != len(dec) or not enc:
            raise ValueError(
                f"encoder and decoder need the same number (>= 1) of recurrent layers; received {len(enc)} and {len(dec)}"
            )
        for k, (a, b) in enumerate(zip(enc, dec, strict=True)):
            if (type(a), a.num_layers * a.num_directions, a.hidden_size) != (
                type(b), b.num_layers * b.num_directions, b.hidden_size
            ):  # fmt: skip
                raise ValueError(
                    f"recurrent layer {k}: the encoder's final state ({a!r}) does not fit the decoder's ({b!r})"
                )
        self.encoder, self.decoder = encoder, decoder
        self.training = True
        _flatten(self, self._children())

    def _children(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def config(self):
        return {"type": "Seq2Seq", "encoder": self.encoder.config(), "decoder": self.decoder.config()}

    def encode(self, src, src_lengths=None):
        """Run the encoder; returns its final states (the decoder's initial ``state``)."""
        self.encoder(src, src_lengths)
        return self.encoder.final_states

    def forward(self, src, tgt_in, src_lengths=None, tgt_lengths=None):
        """Teacher-forced decoder output over ``tgt_in``."""
        enc_out = self.encoder(src, src_lengths)
        self._enc_out_shape, self._enc_out_dtype = np.shape(enc_out), np.asarray(enc_out).dtype
        return self.decoder(tgt_in, tgt_lengths, state=self.encoder.final_states)

    def backward(self, grad):
        """Back-propagate through the decoder, then the encoder; returns the encoder's input
        gradient (None when it starts with an Embedding)."""
        self.decoder.backward(grad)
        zeros = np.zeros(self._enc_out_shape, self._enc_out_dtype)
        return self.encoder.backward(zeros, self.decoder.grad_initial_states)


# ----------------------------------------------------------------------------- checkpoints
def _spec(module):
    if isinstance(module, _Container):
        return module.config()
    name = type(module).__name__
    if name not in MODULE_TYPES:
        raise TypeError(
            f"cannot checkpoint a {name}; supported: {sorted(MODULE_TYPES)} in Sequential/Seq2Seq"
        )
    return {"type": name, "config": module.config()}


def _paths(path):
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.parent / (stem.name + ".npz"), stem.parent / (stem.name + ".json")


def save(model, path, metadata=None):
    """Save ``model`` (Sequential or Seq2Seq) as ``path.npz`` + ``path.json``; returns both."""
    from fastseq import __version__

    if not isinstance(model, _Container):
        raise TypeError(f"model must be a Sequential or Seq2Seq; received {type(model).__name__}")
    npz_path, json_path = _paths(path)
    document = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fastseq": __version__,
                "model": model.config(), "metadata": metadata or {}}  # fmt: skip
    text = json.dumps(document, indent=2)  # fails before writing anything if not serialisable
    np.savez(npz_path, **model.params)
    json_path.write_text(text + "\n")
    return npz_path, json_path


def _build(spec, where):
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"checkpoint: {where} must be an object with a 'type'; received {spec!r}")
    kind = spec["type"]
    if kind == "Sequential":
        modules = spec.get("modules")
        if not isinstance(modules, list) or not modules:
            raise ValueError(f"checkpoint: {where}.modules must be a non-empty list")
        return Sequential(*(_build(m, f"{where}.modules[{k}]") for k, m in enumerate(modules)))
    if kind == "Seq2Seq":
        return Seq2Seq(
            _build(spec.get("encoder"), f"{where}.encoder"), _build(spec.get("decoder"), f"{where}.decoder")
        )
    if kind not in MODULE_TYPES:
        raise ValueError(
            f"checkpoint: {where} has unknown type {kind!r}; expected one of {sorted(MODULE_TYPES)}"
        )
    config = spec.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint: {where}.config must be an object; received {config!r}")
    try:
        return MODULE_TYPES[kind](**config)
    except TypeError as err:
        raise ValueError(f"checkpoint: {where} ({kind}) has an invalid config {config}: {err}") from err


def load(path):
    """Rebuild a model saved by :func:`save` (no pickle). Returns ``(model, metadata)``.

    Raises ValueError when the JSON is not a fastseq checkpoint, names unknown modules or
    invalid arguments, or when the parameters' names or shapes do not match the architecture
    (nothing is half-loaded: the model is built first and loaded only if every check passes).
    """
    npz_path, json_path = _paths(path)
    for p in (npz_path, json_path):
        if not p.exists():
            raise FileNotFoundError(f"checkpoint file {p} does not exist")
    try:
        document = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint: {json_path} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {json_path} is not a {CHECKPOINT_FORMAT} file")
    if document.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint: version {document.get('version')!r} is not supported; expected {CHECKPOINT_VERSION}"
        )
    model = _build(document.get("model"), "model")
    with np.load(npz_path, allow_pickle=False) as arrays:
        model.load_state_dict({k: arrays[k] for k in arrays.files})
    return model, document.get("metadata", {})
