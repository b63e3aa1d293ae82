"""Threading policy: batch chunks on numba threads, each chunk with single-threaded BLAS.

Every layer kernel runs one ``prange`` over a fixed number of batch chunks; each chunk runs
its whole sequence, calling BLAS (``np.dot``) for its own GEMMs. Two thread pools must not
compete for the cores, so BLAS is held at one thread while a kernel runs (and restored
after; a reference count makes this correct when several Python threads run kernels).

The number of chunks is numba's thread count at start-up (``NUMBA_NUM_THREADS``), not the
current ``numba.set_num_threads`` value, so results are bitwise identical whatever thread
count is active: the chunks, and the order in which per-chunk gradients are summed, do not
change with it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numba

_lock = threading.Lock()
_active = 0
_controller = None
_saved = None


def num_chunks(batch: int) -> int:
    """Batch chunks for a batch of N samples (independent of the active thread count)."""
    return max(1, min(batch, numba.config.NUMBA_NUM_THREADS))


def _blas_controller():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls)
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController().select(user_api="blas")
        scipy_blas = [lib for lib in blas.lib_controllers if "scipy" in (lib.filepath or "")]
        _controller = scipy_blas or blas.lib_controllers
    return _controller


@contextmanager
def single_threaded_blas(needed: bool = True):
    """Hold the kernels' BLAS at one thread inside the block (no-op when not needed)."""
    global _active, _saved
    if not needed:
        yield
        return
    with _lock:
        if _active == 0:
            libs = _blas_controller()
            _saved = [lib.num_threads for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                for lib, n in zip(_blas_controller(), _saved, strict=True):
                    lib.set_num_threads(n)
