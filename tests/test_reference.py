"""fastseq layers against the plain-NumPy reference in tests/naive.py, forward and backward."""

import itertools

import numpy as np
import pytest

from tests import naive
from tests.cases import Case, assert_matches
from tests.conftest import VARIANTS

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
