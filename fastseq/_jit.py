"""The one place where numba jit options are decided.

Every kernel in :mod:`fastseq.kernels` is decorated with :func:`jit`, so the choices below
apply everywhere:

* ``error_model="numpy"``: no zero-division check on every float division. With the default
  ("python") model that check keeps LLVM from vectorising the gate loops.
* ``fastmath``: a subset that keeps NaN and inf semantics (no ``nnan``/``ninf``), so a NaN
  in the input propagates to the output instead of being optimised away.
* ``cache=True``: compiled kernels are written to numba's disk cache (``__pycache__`` next to
  the kernel sources, or ``NUMBA_CACHE_DIR``), so only the first run in a fresh environment
  pays the compile time. Kernels are compiled lazily: importing fastseq compiles nothing.
* ``nogil=True``: kernels release the GIL, so two Python threads can run two layers at once.
"""

from __future__ import annotations

import numba

#: LLVM fast-math flags used by every kernel (NaN/inf still propagate).
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

JIT_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": set(FASTMATH),
}


def jit(func=None, *, parallel: bool = False):
    """Compile ``func`` with fastseq's jit options (``parallel`` enables ``prange``)."""

    def wrap(f):
        return numba.njit(parallel=parallel, **JIT_OPTIONS)(f)

    return wrap if func is None else wrap(func)
