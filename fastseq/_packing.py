"""Per-sample lengths -> the packed row layout the kernels use (see fastseq.kernels)."""

from __future__ import annotations

import numpy as np


class Packing:
    """Row layout of a batch of variable-length sequences, sorted longest first.

    Parameters
    ----------
    lengths : ndarray of int64, shape (N,), or None
        Valid steps per sample (already validated: 1 <= lengths <= T). None: all T.
    steps : int
        T, the padded length.
    batch : int
        N.
    """

    def __init__(self, lengths, steps: int, batch: int):
        self.steps = steps
        self.batch = batch
        if lengths is None or bool(np.all(lengths == steps)):
            self.identity = True
            self.order = np.arange(batch, dtype=np.int64)
            self.lengths = np.full(batch, steps, dtype=np.int64)
            self.batch_sizes = np.full(steps, batch, dtype=np.int64)
        else:
            self.identity = False
            self.order = np.argsort(-lengths, kind="stable").astype(np.int64)
            self.lengths = np.ascontiguousarray(lengths[self.order], dtype=np.int64)
            longest = int(self.lengths[0])
            self.batch_sizes = (self.lengths[None, :] > np.arange(longest)[:, None]).sum(1)
            self.batch_sizes = self.batch_sizes.astype(np.int64)
        self.offsets = np.zeros(self.batch_sizes.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.batch_sizes, out=self.offsets[1:])
        self.rows = int(self.offsets[-1])
        self.inverse = np.empty_like(self.order)
        self.inverse[self.order] = np.arange(batch)
        if not self.identity:
            # Packed row -> (time step, original sample index).
            self.row_time = np.repeat(np.arange(self.batch_sizes.shape[0]), self.batch_sizes)
            self.row_sample = self.order[np.arange(self.rows) - self.offsets[self.row_time]]

    def pack(self, a):
        """(T, N, F) -> (R, F) C-contiguous, writable (a copy unless ``a`` already fits)."""
        if self.identity:
            packed = np.ascontiguousarray(a).reshape(self.rows, a.shape[2])
            return packed if packed.flags.writeable else packed.copy()
        return a[self.row_time, self.row_sample]

    def unpack(self, packed):
        """(R, F) -> (T, N, F), zeros at padded steps."""
        if self.identity:
            return packed.reshape(self.steps, self.batch, packed.shape[1])
        full = np.zeros((self.steps, self.batch, packed.shape[1]), dtype=packed.dtype)
        full[self.row_time, self.row_sample] = packed
        return full

    def sort(self, state):
        """(..., N, H) in the user's sample order -> contiguous copy in sorted order."""
        return np.ascontiguousarray(state[..., self.order, :])

    def unsort(self, state):
        """(..., N, H) in sorted order -> the user's sample order."""
        return state[..., self.inverse, :]
