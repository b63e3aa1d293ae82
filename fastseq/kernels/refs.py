"""Array views without reference counts, for the arrays of the kernels' time loops.

numba counts references to every array it hands around: a called kernel function increments
the count of each array argument at its entry and decrements it at its exits (where the
paths that can raise keep numba's pruning from removing the pair), and so does each view
made of an array. Each is an atomic read-modify-write of the array's meminfo, which waits
for the core's pending stores; a time loop made several of them at every step, for each
call with arrays. With :func:`borrow`, the arrays handed to the per-step calls carry no
meminfo: numba's increments and decrements of them test a null pointer and return. Used by
the chunked forward and backward kernels of every cell, the transposed layout's
(``kernels.columns``) and the streaming steps; not by the unit-split kernels, whose steps
are parallel regions (1-2% in one measurement, below the noise).

Measured (float32, Intel Xeon, RNN forward over N rows of one chunk on one thread, H=64,
T=50 and T=100, us a step): borrowing the chunk's scratch arrays (state rows, the step's
product) took 0.29-0.30 -> 0.25 at N=1, 0.59-0.60 -> 0.56-0.59 at N=4; borrowing the
kernel's arguments and weight panels as well, 0.24-0.25 and 0.53-0.54; the arguments and
panels alone, without the scratch, nothing.

The rule: borrow a kernel's own array arguments (the caller holds them for the whole call),
or arrays whose owner the kernel keeps alive with :func:`hold` until after the last use of
the borrowed views. numba releases an array after its last use in the function, so an
array allocated in the kernel and used afterwards only through borrowed views is freed at
once unless it is held. Never return or store a borrowed view.
"""

from __future__ import annotations

from numba.core import cgutils, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic


def _strip(context, builder, array_type, value):
    """The array struct ``value`` with null meminfo and parent."""
    array = context.make_array(array_type)(context, builder, value=value)
    array.meminfo = cgutils.get_null_value(array.meminfo.type)
    array.parent = cgutils.get_null_value(array.parent.type)
    return array._getvalue()


@intrinsic
def borrow(typingctx, arrays):
    """``arrays`` (an array, or a tuple of arrays) as views of the same data, shapes and
    strides that hold no reference (see the module docstring for when that is safe). The
    same numba types: callees compile once for both."""
    if isinstance(arrays, types.Array):

        def codegen(context, builder, signature, args):
            return _strip(context, builder, signature.args[0], args[0])

        return arrays(arrays), codegen
    if isinstance(arrays, types.BaseTuple) and all(isinstance(t, types.Array) for t in arrays):

        def codegen_tuple(context, builder, signature, args):
            tuple_type = signature.args[0]
            values = [
                _strip(context, builder, t, builder.extract_value(args[0], i))
                for i, t in enumerate(tuple_type)
            ]
            return context.make_tuple(builder, tuple_type, values)

        return arrays(arrays), codegen_tuple
    return None


@intrinsic
def hold(typingctx, owner):
    """A use of ``owner`` (any value) that emits no code: numba keeps it alive until here,
    and with it the data of the views borrowed from it."""

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(owner), codegen


@intrinsic
def any_layout(typingctx, array):
    """``array`` itself, typed with layout 'A' (any strides): the same data model for every
    layout, so no code but a reference. Passed where a callee only packs an operand or reads
    its strides at run time, so that it compiles once for a matrix and its transpose."""
    if not isinstance(array, types.Array):
        return None
    result = array.copy(layout="A")

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return result(array), codegen
