"""Atomic counters for threads that meet inside one parallel region.

A unit-split forward (``lstm.lstm_forward_units`` and its kin) ran one parallel region per
time step, about 2-3 us each on two cores. Now its steps run inside a single region, each thread taking its own part of a
step (:func:`take_part`), then waiting for the step's other parts through a counter
(:func:`wait_or_take`) instead of a region's end. The loop every such kernel runs in its
``prange`` over threads t::

    for s in range(steps):
        at = s * (parts + 1)
        p = np.int64(t) if take_part(claims, at, t) else wait_or_take(claims, at, parts)
        while p >= 0:
            ... part p of step s ...
            part_done(claims, at, parts)
            p = wait_or_take(claims, at, parts)

(``np.int64(t)``: numba types a ``prange`` index as unsigned, and unsigned with signed as a
float.) Which thread runs a part never changes the results: a part's work is fixed by its
index. Each kernel writes this loop out around its own part function: a loop taking the
part function as an argument would leave every kernel that calls it out of numba's disk
cache ("Cannot cache compiled function ... as it uses dynamic globals", tried).

numba has no atomics of its own, so these are LLVM's, emitted through ``@intrinsic``:
sequentially consistent read-modify-writes and acquire loads on an int64 array.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from fastseq._jit import jit


def _element_pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)


@intrinsic
def atomic_add(typingctx, counters, index, value):
    """``counters[index] += value`` as one atomic operation (sequentially consistent);
    returns the value before. counters: a 1-D int64 array."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None
    signature = types.int64(counters, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        pointer = _element_pointer(context, builder, sig.args[0], args[0], index)
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return signature, codegen


@intrinsic
def atomic_load(typingctx, counters, index):
    """``counters[index]`` read with acquire ordering: the writes another thread made before
    its :func:`atomic_add` on it are visible after. Never hoisted out of a spin loop."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None
    signature = types.int64(counters, types.intp)

    def codegen(context, builder, sig, args):
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        pointer = _element_pointer(context, builder, sig.args[0], args[0], index)
        return builder.load_atomic(pointer, "acquire", 8)

    return signature, codegen


#: The LLVM intrinsic of the CPU's spin-wait hint (x86's ``pause``; none elsewhere).
PAUSE = "llvm.x86.sse2.pause" if platform.machine().lower() in ("x86_64", "amd64") else ""


@intrinsic
def spin_pause(typingctx):
    """The CPU's spin-wait hint (:data:`PAUSE`)."""
    signature = types.void()

    def codegen(context, builder, sig, args):
        if PAUSE:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), PAUSE)
            builder.call(pause, [])
        return context.get_dummy_value()

    return signature, codegen


#: Spins a thread waits for a step's other parts before it runs the ones no thread has taken:
#: a thread reaches each step right after the previous one ends, so a part still untaken
#: after this long belongs to a thread that is not running (descheduled, or a threading
#: layer that ran the region's iterations one after the other), and waiting longer could
#: wait for ever.
STEAL_SPINS = 1 << 12


@jit
def take_part(claims, at, p):
    """Whether this thread takes part ``p`` of the step whose counters start at
    ``claims[at]`` (see :func:`step_claims`): True for the first thread that asks."""
    return atomic_add(claims, at + p, 1) == 0


@jit
def part_done(claims, at, parts):
    """Count a part of the step at ``claims[at]`` as done (its writes visible to every thread
    that then sees the count)."""
    atomic_add(claims, at + parts, 1)


@jit
def wait_or_take(claims, at, parts):
    """Wait until every part of the step at ``claims[at]`` is done (returns -1), or, when a
    part is still untaken after STEAL_SPINS spins, take it and return its index."""
    spins = 0
    while atomic_load(claims, at + parts) < parts:
        spins += 1
        if spins >= STEAL_SPINS:
            for p in range(parts):
                if take_part(claims, at, p):
                    return p
            spins = 0
        spin_pause()
    return -1


@jit
def step_claims(steps, parts):
    """Zeroed counters for ``steps`` steps of ``parts`` parts: at ``s * (parts + 1)`` a
    taken flag for each part of step s, then the count of its parts done."""
    return np.zeros(steps * (parts + 1), np.int64)
