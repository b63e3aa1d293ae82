"""Per-sample lengths -> the chunked, packed row layout the kernels use (see fastseq.kernels)."""

from __future__ import annotations

import numpy as np

from fastseq.kernels.common import contiguous_chunks, gather_rows, unpack_rows


class Packing:
    """Row layout of a batch of variable-length sequences.

    Each chunk takes a contiguous range of batch positions (ranges of about equal valid
    rows, evened by a few swaps of single samples between neighbouring chunks:
    :func:`fastseq.kernels.common.contiguous_chunks`), its samples sorted by length (longest first). Each chunk's thread
    then writes its own part of every step's rows of an unpacked (T, N, F) output; with
    the samples dealt among the chunks (sorted by length, 0, 1, ..., K-1, K-1, ..., 1, 0,
    0, 1, ...), the two threads wrote neighbouring rows of the same pages. Measured
    (float32, Intel Xeon, 2 threads, four alternating runs, new / dealt; T=100, N=32 and
    64): full length, H=64: RNN forward 0.89-0.98, training 0.89-0.91, LSTM 0.92-0.97, GRU
    0.93-0.96; H=256: 0.95-1.00. Lengths uniform in [1, T] (both builds zeroing the
    padding in ranges, ``kernels.common.zero_padding``), H=64 and 256: forward 0.90-0.99
    (RNN at N=32, H=64 0.90), training 0.97-1.02; N=8, T=200, H=192: 0.94-1.00; N=64,
    T=50, H=1024: 0.99-1.04. Contiguous ranges without the swaps left chunks 4% apart (760
    / 700 rows at N=32) and lost at H=256 (training 1.02-1.05). Dealing is kept for a
    batch where some range would be empty. (Dealt back and forth rather than
    round-robin, whose first chunk took the longer sample of every K: Zen 5, forward at
    random lengths, N=32, T=100, H=64: RNN 0.985-0.988, GRU 0.973-0.980; training, LSTM
    0.927.)
    "State order" lists the samples chunk after chunk; each chunk's rows are contiguous,
    time-major inside the chunk.

    Parameters
    ----------
    lengths : ndarray of int64, shape (N,), or None
        Valid steps per sample (already validated: 1 <= lengths <= T). None: all T.
    steps : int
        T, the padded length.
    batch : int
        N.
    chunks : int
        Number of chunks wanted (capped at N).
    unit_parts : int
        Threads that split each step by hidden units (fastseq._threads.unit_parts; then
        ``chunks`` must be 1), or 0.
    """

    def __init__(self, lengths, steps: int, batch: int, chunks: int = 1, unit_parts: int = 0):
        if unit_parts and chunks != 1:
            raise ValueError(f"a packing split by units has one chunk; received chunks={chunks}")
        self.steps, self.batch, self.unit_parts = steps, batch, unit_parts
        full = lengths is None or bool(np.all(lengths == steps))
        self.key = _key(lengths, steps, batch, chunks, unit_parts)
        if full:
            lengths = np.full(batch, steps, dtype=np.int64)
        self.n_chunks = n_chunks = max(1, min(chunks, batch))
        self.equal_lengths = bool(np.all(lengths == lengths[0]))
        by_length = np.argsort(-lengths, kind="stable")  # equal lengths: 0, 1, ..., N-1
        chunk_of = contiguous_chunks(np.ascontiguousarray(lengths, dtype=np.int64), n_chunks)
        if chunk_of.size == 0:  # dealt back and forth: 0, 1, 1, 0, 0, 1, ...
            place = np.arange(batch) % n_chunks
            place = np.where(np.arange(batch) // n_chunks % 2 == 1, n_chunks - 1 - place, place)
            chunk_of = np.empty(batch, np.int64)
            chunk_of[by_length] = place
        per_chunk = [by_length[chunk_of[by_length] == c] for c in range(n_chunks)]
        sizes = np.array([len(p) for p in per_chunk], dtype=np.int64)
        self.widest_chunk = int(sizes.max())  # samples in the largest chunk
        self.order = np.concatenate(per_chunk).astype(np.int64)  # state index -> sample
        self.in_order = bool(np.array_equal(self.order, np.arange(batch)))  # state order = sample order
        self.inverse = np.empty_like(self.order)
        self.inverse[self.order] = np.arange(batch)
        self.lengths = np.ascontiguousarray(lengths[self.order], dtype=np.int64)
        self.chunk_samples = np.zeros(n_chunks + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.chunk_samples[1:])
        longest = int(self.lengths.max())
        running = self.lengths[:, None] > np.arange(longest)[None, :]
        self.batch_sizes = np.add.reduceat(running, self.chunk_samples[:-1], axis=0).astype(np.int64)
        self.offsets = np.zeros((n_chunks, longest + 1), dtype=np.int64)
        np.cumsum(self.batch_sizes, axis=1, out=self.offsets[:, 1:])
        self.chunk_rows = np.zeros(n_chunks + 1, dtype=np.int64)
        np.cumsum(self.offsets[:, -1], out=self.chunk_rows[1:])
        self.rows = int(self.chunk_rows[-1])
        self.widest_chunk_rows = int(self.offsets[:, -1].max())  # rows of the largest chunk
        self.identity = full and n_chunks == 1  # rows are x.reshape(T*N, C) as they stand
        if not self.identity:
            state = np.repeat(np.arange(batch), self.lengths)  # grouped by sample
            starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
            time = np.arange(self.rows) - starts[state]
            chunk = np.repeat(np.arange(n_chunks), sizes)[state]
            row = self.chunk_rows[chunk] + self.offsets[chunk, time] + state - self.chunk_samples[chunk]
            self.row_time = np.empty(self.rows, dtype=np.int64)
            self.row_sample = np.empty(self.rows, dtype=np.int64)
            self.row_time[row] = time
            self.row_sample[row] = self.order[state]
            # row of the (T*N, F) output each packed row goes to (kernels' ``out_rows``)
            self.out_rows = self.row_time * batch + self.row_sample

    def built_from(self, lengths, steps: int, batch: int, chunks: int = 1, unit_parts: int = 0) -> bool:
        """Whether this layout was built from exactly these arguments, ``lengths`` as the
        caller gives them (unvalidated): None, or an int64 (N,) array with the same values as
        the lengths it was built from (so valid). A cheap test for a layer called again with
        the same lengths; False does not mean the layout differs (:func:`reuse_packing`)."""
        key = self.key
        if key[:4] != (steps, batch, chunks, unit_parts):
            return False
        if lengths is None:
            return key[4] is None
        return (
            key[4] is not None
            and type(lengths) is np.ndarray
            and lengths.dtype == np.int64
            and lengths.shape == (batch,)
            and lengths.tobytes() == key[4]
        )

    @property
    def kernel_args(self):
        """The layout arguments every kernel takes, in order."""
        return self.chunk_rows, self.chunk_samples, self.batch_sizes, self.offsets, self.lengths

    def pack(self, a, take=np.empty):
        """(T, N, F) -> (R, F) C-contiguous, writable: ``a`` reshaped when it already fits,
        else a copy into ``take((R, F), dtype)`` (a workspace pool's, to reuse memory
        already paged in)."""
        if self.identity:
            packed = np.ascontiguousarray(a).reshape(self.rows, a.shape[2])
            return packed if packed.flags.writeable else packed.copy()
        out = take((self.rows, a.shape[2]), a.dtype)
        gather_rows(a, self.row_time, self.row_sample, out)
        return out

    def padded_array(self, features, dtype):
        """An uninitialised (T, N, F) array for an unpacked output: the kernels that fill it
        write every row, zeros at the padded steps (``kernels.common.zero_padding``)."""
        return np.empty((self.steps, self.batch, features), dtype)

    def unpack(self, packed):
        """(R, F) -> (T, N, F), zeros at padded steps."""
        if self.identity:
            return packed.reshape(self.steps, self.batch, packed.shape[1])
        full = self.padded_array(packed.shape[1], packed.dtype)
        unpack_rows(packed, self.out_rows, self.chunk_rows, self.chunk_samples, self.lengths,
                    full.reshape(self.steps * self.batch, packed.shape[1]))  # fmt: skip
        return full

    def sorted_states(self, states, row, hidden, dtype, final=None):
        """Each of ``states`` (None, or (L*D, N, H) in the user's sample order) at
        ``row``, as a contiguous (N, H) copy in state order; (N, H) zeros for None.
        ``final``: arrays (L*D, N, H) like ``states`` for the final states, zeros where
        ``states`` has None; when the state order is the sample order (``in_order``), their
        ``row`` views are returned, filled with the initial states, for the kernels to
        overwrite in place (no copies back: :meth:`unsort_into`). 0.8 of 12 us of Python in
        an eval call (LSTM, N=1, T=20, H=32); with ``final`` allocated zeroed rather than
        filled here, 0.5 of 1.2 us less."""
        if final is not None and self.in_order:
            views = [f[row] for f in final]
            for view, s in zip(views, states, strict=True):
                if s is not None:
                    view[...] = s[row]
            return views
        return tuple(
            np.zeros((self.batch, hidden), dtype) if s is None else self.sort(s[row]) for s in states
        )

    def unsort_into(self, final, row, states):
        """final[k][row] = states[k] (N, H) in the user's sample order, for the ``states``
        :meth:`sorted_states` gave with ``final``: nothing to do when they are already views
        of ``final`` (``in_order``)."""
        if not self.in_order:
            for f, s in zip(final, states, strict=True):
                f[row] = self.unsort(s)

    def sort(self, state):
        """(..., N, H) in the user's sample order -> contiguous copy in state order."""
        return state.take(self.order, axis=-2)  # a new C-ordered array; 2x faster than [..., order, :]

    def unsort(self, state):
        """(..., N, H) in state order -> the user's sample order (a new array)."""
        return state.take(self.inverse, axis=-2)


def _key(lengths, steps, batch, chunks, unit_parts):
    """What a Packing's layout depends on (all lengths equal to T count as None)."""
    full = lengths is None or bool(np.all(lengths == steps))
    return steps, batch, chunks, unit_parts, None if full else lengths.tobytes()


def reuse_packing(previous, lengths, steps: int, batch: int, chunks: int = 1, unit_parts: int = 0):
    """``previous`` (a Packing or None) when it has the layout these arguments describe, else
    a new :class:`Packing`. A layer called again with the same shape and lengths skips
    building the row maps: 0.13 ms at N=128, T=50 (2 chunks) alone, 0.41 ms measured inside
    a layer's forward, where the kernel has just left the caches cold."""
    if previous is not None and previous.key == _key(lengths, steps, batch, chunks, unit_parts):
        return previous
    return Packing(lengths, steps, batch, chunks, unit_parts)
