"""Parameter handling shared by layers and cells: params, grads, state_dict, train/eval."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fastseq._jit import jit
from fastseq.kernels.gemm import ALIGN_BYTES


class Module:
    """Base of every object with parameters.

    Attributes
    ----------
    params : dict of str -> ndarray
        The live parameter arrays (torch's names). Update them in place, e.g.
        ``p -= lr * module.grads[name]``; ``load_state_dict`` also writes in place.
    grads : dict of str -> ndarray
        Gradients with the same keys and shapes, accumulated by ``backward`` until
        :meth:`zero_grad`.
    training : bool
        Training mode (default): forward keeps what backward needs. Eval mode runs the
        inference path and keeps nothing.
    """

    params: dict
    grads: dict
    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Copies of the parameters, keyed by torch's names."""
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state) -> None:
        """Copy parameters in from a mapping of names to array-likes.

        Accepts anything ``np.asarray`` understands (for example ``t.detach().numpy()`` of
        torch tensors). Every key and shape is checked before any parameter changes.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, or a value is not numeric.
        ValueError
            Keys are missing or unexpected, or a value has the wrong shape.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays; received {type(state).__name__}")
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                f"expected exactly {sorted(self.params)}"
            )
        staged = {}
        for name, current in self.params.items():
            value = np.asarray(state[name])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"load_state_dict: {name!r} must be numeric; received dtype {value.dtype}")
            if value.shape != current.shape:
                raise ValueError(
                    f"load_state_dict: {name!r} has shape {value.shape}; expected {current.shape}"
                )
            staged[name] = value
        for name, value in staged.items():
            self.params[name][...] = value

    def zero_grad(self) -> None:
        """Set every accumulated gradient to zero."""
        for g in self.grads.values():
            g.fill(0)

    def train(self, mode: bool = True):
        """Switch training mode on (default) or off; returns self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be True or False; received {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to eval (inference) mode; returns self."""
        return self.train(False)

    def config(self) -> dict:
        """Constructor arguments that rebuild this module (JSON-serialisable; checkpoints)."""
        raise NotImplementedError(f"{type(self).__name__} has no config")

    def _bind(self, params: dict, grads: dict) -> None:
        """Use these arrays (same names and shapes; e.g. views of a flat buffer) as the
        parameters and gradients from now on. Subclasses caching views refresh them."""
        self.params, self.grads = params, grads


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` (a tuple) whose data starts ALIGN_BYTES (a cache
    line) into memory, a view of a slightly larger byte buffer: parameters, the layers'
    workspaces (``_pool``), like the kernels' panels (``kernels.gemm.aligned_empty``).

    numpy aligns to 16 bytes, so the rows of a weight matrix read in place (the streaming
    step's products, ``gemm.few_rows_nt``) started 16 or 48 bytes into a cache line in some
    processes, and a 32-byte load from there spans two lines. Measured (float32, Intel Xeon,
    one input row by (M, 128) weights, us, rows at 0 / 16 / 32 bytes into a line): M = 128
    0.77 / 1.01 / 0.76; M = 512 3.0 / 3.8 / 3.0; M = 1024 6.1 / 7.6 / 6.0. ``Stream.step`` at
    N=1, H=128, LSTM: 10.3 us with W_hh at 16 and W_ih at 48 bytes, 8.9-9.0 aligned; GRU 7.5
    / 7.0-7.2 (processes before and after, interleaved).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # math.prod: np.prod of a tuple took 2.8 us
    if nbytes == 0:  # the empty workspaces of inference: no data to align, no address lookup
        return np.empty(shape, dtype)
    buffer = np.empty(nbytes + ALIGN_BYTES, np.uint8)
    start = -_address(buffer) % ALIGN_BYTES
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


@jit
def _address(buffer):
    """The address of ``buffer``'s (1-D uint8) data: 0.12 us through numba's dispatcher,
    against 0.81 for ``buffer.ctypes.data`` (Zen 5); a layer's eval call allocates its
    output here every time."""
    return buffer.ctypes.data


def uniform_init(rng, shapes: dict, hidden_size: int, dtype) -> dict:
    """torch's default init: every array drawn from U(-1/sqrt(H), 1/sqrt(H)), in dict order,
    into arrays aligned to ALIGN_BYTES (:func:`aligned_empty`)."""
    bound = 1.0 / np.sqrt(hidden_size)
    params = {}
    for name, shape in shapes.items():
        params[name] = aligned_empty(shape, dtype)
        params[name][...] = rng.uniform(-bound, bound, size=shape)
    return params
