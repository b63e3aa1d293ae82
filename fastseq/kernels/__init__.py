"""Numba kernels: forward and backward passes of every recurrent cell.

Pure ``@njit`` functions taking arrays and scalars only, one module per cell. The public
classes in :mod:`fastseq.layers` and :mod:`fastseq.cells` validate, allocate and make at most
one kernel call per layer and direction.

Shapes legend (rightmost dimension fastest, every array C-contiguous)::

    T  time steps of the padded input           N  batch size
    C  input features                            H  hidden units
    G  gates (RNN 1, GRU 3, LSTM 4)              S  steps actually run = max(lengths)
    R  packed rows = sum(lengths) = batch_sizes.sum()
    D  directions (1 or 2); an output row holds D*H values, direction d in columns d*H:(d+1)*H

Packed, chunked layout. Samples are sorted by length (longest first) and dealt back and
forth (see fastseq._packing) into K batch chunks (K fixed by numba's start-up thread count,
see fastseq._threads). "State order" lists samples chunk after chunk; chunk ``c`` holds state indices
``chunk_samples[c] .. chunk_samples[c+1]-1`` and packed rows ``chunk_rows[c] ..
chunk_rows[c+1]-1``, time-major: its local sample ``i`` at time ``t`` is row
``chunk_rows[c] + offsets[c, t] + i``. ``batch_sizes[c, t]`` samples of the chunk are
still running at step ``t``: always its first ones, so every per-step GEMM works on a
leading slice of the chunk's contiguous state, and work is proportional to valid steps.

Each kernel runs one ``prange`` over the chunks; a chunk runs its whole sequence with its
own (single-threaded) BLAS calls, so there is no barrier per time step. Weight gradients
are summed per chunk and the partial sums added in chunk order: results do not depend on
the number of threads. Exception: LSTM batches too small to split well by samples
(``fastseq._threads.unit_parts``) run as one chunk through ``lstm_forward_units`` /
``lstm_backward_units``, which split each step across threads by hidden units (a parallel
region per step; the forward's steps all in one region where it can, ``kernels.sync``) and
the chunk-level GEMMs by rows. Another: the LSTM and the RNN at small
H (``fastseq._engine.runs_in_columns``) run ``columns.forward_columns`` and
``columns.backward_columns``, whose chunks keep their state transposed, (H, nc) with a
sample per column, and compute each step as one product [W_ih | W_hh] @ [x; h] of shape
(G*H, n), so that the gate math runs along rows of samples instead of along each sample's H
units; their training workspace is transposed too (see ``kernels.columns``).

The forward direction runs step ``s = t``. The reverse direction runs step ``s`` of sample
``k`` at time ``t = lengths[k] - 1 - s``, so each sample's reverse pass starts at its own
last valid step.

In the chunked kernels' time loops (and the transposed layout's, and the streaming
steps), the arrays the per-step calls receive carry no reference counts
(``kernels.refs.borrow``): numba's atomic count updates at every call are no-ops for them.

Kernel arguments shared by all cells::

    x            (R, C)       in      packed layer input; or, in inference with x_rows, the
                                      unpacked (T*N, C) input
    w_ih         (G*H, C)     in      input weights, torch's gate order
    w_hh         (G*H, H)     in      recurrent weights
    b_ih, b_hh   (G*H,)       in      biases (zeros when the layer has no bias)
    chunk_rows   (K+1,)       in      int64, first packed row of each chunk
    chunk_samples (K+1,)      in      int64, first state index of each chunk
    batch_sizes  (K, S)       in      int64, samples of each chunk running at each step
    offsets      (K, S+1)     in      int64, first row of each step inside its chunk
    lengths      (N,)         in      int64, lengths in state order
    reverse      bool         in      run the sequence backwards (per sample)
    out          (R', D*H)    out     output; columns out_col:out_col+H of row out_rows[r]
                                      written for packed row r (of row r itself when
                                      out_rows has no entries: R' = R, packed); with
                                      out_rows, the same columns of the padded steps'
                                      rows are written as zeros (forward kernels)
    out_rows     (R,) or (0,) in      int64, out's row for each packed row (the last layer
                                      writes the caller's (T*N, D*H) output directly,
                                      allocated uninitialised), or none
    h            (N, H)       in/out  initial hidden state (state order) -> final state
    gates        (R, G*H)     scratch forward: input projection, then (training) the gate
                                      activations backward needs; backward overwrites it
                                      with the gradients of the gate pre-activations.
                                      With 0 rows (inference) the kernel projects the input
                                      a block of steps at a time into a small buffer instead
                                      (in step order in reverse over unequal lengths,
                                      ``common.step_ordered``; the unit-split kernels: not
                                      in reverse over unequal lengths)
    hprev        (R, H)       out     (training) hidden state each row started from
    training     bool         in      keep what backward needs; False runs inference and
                                      writes no workspace beyond ``gates``
    x_rows       (R,) or (0,) in      int64 (forward kernels split by chunks), x's row for
                                      each packed row: x is the unpacked input, its rows
                                      gathered into the block projections (inference with
                                      ``gates`` of 0 rows only); or none: x is packed

Backward kernels take the same packing, the forward's workspace, ``dout`` (R, D*H) and
``dh`` (N, H) (gradient of the final state in, of the initial state out), write ``dx``
(R, C) (``accumulate_dx``: add instead of overwrite, for the second direction) and add the
parameter gradients into ``dw_ih``, ``dw_hh``, ``db_ih``, ``db_hh``. When ``part_w_ih``
(K, G*H, C) and ``part_w_hh`` (K, G*H, H) have K = one slice per chunk (scratch,
overwritten), each chunk's weight gradients first go to its own slice and are then added in
chunk order: the caller passes them so that a training loop reuses them (fresh, they cost
page faults every step: 64 MB at H = 1024). With K = 0 the weight gradients are summed over
all rows at once after the recurrence, split across threads by rows of the gradient
(``common.add_weight_grads``); ``fastseq._threads.partial_weight_grads`` decides.
``columns.backward_columns`` (H <= 48) allocates its own per-chunk sums.
"""
