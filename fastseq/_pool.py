"""Reuse of workspace arrays between training steps.

A training loop allocates the same large workspaces every step; fresh arrays cost
first-touch page faults (measured 7-20% of an LSTM/GRU training step at N=64, T=100,
H=256). Backward hands the arrays it consumed back to its layer's pool and the next forward
takes them again; inference takes and gives back its packed input and output buffers the
same way. Every forward starts a step (:meth:`WorkspacePool.start_step`), which drops the
arrays given back before the previous step and not taken since: the pool holds at most
what the last two steps handed back, so shapes that stop recurring (variable batch sizes
or lengths) are freed. ``eval()`` empties it.
"""

from __future__ import annotations

import numpy as np

from fastseq._module import aligned_empty


class WorkspacePool:
    """Arrays no longer in use, by (shape, dtype), ready to be handed out again."""

    def __init__(self):
        self._free: dict = {}  # (shape, dtype) -> [(step given back, array), ...]
        self._step = 0

    def start_step(self) -> None:
        """Begin a step: drop what was given back before the previous step and not taken."""
        self._step += 1
        for key, stack in list(self._free.items()):
            stack[:] = [(step, a) for step, a in stack if step >= self._step - 1]
            if not stack:
                del self._free[key]

    def take(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array: a pooled one if one fits, else a new one
        (aligned like the parameters: the kernels load vectors from its rows)."""
        stack = self._free.get((tuple(shape), np.dtype(dtype)))
        return stack.pop()[1] if stack else aligned_empty(shape, dtype)

    def give(self, array: np.ndarray) -> None:
        """Return an array nobody else references any more."""
        if array.size:
            self._free.setdefault((array.shape, array.dtype), []).append((self._step, array))

    def clear(self) -> None:
        self._free.clear()
