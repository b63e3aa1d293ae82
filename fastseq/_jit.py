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
  numba checks a cached kernel against its own source file only: after an edit of
  ``kernels/gemm.py`` alone, the layer kernels of ``rnn.py`` etc. still load their cached
  copies with the old products linked in. When editing kernels, measure and test with a
  fresh ``NUMBA_CACHE_DIR`` (a clean checkout has no cache).
* ``nogil=True``: kernels release the GIL, so two Python threads can run two layers at once.
* ``inline=True`` (per function): numba inlines the function into its callers' IR. For the
  per-row helpers of the time loops (gate math, row copies): called, they receive array views,
  and each view costs an atomic reference-count increment and decrement plus a call with
  ~30 arguments, which LLVM does not inline once the callee is vectorised. Measured (float32,
  one thread, the RNN gate loop plus the output row copy, ns per element, called / inlined):
  16 rows x H=64: 0.97 / 0.29; 64 x 128: 0.67 / 0.29; 4 x 4096: 0.51 / 0.29. Used for the
  RNN's gate loops and the row copies. The LSTM and GRU gate math inlined straight into the
  layer kernels ran slower, LSTM forward 1.05-1.07x and GRU forward 1.22-1.39x the time
  (32x100x64, 128x50x128), backward 0.96-1.04; it is inlined instead into a called
  function that runs all rows of a step (``lstm.lstm_rows_forward`` and its kin), one call
  per step rather than per row. The arrays those per-step calls receive are borrowed
  (:mod:`fastseq.kernels.refs`): their reference counts cost nothing.
  Also used, for compile time, by thin set-up wrappers called only from functions that are
  not ``parallel`` (the input projection's set-up in ``kernels.common``, ``gemm_pair``,
  ``pack_for_large``). numba compiles every jitted function into a library of its own
  that links in the code of all its callees and optimises and emits the whole again:
  a wrapper around the products (about 50 functions with the micro-kernels) cost about 1
  s of LLVM time on its own, and LLVM took 28 s of the 40 s of a first RNN forward from
  an empty cache. Inlined, the wrapper has no library. Measured (Zen 5, empty cache,
  ``benchmarks/cold_start.py`` and first training steps, two runs each, before / after):
  first forward RNN 36.4-36.6 / 31.3-32.9 s, all three cells 53.4-53.6 / 48.4-50.1 s;
  first training steps of the three 124.8-126.7 / 119.0-120.0 s. Inlined into the
  ``parallel`` kernels as well (the per-step product dispatchers, ``start_chunk``,
  ``step_panels`` ...), the first RNN forward took 30 s but the whole ``fastseq bench
  --preset targets`` from an empty cache 11 s longer: numba's parfor passes cost more on
  the larger parallel functions. Run times unchanged (A/B, eight layer shapes through
  those paths, 0.96-1.03, within the rounds' spread).
* ``reassociate=False`` (per function): no ``reassoc`` flag, the expressions grouped by
  hand instead. numba links a called function's IR into every kernel that calls it and
  optimises it there, while a kernel loaded from the cache may call another copy: with
  ``reassoc``, LLVM regrouped the LSTM's gate gradients differently in the two, and a
  training step's gradients differed in the last bits between a process that compiled the
  kernels and one that loaded them from the cache (dx by up to 9e-8, weight gradients by
  up to 3e-6, float32; 114 of 354 arrays over every variant, all LSTM). Used for
  ``lstm_cell_backward``: 1.01x the time of a training step with ``reassoc`` (LSTM,
  32x100x64 and 4x50x512, A/B).
"""

from __future__ import annotations

import numba
import numpy as np

#: LLVM fast-math flags used by every kernel (NaN/inf still propagate).
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

JIT_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": set(FASTMATH),
}


def jit(func=None, *, parallel: bool = False, inline: bool = False, reassociate: bool = True):
    """Compile ``func`` with fastseq's jit options (``parallel`` enables ``prange``;
    ``inline``: inlined into every caller, see above; ``reassociate=False`` drops the
    ``reassoc`` flag, see the module docstring)."""

    def wrap(f):
        extra = {"inline": "always"} if inline else {}
        options = dict(JIT_OPTIONS)
        if not reassociate:
            options["fastmath"] = set(FASTMATH - {"reassoc"})
        return numba.njit(parallel=parallel, **options, **extra)(f)

    return wrap if func is None else wrap(func)


#: (kernel, argument-type key) -> the kernel's compiled function (:func:`entry_point`).
_ENTRY_POINTS: dict = {}


def _type_key(value):
    """What decides numba's type of an argument, cheaply: an array's dtype, dimensions,
    layout, and writeable and aligned flags; any other value's Python type."""
    if type(value) is np.ndarray:
        flags = value.flags
        return value.dtype, value.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned
    return type(value)


def entry_point(kernel, args):
    """The compiled function of ``kernel`` (a :func:`jit` kernel) for exactly the types of
    ``args``, compiled or loaded from the cache first if needed; ``kernel`` itself when it is
    not compiled (``NUMBA_DISABLE_JIT``).

    Calling it skips the dispatcher's per-call work (typing every argument, looking up the
    specialisation) but not the unboxing, so its callers must pass arguments of the same
    types every call: same dtypes, dimensions and layout (C-contiguous stays C-contiguous),
    writeable arrays, same scalar kinds. Used by :class:`fastseq.cells.Stream`, whose
    arguments are fixed but for the input, which it checks first. Measured (Intel Xeon,
    N=1, H=128, us a call): an empty kernel of 9 arrays 0.58 through the dispatcher, 0.43
    here; the RNN / LSTM / GRU streaming kernels 2.60 / 7.62 / 5.85, 2.37 / 7.28 / 5.74.
    Found once per kernel and argument types: ``numba.typeof`` of 12 arguments took 56 us.
    """
    compile_for = getattr(kernel, "compile", None)
    if compile_for is None:
        return kernel
    key = (kernel, tuple(_type_key(a) for a in args))
    found = _ENTRY_POINTS.get(key)
    if found is None:
        found = _ENTRY_POINTS[key] = compile_for(tuple(numba.typeof(a) for a in args))
    return found
