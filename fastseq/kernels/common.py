"""Pieces shared by every cell's kernels (see the shapes legend in __init__)."""

from __future__ import annotations

import numpy as np

from fastseq._jit import jit


@jit
def column_sums(a, col0, col1, out):
    """out (col1-col0,) = a[:, col0:col1].sum(axis=0), summed in row order (deterministic)."""
    out[:] = 0
    for r in range(a.shape[0]):
        for j in range(col0, col1):
            out[j - col0] += a[r, j]


@jit
def chunk_input_grads(dgates, x, hprev, w_ih, dx, accumulate_dx, dw_ih, dw_hh, db):
    """Deferred gradients of one chunk's GEMMs, over all its rows at once.

    dgates (Rc, G*H) in: gradients of the gate pre-activations of the chunk's rows.
    x (Rc, C), hprev (Rc, H), w_ih (G*H, C) in.
    dx (Rc, C) out, or += when accumulate_dx.
    dw_ih (G*H, C), dw_hh (G*H, H), db (G*H,) out: this chunk's partial sums (overwritten).
    """
    if accumulate_dx:
        dx += np.dot(dgates, w_ih)
    else:
        np.dot(dgates, w_ih, out=dx)
    np.dot(dgates.T, x, out=dw_ih)
    np.dot(dgates.T, hprev, out=dw_hh)
    column_sums(dgates, 0, dgates.shape[1], db)


@jit
def add_parts(parts, out):
    """out += parts[0] + parts[1] + ... in chunk order (deterministic reduction)."""
    for c in range(parts.shape[0]):
        out += parts[c]
