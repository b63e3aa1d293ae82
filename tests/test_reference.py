"""fastseq layers against the plain-NumPy reference in tests/naive.py, forward and backward."""

import itertools

import numpy as np
import pytest

from fastseq import _engine
from tests import naive
from tests.cases import Case, assert_matches
from tests.conftest import VARIANTS
from tests.tolerances import assert_close

OPTIONS = list(itertools.product([1, 2], [False, True], [False, True]))  # layers, bidir, lengths


def _naive(case, masks=None, rmasks=None):
    params = {k: v.astype(np.float64) for k, v in case.layer.params.items()}
    x = case.x.astype(np.float64)
    h0 = (
        tuple(s.astype(np.float64) for s in case.h0)
        if case.use_hx
        else tuple(np.zeros_like(s, dtype=np.float64) for s in case.h0)
    )
    variant = VARIANTS[case.variant][1]
    out, final, tape = naive.layer_forward(
        case.cell, variant, params, x, h0, case.lengths, case.num_layers, case.bidirectional, masks, rmasks
    )
    dx, dinit, grads = naive.layer_backward(
        case.cell, variant, params, tape, case.grad_out.astype(np.float64),
        tuple(g.astype(np.float64) for g in case.grad_final), case.lengths, case.num_layers, case.bidirectional, masks,
    )  # fmt: skip
    return out, final, dx, dinit, grads


def _compare(case, got, ref):
    assert_matches(case, got, ref, "naive reference")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers,bidirectional,use_lengths", OPTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_naive(variant, num_layers, bidirectional, use_lengths, dtype):
    case = Case(variant, dtype, num_layers, bidirectional, use_lengths, use_hx=True, steps=6, batch=4)
    _compare(case, case.run(), _naive(case))


@pytest.mark.parametrize("variant", list(VARIANTS))
# (T, N, C, H); the last two: one sample per chunk over enough steps to pack W_hh for
# one-row per-step products (kernels.common.ONE_ROW_PANEL_STEPS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (9, 5, 2, 7), (3, 7, 6, 3), (70, 1, 3, 5), (70, 2, 4, 9)])
def test_shapes_match_naive(variant, shape):
    steps, batch, c, h = shape
    case = Case(variant, np.float64, 2, True, batch > 1, True, True, steps, batch, c, h, seed=7)
    _compare(case, case.run(), _naive(case))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dropout_between_layers_matches_naive_with_same_masks(variant):
    case = Case(variant, np.float64, 3, True, True, True, extra={"dropout": 0.4})
    out, hn = case.layer(case.x, case.hx(), case.lengths)
    cache = case.layer._cache
    packing = cache["packing"]
    masks = [packing.unpack(m) for _, m in cache["layers"][:-1]]
    assert all(np.any(m == 0) for m in masks), "dropout 0.4 should zero some outputs"
    dx, dhx = case.layer.backward(case.grad_out, case.grad_h_n())
    _compare(case, (out, case.states(hn), dx, case.states(dhx)), _naive(case, masks))


def test_dropout_inactive_in_eval_mode():
    case = Case("lstm", np.float64, 2, extra={"dropout": 0.5})
    train_out, _ = case.layer(case.x)
    case.layer.eval()
    eval_out, _ = case.layer(case.x)
    clean = Case("lstm", np.float64, 2)  # same seed -> same weights, no dropout
    clean_out, _ = clean.layer(clean.x)
    np.testing.assert_array_equal(eval_out, clean_out)
    assert not np.allclose(train_out, clean_out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recurrent_dropout_matches_naive_with_same_masks(variant, dtype):
    """Variational recurrent dropout (with dropout between layers too): same masks -> same
    outputs, states and gradients as the reference."""
    case = Case(variant, dtype, 2, True, True, True, steps=6, batch=4,
                extra={"dropout": 0.2, "recurrent_dropout": 0.4})  # fmt: skip
    out, hn = case.layer(case.x, case.hx(), case.lengths)
    cache = case.layer._cache
    packing = cache["packing"]
    masks = [packing.unpack(m) for _, m in cache["layers"][:-1]]
    rmasks = {(layer, d): packing.unsort(ws["rmask"])  # the layer's masks, in sample order
              for layer, (dirs_ws, _) in enumerate(cache["layers"]) for d, ws in enumerate(dirs_ws)}  # fmt: skip
    assert set(rmasks) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for m in rmasks.values():
        assert m.shape == (4, case.hidden_size)
        assert np.any(m == 0) and np.all((m == 0) | np.isclose(m, 1 / 0.6))
    dx, dhx = case.layer.backward(case.grad_out, case.grad_h_n())
    got = (out, case.states(hn), dx, case.states(dhx))
    _compare(case, got, _naive(case, masks, {k: m.astype(np.float64) for k, m in rmasks.items()}))
    with pytest.raises(AssertionError):  # the masks matter: without them the results differ
        _compare(case, got, _naive(case, masks))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recurrent_dropout_inactive_in_eval_mode(variant):
    case = Case(variant, np.float64, 1, extra={"recurrent_dropout": 0.5})
    clean = Case(variant, np.float64, 1)
    case.layer.eval()
    clean.layer.eval()
    np.testing.assert_array_equal(case.layer(case.x)[0], clean.layer(clean.x)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers,bidirectional,use_lengths", OPTIONS)
@pytest.mark.parametrize("variant", ["lstm", "lstm-peephole", "rnn-tanh", "rnn-relu"])
def test_inference_in_columns_matches_naive(
    variant, num_layers, bidirectional, use_lengths, dtype, monkeypatch
):
    """Inference in the transposed layout (_engine.runs_in_columns, forced here for any
    batch): outputs and final states as the reference's, at 70 samples (chunks wider than
    one panel of NR columns, lengths 1..T), with and without x gathered unpacked."""
    monkeypatch.setattr(_engine, "COLUMNS_MIN_SAMPLES", 0)
    monkeypatch.setattr(_engine, "COLUMNS_UNEQUAL_MAX_HIDDEN", _engine.COLUMNS_MAX_HIDDEN)
    ran = []
    columns = _engine.forward_columns
    record = lambda *a: ran.append(a[-5].shape[0]) or columns(*a)  # noqa: E731 (a[-5]: x_rows)
    monkeypatch.setattr(_engine, "forward_columns", record)
    case = Case(
        variant, dtype, num_layers, bidirectional, use_lengths, True, steps=7, batch=70, hidden_size=6
    )
    ref_out, ref_final, *_ = _naive(case)
    case.layer.eval()
    for batch_first in (False, True):  # x read unpacked through x_rows / packed first
        x = np.ascontiguousarray(case.x.transpose(1, 0, 2)) if batch_first else case.x
        case.layer.batch_first = batch_first
        out, hn = case.layer(x, case.hx(), case.lengths)
        out = out.transpose(1, 0, 2) if batch_first else out
        assert_close(out, ref_out, dtype, "output", "columns inference")
        for a, b in zip(case.states(hn), ref_final, strict=True):
            assert_close(a, b, dtype, "final state", "columns inference")
    calls = num_layers * (2 if bidirectional else 1)
    assert len(ran) == 2 * calls
    gathers = not case.layer._packing.identity  # time-major x, unpacked: its rows gathered
    assert [rows > 0 for rows in ran[::calls]] == [gathers, False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers,bidirectional,use_lengths", OPTIONS)
@pytest.mark.parametrize("sizes", [(3, 6), (20, 20)], ids=["c3h6", "c20h20"])
@pytest.mark.parametrize("variant", ["lstm", "lstm-peephole", "rnn-tanh", "rnn-relu"])
def test_training_in_columns_matches_naive(
    variant, sizes, num_layers, bidirectional, use_lengths, dtype, columns_everywhere
):
    """Training in the transposed layout (forced for any batch): outputs, final states and
    every gradient as the reference's, at 70 samples (chunks wider than a panel), with the
    rows [x | h] in one panel of NR columns (C=3, H=6) or several (C=H=20); the inference
    in that layout gives bitwise the training forward's outputs and states."""
    forwards, backwards = columns_everywhere
    c, h = sizes
    case = Case(variant, dtype, num_layers, bidirectional, use_lengths, True, steps=7, batch=70,
                input_size=c, hidden_size=h)  # fmt: skip
    got = case.run()
    _compare(case, got, _naive(case))
    calls = num_layers * (2 if bidirectional else 1)
    assert forwards == [True] * calls
    assert len(backwards) == calls
    case.layer.eval()  # the inference in the same layout: bitwise training's forward
    out, hn = case.layer(case.x, case.hx(), case.lengths)
    np.testing.assert_array_equal(out, got[0])
    for a, b in zip(case.states(hn), got[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_inference_in_columns_only_where_it_pays():
    """_engine.runs_in_columns: the LSTM's and RNN's inference and training at small H and
    wide chunks, not with recurrent dropout, not the GRU, not past the hidden sizes
    measured."""
    from fastseq._packing import Packing

    chunks = 2
    wide = Packing(np.full(64 * chunks, 10), 10, 64 * chunks, chunks)
    narrow = Packing(np.full(16 * chunks, 10), 10, 16 * chunks, chunks)
    lengths = np.random.default_rng(0).integers(1, 11, 256 * chunks)
    lengths[0] = 10
    unequal = Packing(lengths, 10, 256 * chunks, chunks)
    very_wide = Packing(np.full(128 * chunks, 10), 10, 128 * chunks, chunks)
    rmask = np.ones((64 * chunks, 16), np.float32)  # recurrent dropout
    for cell in ("lstm", "rnn"):
        cap, unequal_cap = _engine.COLUMNS_MAX_HIDDEN[cell], _engine.COLUMNS_UNEQUAL_MAX_HIDDEN[cell]
        train_cap = _engine.COLUMNS_TRAIN_MAX_HIDDEN[cell]
        assert _engine.runs_in_columns(cell, wide, cap, False, None)
        assert not _engine.runs_in_columns(cell, wide, cap + 1, False, None)
        assert not _engine.runs_in_columns(cell, narrow, 16, False, None)
        assert _engine.runs_in_columns(cell, unequal, unequal_cap, False, None)
        assert not _engine.runs_in_columns(cell, unequal, unequal_cap + 1, False, None)
        # training: up to its own cap, over wide enough chunks (2 samples per unit), and
        # never with recurrent dropout
        assert _engine.runs_in_columns(cell, very_wide, train_cap, True, None)
        assert not _engine.runs_in_columns(cell, very_wide, train_cap + 1, True, None)
        assert not _engine.runs_in_columns(cell, narrow, 16, True, None)
        assert not _engine.runs_in_columns(cell, wide, 16, True, rmask)
    assert _engine.runs_in_columns("lstm", wide, 32, True, None)
    assert not _engine.runs_in_columns("lstm", wide, 48, True, None)  # 64 samples < 2 per unit
    assert _engine.runs_in_columns("rnn", wide, 16, True, None)
    assert not _engine.runs_in_columns("rnn", Packing(np.full(96, 10), 10, 96, chunks), 16, True, None)
    assert not _engine.runs_in_columns("gru", wide, 16, False, None)
    assert not _engine.runs_in_columns("gru", wide, 16, True, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["rnn-tanh", "lstm-peephole"])
def test_narrow_weight_gradients_through_blas_match_naive(variant, dtype, monkeypatch):
    """Chunks of at least gemm.NARROW_BLAS_ROWS rows with C, H <= half a panel: the per-chunk
    weight gradients go to BLAS (held at one thread, _threads.weight_grads_call_blas); the
    results as the reference's."""
    from fastseq import _threads, layers
    from fastseq.kernels.gemm import NARROW_BLAS_ROWS

    decided = []
    decide = _threads.weight_grads_call_blas
    monkeypatch.setattr(
        layers, "weight_grads_call_blas", lambda *a: decided.append(decide(*a)) or decided[-1]
    )
    chunks = _threads.num_chunks(1 << 20)
    batch = chunks * (NARROW_BLAS_ROWS // 20 + 10)
    case = Case(variant, dtype, 1, False, False, True, steps=20, batch=batch, input_size=3, hidden_size=4)
    _compare(case, case.run(), _naive(case))
    assert decided == [True]
