"""The layer API contract: construction, parameters, state dicts, modes, gradient bookkeeping."""

import numpy as np
import pytest

import fastseq
from fastseq import _engine, _threads
from fastseq._packing import Packing
from fastseq.kernels.common import (
    CHUNK_SWAPS,
    DIRECT_PROJECTION_ROWS,
    GATHER_ROWS,
    GATHER_ROWS_WIDE,
    GATHER_WIDE_BYTES,
    PROJECTION_BLOCK_ROWS,
    projects_upfront,
    zero_padding,
)
from fastseq.kernels.gemm import ALIGN_BYTES, pack
from fastseq.registry import CELLS
from tests.cases import Case
from tests.conftest import VARIANTS, make_layer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_names_shapes_and_init(variant):
    layer = make_layer(variant, 3, 16, num_layers=2, bidirectional=True, seed=0)
    g = {"rnn": 1, "lstm": 4, "gru": 3}[VARIANTS[variant][0]]
    expected = {}
    for k in range(2):
        for sfx in ("", "_reverse"):
            expected[f"weight_ih_l{k}{sfx}"] = (g * 16, 3 if k == 0 else 32)
            expected[f"weight_hh_l{k}{sfx}"] = (g * 16, 16)
            expected[f"bias_ih_l{k}{sfx}"] = expected[f"bias_hh_l{k}{sfx}"] = (g * 16,)
            if variant == "lstm-peephole":
                expected[f"weight_peephole_l{k}{sfx}"] = (3, 16)
    assert {k: v.shape for k, v in layer.params.items()} == expected
    assert set(layer.grads) == set(expected)
    for p in layer.params.values():
        assert p.dtype == np.float32 and p.flags.c_contiguous
    values = np.concatenate([p.ravel() for p in layer.params.values()])
    assert np.abs(values).max() <= 0.25 and np.abs(values).max() > 0.24  # U(-1/sqrt(16), 1/sqrt(16))
    assert abs(values.mean()) < 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_start_on_a_cache_line(dtype):
    """Weights read in place (streaming steps) load whole vectors from each row's start."""
    from fastseq.nn import Linear, Sequential

    modules = [fastseq.LSTMCell(3, 5, dtype=dtype), fastseq.GRU(7, 6, num_layers=2, dtype=dtype)]
    model = Sequential(fastseq.LSTM(16, 16, dtype=dtype), Linear(16, 16, dtype=dtype))
    for module in modules:
        for name, p in module.params.items():
            assert p.ctypes.data % ALIGN_BYTES == 0, name
    assert model.flat_params.ctypes.data % ALIGN_BYTES == 0
    assert model.flat_grads.ctypes.data % ALIGN_BYTES == 0
    # 16 x 16 weights and 16-value biases: every view of the flat buffer starts aligned too
    for name, p in model.params.items():
        assert p.ctypes.data % ALIGN_BYTES == 0, name
    # the kernels' panels (numba's own np.empty aligns to 32 bytes)
    for k, m in ((3, 5), (64, 300), (256, 1024)):
        assert pack(np.ones((k, m), dtype)).ctypes.data % ALIGN_BYTES == 0, (k, m)


def test_seed_reproducible_and_distinct():
    a, b, c = (fastseq.LSTM(3, 5, seed=s) for s in (1, 1, 2))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["weight_ih_l0"], c.params["weight_ih_l0"])


def test_forget_bias_added_to_forget_slice():
    base = fastseq.LSTM(3, 4, num_layers=2, seed=0)
    fb = fastseq.LSTM(3, 4, num_layers=2, seed=0, forget_bias=1.0)
    for k in ("bias_ih_l0", "bias_ih_l1"):
        np.testing.assert_allclose(fb.params[k][4:8], base.params[k][4:8] + 1.0)
        np.testing.assert_array_equal(fb.params[k][:4], base.params[k][:4])
        np.testing.assert_array_equal(fb.params[k][8:], base.params[k][8:])
    np.testing.assert_array_equal(fb.params["bias_hh_l0"], base.params["bias_hh_l0"])
    cell = fastseq.LSTMCell(3, 4, seed=0, forget_bias=2.0)
    assert np.all(cell.params["bias_ih"][4:8] > 1.5)
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        fastseq.LSTM(3, 4, bias=False, forget_bias=1.0)


def test_state_dict_round_trip_and_copies():
    src = fastseq.GRU(3, 4, num_layers=2, seed=0)
    dst = fastseq.GRU(3, 4, num_layers=2, seed=1)
    state = src.state_dict()
    state["weight_ih_l0"][0, 0] = 123.0  # a copy: the layer is unchanged
    assert src.params["weight_ih_l0"][0, 0] != 123.0
    live = dst.params["weight_hh_l1"]
    dst.load_state_dict({k: v.tolist() for k, v in src.state_dict().items()})  # any array-like
    assert dst.params["weight_hh_l1"] is live  # written in place
    for k in src.params:
        np.testing.assert_array_equal(dst.params[k], src.params[k])


def test_load_state_dict_checks_everything_before_changing_anything():
    layer = fastseq.LSTM(3, 4, seed=0)
    before = layer.state_dict()
    good = fastseq.LSTM(3, 4, seed=1).state_dict()
    bad_shape = dict(good, weight_hh_l0=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="'weight_hh_l0' has shape \\(4, 4\\); expected \\(16, 4\\)"):
        layer.load_state_dict(bad_shape)
    missing = {k: v for k, v in good.items() if k != "bias_hh_l0"}
    with pytest.raises(ValueError, match="missing keys \\['bias_hh_l0'\\]"):
        layer.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        layer.load_state_dict(dict(good, extra=np.zeros(1)))
    with pytest.raises(TypeError, match="'bias_ih_l0' must be numeric"):
        layer.load_state_dict(dict(good, bias_ih_l0=np.array(["a"] * 16)))
    with pytest.raises(TypeError, match="mapping"):
        layer.load_state_dict([1, 2])
    for k, v in before.items():
        np.testing.assert_array_equal(layer.params[k], v)


def test_gradients_accumulate_until_zero_grad():
    case = Case("gru", np.float64, 1)
    case.layer(case.x)
    case.layer.backward(case.grad_out)
    once = {k: g.copy() for k, g in case.layer.grads.items()}
    case.layer(case.x)
    case.layer.backward(case.grad_out)
    for k, g in case.layer.grads.items():
        np.testing.assert_allclose(g, 2 * once[k])
    case.layer.zero_grad()
    assert all(not g.any() for g in case.layer.grads.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_mode_keeps_no_workspace_and_matches_training(variant):
    case = Case(variant, np.float64, 2, True, True, True)
    train_out, train_h = case.layer(case.x, case.hx(), case.lengths)
    assert case.layer._cache is not None
    case.layer.eval()
    eval_out, eval_h = case.layer(case.x, case.hx(), case.lengths)
    assert case.layer._cache is None
    np.testing.assert_array_equal(train_out, eval_out)
    for a, b in zip(case.states(train_h), case.states(eval_h), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="backward\\(\\) needs a preceding forward\\(\\) in training mode"):
        case.layer.backward(case.grad_out)


@pytest.mark.parametrize("whole_input", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_of_one_inference_matches_training(variant, whole_input, monkeypatch):
    """A batch of one (one chunk) projects its whole input across threads in inference while
    it fits ONE_CHUNK_PROJECTION_BYTES, else a block of steps at a time (several blocks
    here); either way bitwise what training computes, both directions."""
    if not whole_input:
        monkeypatch.setattr(_threads, "ONE_CHUNK_PROJECTION_BYTES", 0)
    decided = []
    decide = _engine.project_whole_input
    monkeypatch.setattr(
        _engine, "project_whole_input", lambda *args: decided.append(decide(*args)) or decided[-1]
    )
    case = Case(variant, np.float32, 1, True, use_hx=True, steps=PROJECTION_BLOCK_ROWS + 90, batch=1)
    train_out, train_h = case.layer(case.x, case.hx())
    case.layer.eval()
    eval_out, eval_h = case.layer(case.x, case.hx())
    assert decided == [whole_input] * 2, "one decision per direction, in inference only"
    np.testing.assert_array_equal(train_out, eval_out)
    for a, b in zip(case.states(train_h), case.states(eval_h), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "bidirectional,use_lengths,batch_first,read_only",
    [(False, True, False, False), (True, False, False, False), (True, True, False, False),
     (False, True, True, False), (False, True, False, True)],
)  # fmt: skip
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_gathering_the_input_matches_training(
    variant, bidirectional, use_lengths, batch_first, read_only, monkeypatch
):
    """Inference over lengths or several chunks reads x unpacked (the kernels gather its rows,
    ``x_rows``) when x is C-contiguous and writeable and every direction projects a block at
    a time (in reverse over unequal lengths too, in step order): not for batch_first or
    read-only x. Either way the outputs and final states are bitwise training's, and x is
    left as it was."""
    case = Case(variant, np.float32, 2, bidirectional, use_lengths, True, steps=9, batch=5, input_size=6)
    x = np.ascontiguousarray(case.x.transpose(1, 0, 2)) if batch_first else case.x
    x.flags.writeable = not read_only
    case.layer.batch_first = batch_first
    train_out, train_h = case.layer(x, case.hx(), case.lengths)
    calls = []
    forward = _engine.forward
    monkeypatch.setattr(_engine, "forward", lambda *a, **k: calls.append(a[13]) or forward(*a, **k))
    case.layer.eval()
    kept = x.copy()
    eval_out, eval_h = case.layer(x, case.hx(), case.lengths)
    gathers = not (case.layer._packing.identity or batch_first or read_only)
    directions = 2 if bidirectional else 1
    assert len(calls) == 2 * directions
    assert [rows is not None for rows in calls] == [gathers] * directions + [False] * directions
    np.testing.assert_array_equal(train_out, eval_out)
    for a, b in zip(case.states(train_h), case.states(eval_h), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, kept)


@pytest.mark.parametrize("variant", ["rnn-tanh", "lstm", "gru"])
def test_inference_gathering_wide_weights_matches_training(variant, monkeypatch):
    """With W_ih of GATHER_WIDE_BYTES, inference gathers x's rows GATHER_ROWS_WIDE at a time
    (a block of 200 rows per chunk here, more than GATHER_ROWS); the outputs and final
    states are bitwise training's."""
    hidden = 64
    gates = CELLS[VARIANTS[variant][0]].gates
    inputs = -(-GATHER_WIDE_BYTES // (4 * gates * hidden))  # W_ih (G*H, C) float32 of that size
    assert GATHER_ROWS < 200 <= GATHER_ROWS_WIDE
    case = Case(variant, np.float32, steps=10, batch=40, input_size=inputs, hidden_size=hidden)
    train_out, train_h = case.layer(case.x)
    calls = []
    forward = _engine.forward
    monkeypatch.setattr(_engine, "forward", lambda *a, **k: calls.append(a[13]) or forward(*a, **k))
    case.layer.eval()
    eval_out, eval_h = case.layer(case.x)
    assert len(calls) == 1 and calls[0] is not None  # x's rows gathered
    np.testing.assert_array_equal(train_out, eval_out)
    for a, b in zip(case.states(train_h), case.states(eval_h), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_first", [False, True])  # x gathered unpacked / packed first
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reverse_inference_over_unequal_lengths_in_blocks(variant, batch_first, monkeypatch):
    """In reverse over unequal lengths, inference projects a block of steps at a time, its
    rows in step order (kernels.common.step_ordered): several blocks here (170 steps of a
    3-sample chunk per block), chunks of unequal and of equal lengths, two layers (the
    second reads the first's packed output); bitwise what training computes."""
    steps = PROJECTION_BLOCK_ROWS + 90
    case = Case(variant, np.float32, 2, True, True, True, steps=steps, batch=6, input_size=3)
    lengths = np.array([steps, 431, 17, 300, steps, 250])  # chunks: [602, 300, 250], [602, 431, 17]
    x = np.ascontiguousarray(case.x.transpose(1, 0, 2)) if batch_first else case.x
    case.layer.batch_first = batch_first
    train_out, train_h = case.layer(x, case.hx(), lengths)
    blocks = []  # every decision of the eval forward
    in_blocks = _engine.projects_in_blocks
    monkeypatch.setattr(_engine, "projects_in_blocks", lambda *a: blocks.append(in_blocks(*a)) or blocks[-1])
    case.layer.eval()
    eval_out, eval_h = case.layer(x, case.hx(), lengths)
    assert all(blocks) and len(blocks) >= 4
    np.testing.assert_array_equal(train_out, eval_out)
    for a, b in zip(case.states(train_h), case.states(eval_h), strict=True):
        np.testing.assert_array_equal(a, b)


def test_backward_twice_raises():
    case = Case("lstm", np.float64)
    case.run()
    with pytest.raises(ValueError, match="each forward can be back-propagated once"):
        case.layer.backward(case.grad_out)


def test_padded_outputs_are_zero_and_final_states_at_last_valid_step():
    case = Case("lstm", np.float64, 1, True, True)
    out, (hn, cn) = case.layer(case.x, lengths=case.lengths)
    for b, n in enumerate(case.lengths):
        assert not out[n:, b].any()
        np.testing.assert_array_equal(hn[0, b], out[n - 1, b, :4])  # forward: last valid step
        np.testing.assert_array_equal(hn[1, b], out[0, b, 4:])  # reverse: ends at step 0
        solo, (h1, _) = case.layer(case.x[:n, b : b + 1])  # the same sample alone, unpadded
        np.testing.assert_allclose(solo[:, 0], out[:n, b], rtol=1e-12)
        np.testing.assert_allclose(h1[:, 0], hn[:, b], rtol=1e-12)


class _DirtyEmpty:
    """Stands in for numpy in fastseq.layers: ``empty`` returns NaN-filled arrays, so that
    whatever a forward leaves unwritten shows."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype)


def check_padded_outputs_written(monkeypatch, case, training):
    """``case``'s forward with lengths (some padding) writes zeros at every padded step and
    the same values as with a zeroed output, when np.empty in fastseq.layers and
    fastseq._packing (which allocates the unpacked output) returns NaNs; in training, so
    does the backward's gradient of the input."""
    case.layer.train(training)
    ref, _ = case.layer(case.x, lengths=case.lengths)
    ref_dx = case.layer.backward(case.grad_out)[0] if training else None
    with monkeypatch.context() as patch:
        patch.setattr(fastseq.layers, "np", _DirtyEmpty())
        patch.setattr(fastseq._packing, "np", _DirtyEmpty())
        out, _ = case.layer(case.x, lengths=case.lengths)
        dx = case.layer.backward(case.grad_out)[0] if training else None
    padding = np.arange(case.steps)[:, None] >= case.lengths[None, :]
    assert padding.any()
    for got, want in ((out, ref), (dx, ref_dx)) if training else ((out, ref),):
        assert not np.isnan(got).any()
        assert not got[padding].any()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_outputs_written_as_zeros(monkeypatch, variant, training):
    """The kernels write the zeros at padded steps themselves (the output, and in training
    the input's gradient, are allocated uninitialised), every direction its own columns
    (tests/test_unit_split.py: the unit-split path)."""
    case = Case(variant, np.float32, 2, True, True, steps=7, batch=5, hidden_size=40, seed=3)
    check_padded_outputs_written(monkeypatch, case, training)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_padding_zeroed_in_contiguous_parts(chunks):
    """``zero_padding``'s part p zeroes the padded rows of the p-th contiguous range of
    batch positions, in its columns only; the parts together zero every padded row once,
    their shares of padded rows at most one sample's padding apart."""
    steps, batch, hidden = 20, 11, 3
    lengths = np.random.default_rng(5).integers(1, steps + 1, batch)
    layout = Packing(lengths, steps, batch, chunks)
    padded = np.arange(steps)[:, None] >= lengths[None, :]  # (T, N)
    owner = np.full((steps, batch), -1)
    for part in range(chunks):
        out = np.ones((steps * batch, 2 * hidden), np.float32)
        zero_padding(out, hidden, hidden, layout.out_rows, layout.lengths, layout.chunk_rows,
                     layout.chunk_samples, np.int64(part))  # fmt: skip
        assert np.all(out[:, :hidden] == 1)
        zeroed = (out[:, hidden:] == 0).reshape(steps, batch, hidden)
        assert np.all(zeroed == zeroed[:, :, :1])  # whole rows
        assert np.all(out[:, hidden:][~zeroed.reshape(-1, hidden)] == 1)
        mine = zeroed[:, :, 0]
        assert np.all(padded[mine]) and np.all(owner[mine] == -1)
        owner[mine] = part
    assert np.all((owner >= 0) == padded)
    first_part = [owner[:, s][owner[:, s] >= 0].min(initial=chunks) for s in range(batch)]
    last_part = [owner[:, s].max() for s in range(batch)]
    order = [p for s in range(batch) for p in (first_part[s], last_part[s]) if 0 <= p < chunks]
    assert order == sorted(order)  # ranges of positions, in order
    shares = np.bincount(owner[owner >= 0], minlength=chunks)
    assert shares.max() - shares.min() <= steps


def test_lengths_any_order_and_integer_types():
    case = Case("gru", np.float64, 1, True, True)
    ref, _ = case.layer(case.x, lengths=case.lengths)
    for lengths in (list(case.lengths), case.lengths.astype(np.int32), case.lengths.astype(np.uint8)):
        out, _ = case.layer(case.x, lengths=lengths)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_upfront_projection_matches_the_chunks(variant, training):
    """A chunked forward of few packed rows projects its whole input at the kernel's top
    level (common.upfront_projection; in eval the input rows gathered first): W_ih read in
    place up to DIRECT_PROJECTION_ROWS, packed a block at a time by each thread above that
    (W_ih of UPFRONT_PROJECTION_BYTES or more); the same samples beside others (more rows)
    project on the chunks' panels. Outputs and final states agree, at unequal lengths, both
    directions, two layers."""
    rng = np.random.default_rng(11)
    size = 256  # W_ih of the first layer: 256 x 256 float64 for an RNN, UPFRONT_PROJECTION_BYTES
    layer = make_layer(variant, size, size, num_layers=2, bidirectional=True, seed=2, dtype=np.float64)
    layer.train(training)
    x = rng.standard_normal((8, 40, size)) * 0.2
    lengths = np.array([8, 3, 5] + [7] * 17 + [8] * 20)
    gates = CELLS[VARIANTS[variant][0]].gates
    assert lengths[:3].sum() <= DIRECT_PROJECTION_ROWS < lengths[:20].sum()
    for columns in (size, 2 * size):  # W_ih of each layer
        w_ih = np.empty((gates * size, columns))
        assert projects_upfront(w_ih, lengths[:20].sum()) and not projects_upfront(w_ih, lengths.sum())
    many, many_state = layer(x, lengths=lengths)
    for samples in (3, 20):
        few, few_state = layer(np.ascontiguousarray(x[:, :samples]), lengths=lengths[:samples])
        np.testing.assert_allclose(few, many[:, :samples], rtol=1e-12, atol=1e-13)
        pairs = (
            zip(few_state, many_state, strict=True)
            if isinstance(few_state, tuple)
            else [(few_state, many_state)]
        )
        for a, b in pairs:
            np.testing.assert_allclose(a, b[:, :samples], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunks", [2, 3])
def test_chunks_get_sorted_samples_and_balanced_rows(chunks):
    """Contiguous ranges of batch positions evened by swaps: every sample once, each chunk
    longest first, and with lengths falling by one per sample (shuffled) the chunks' valid
    rows differ by less than K (the ranges alone: 32 rows apart at K=2, seed 3); each chunk
    holds a range of positions but for at most CHUNK_SWAPS samples per neighbour."""
    lengths = np.arange(101 - 16 * chunks, 101)[::-1].copy()
    for seed in range(4):
        layout = Packing(np.random.default_rng(seed).permutation(lengths), 100, lengths.size, chunks)
        assert sorted(layout.order) == list(range(lengths.size))
        rows = layout.batch_sizes.sum(axis=1)
        assert rows.max() - rows.min() < chunks
        chunk_of = np.repeat(np.arange(chunks), np.diff(layout.chunk_samples))[layout.inverse]
        out_of_place = np.count_nonzero(chunk_of != np.sort(chunk_of))
        assert out_of_place <= 2 * CHUNK_SWAPS * (chunks - 1)
        for c in range(chunks):
            mine = layout.lengths[layout.chunk_samples[c] : layout.chunk_samples[c + 1]]
            assert mine.size > 0 and np.all(np.diff(mine) <= 0)


def test_chunks_dealt_when_a_range_would_be_empty():
    """A long last sample after short ones leaves the last range empty: the samples are
    dealt back and forth instead (longest first: chunk 0, 1, 2)."""
    layout = Packing(np.array([1, 1, 100]), 100, 3, 3)
    np.testing.assert_array_equal(layout.order, [2, 0, 1])
    np.testing.assert_array_equal(layout.chunk_samples, [0, 1, 2, 3])


@pytest.mark.parametrize("lengths", [None, "equal"])
@pytest.mark.parametrize(("batch", "chunks"), [(32, 2), (7, 2), (10, 3)])
def test_equal_lengths_give_chunks_contiguous_batch_positions(batch, chunks, lengths):
    """At equal lengths chunk c takes the c-th contiguous range of batch positions, in
    order, the ranges at most one sample apart (each thread writes its own part of every
    step's output rows)."""
    given = None if lengths is None else np.full(batch, 9)
    layout = Packing(given, 9, batch, chunks)
    sizes = np.diff(layout.chunk_samples)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(layout.order, np.arange(batch))


def test_row_layout_reused_only_for_the_same_lengths():
    case = Case("lstm", np.float64, 1, True, True)
    layer, steps = case.layer, case.x.shape[0]
    full, _ = layer(case.x)
    layout = layer._packing
    again, _ = layer(case.x, lengths=np.full(case.x.shape[1], steps))  # full lengths, spelled out
    assert layer._packing is layout
    np.testing.assert_array_equal(again, full)
    ref, _ = layer(case.x, lengths=case.lengths)
    assert layer._packing is not layout
    layout = layer._packing
    other = np.roll(case.lengths, 1)
    assert not np.array_equal(other, case.lengths)
    out, _ = layer(case.x, lengths=other)
    assert layer._packing is not layout
    for b, n in enumerate(other):  # each sample as if run alone
        solo, _ = layer(case.x[:n, b : b + 1])
        np.testing.assert_allclose(out[:n, b], solo[:, 0], rtol=1e-12)
    np.testing.assert_array_equal(layer(case.x, lengths=case.lengths)[0], ref)


def test_same_lengths_again_reuse_the_layout_and_changed_ones_are_checked():
    """A call with lengths equal to the last call's (int64, checked then) skips their check
    and reuses the layout; lengths changed in place, or of another type, are checked again."""
    case = Case("rnn-tanh", np.float64, 1, False, True, steps=6, batch=4)
    layer, lengths = case.layer, case.lengths.astype(np.int64)
    ref, _ = layer(case.x, lengths=lengths)
    layout = layer._packing
    again, _ = layer(case.x, lengths=lengths.copy())
    assert layer._packing is layout
    np.testing.assert_array_equal(again, ref)
    lengths[0] = 0  # in place: not the layout's lengths any more
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T=6\]; received min 0"):
        layer(case.x, lengths=lengths)
    assert layer._packing is layout
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        layer(case.x, lengths=case.lengths.astype(np.float64))
    with pytest.raises(ValueError, match=r"lengths has shape \(2, 2\)"):
        layer(case.x, lengths=case.lengths.astype(np.int64).reshape(2, 2))
    lengths[0] = 1
    out, _ = layer(case.x, lengths=lengths)
    assert layer._packing is not layout
    assert not out[1:, 0].any()


def test_repr_names_the_configuration():
    assert repr(fastseq.GRU(3, 4, num_layers=2)) == (
        "GRU(3, 4, num_layers=2, bias=True, batch_first=False, dropout=0.0, bidirectional=False, dtype=float32)"
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_steps_reuse_workspaces_without_changing_results(variant):
    case = Case(variant, np.float64, 3, True, True, True, extra={"dropout": 0.3})
    layer = case.layer
    results = []
    for _ in range(3):
        layer._rng = np.random.default_rng(7)  # same dropout masks every step
        results.append([np.copy(a) for a in case.run()[0:1] + case.run()[2:3]])
        results[-1] += [g.copy() for g in layer.grads.values()]
        assert layer._pool._free, "backward should hand its workspaces back"
    for later in results[1:]:
        for a, b in zip(results[0], later, strict=True):
            np.testing.assert_array_equal(a, b)
    layer.eval()
    assert not layer._pool._free


@pytest.mark.parametrize("batch", [1, 3])  # 1: the packed rows are views of the user's arrays
@pytest.mark.parametrize("variant", ["lstm", "gru"])
def test_arrays_returned_by_a_training_step_are_not_reused(variant, batch):
    case = Case(variant, np.float32, 2, True, False, False, batch=batch)
    layer = case.layer.train()
    out, h_n = layer(case.x)
    dx, dh0 = layer.backward(case.grad_out)
    kept = [np.copy(a) for a in (out, dx, case.x, case.grad_out)]
    for _ in range(2):  # later steps take pooled workspaces
        layer(case.x * 2)
        layer.backward(case.grad_out * 3)
    for a, b in zip((out, dx, case.x, case.grad_out), kept, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 3])
def test_arrays_returned_in_eval_mode_are_not_reused(batch):
    case = Case("gru", np.float32, 2, True, False, False, batch=batch)
    layer = case.layer.eval()
    out, _ = layer(case.x)
    kept = [np.copy(out), np.copy(case.x)]
    for _ in range(2):
        layer(case.x * 2)
    np.testing.assert_array_equal(out, kept[0])
    np.testing.assert_array_equal(case.x, kept[1])


def test_pool_frees_shapes_that_stop_recurring():
    layer = make_layer("lstm", 3, 8, num_layers=2).train()
    rng = np.random.default_rng(0)
    for steps in range(2, 12):  # a new sequence length every step
        out, _ = layer(rng.standard_normal((steps, 4, 3)).astype(np.float32))
        layer.backward(np.ones_like(out))
        held = {shape[0][0] for shape in layer._pool._free if len(shape[0]) == 2}
        assert held <= {4 * steps, 4 * (steps - 1)}, f"pool holds rows {sorted(held)} at T={steps}"
