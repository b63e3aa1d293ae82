"""Epilogues shared by every cell's backward kernel (see the shapes legend in __init__)."""

from __future__ import annotations

import numpy as np

from fastseq._jit import jit


@jit
def add_column_sums(a, out):
    """out (F,) += a.sum(axis=0) for a (R, F), summed in row order (deterministic)."""
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[r, j]


@jit
def input_and_weight_grads(dgates, x, hprev, w_ih, dx, accumulate_dx, dw_ih, dw_hh):
    """Deferred gradients of the input GEMMs over all rows at once.

    dgates (R, G*H) in: gradients of the gate pre-activations.
    x (R, C), hprev (R, H) in. w_ih (G*H, C) in.
    dx (R, C) out, or += when accumulate_dx. dw_ih (G*H, C), dw_hh (G*H, H) +=.
    """
    if accumulate_dx:
        dx += np.dot(dgates, w_ih)
    else:
        np.dot(dgates, w_ih, out=dx)
    dw_ih += np.dot(dgates.T, x)
    dw_hh += np.dot(dgates.T, hprev)
