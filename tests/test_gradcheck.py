"""Finite-difference gradient checks in float64: every cell and variant x num_layers {1, 2}
x bidirectional x lengths x given/absent hx x bias; gradients of the input, the initial
states and every parameter."""

import numpy as np
import pytest

from tests.cases import Case
from tests.conftest import VARIANTS
from tests.tolerances import FD_EPS, assert_fd_close

ENTRIES_PER_TENSOR = 10


def _numeric(case, array, index, **loss_kwargs):
    old = array[index]
    array[index] = old + FD_EPS
    plus = case.loss(**loss_kwargs)
    array[index] = old - FD_EPS
    minus = case.loss(**loss_kwargs)
    array[index] = old
    return (plus - minus) / (2 * FD_EPS)


def _check(case, name, array, analytic, rng, **loss_kwargs):
    flat = rng.choice(array.size, size=min(ENTRIES_PER_TENSOR, array.size), replace=False)
    indices = [np.unravel_index(i, array.shape) for i in flat]
    numeric = [_numeric(case, array, idx, **loss_kwargs) for idx in indices]
    assert_fd_close([analytic[idx] for idx in indices], numeric, f"{case.variant}: d{name}")


def check_gradients(case, dx, dinit, rng, names=None, states=True):
    """Finite differences against the gradients of the run that returned ``dx``, ``dinit``:
    the parameters ``names`` (default: all), the input and (``states``) the initial states
    (zeros when the case passes no hx: the gradient was taken there)."""
    grads = {k: g.copy() for k, g in case.layer.grads.items()}
    for name in names or list(case.layer.params):
        _check(case, name, case.layer.params[name], grads[name], rng)
    x = case.x.copy()
    _check(case, "x", x, dx, rng, x=x)
    if states:
        h0 = [s.copy() if case.use_hx else np.zeros_like(s) for s in case.h0]
        for k, (s, d) in enumerate(zip(h0, dinit, strict=True)):
            _check(case, f"hx[{k}]", s, d, rng, h0=h0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_finite_differences(variant, num_layers, bidirectional, use_lengths, use_hx, bias):
    case = Case(variant, np.float64, num_layers, bidirectional, use_lengths, use_hx, bias, steps=4, batch=3)
    _, _, dx, dinit = case.run()
    # h0 = 0 with no bias puts ReLU pre-activations exactly at the kink (0) wherever the
    # layer below outputs zeros: central differences see half a slope there.
    at_kink = variant == "rnn-relu" and not use_hx and not bias
    check_gradients(case, dx, dinit, np.random.default_rng(99), states=not at_kink)


@pytest.mark.parametrize("recurrent_dropout", [0.0, 0.4], ids=["dropout", "dropout+recurrent"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_finite_differences_dropout_fixed_mask(variant, recurrent_dropout):
    """With dropout the loss is differentiable for a fixed mask: re-seed before each forward."""
    extra = {"dropout": 0.3, "recurrent_dropout": recurrent_dropout}
    case = Case(variant, np.float64, 3, True, True, True, extra=extra)

    def reseed():
        case.layer._rng = np.random.default_rng(5)

    reseed()
    _, _, dx, dinit = case.run()
    original_loss = case.loss

    def loss(**kw):
        reseed()
        return original_loss(**kw)

    case.loss = loss
    names = ("weight_ih_l0", "weight_hh_l1_reverse", "bias_ih_l2", "bias_hh_l0", "weight_hh_l2")
    check_gradients(case, dx, dinit, np.random.default_rng(3), names)


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("variant", ["lstm", "lstm-peephole", "rnn-tanh", "rnn-relu"])
def test_finite_differences_in_columns(variant, use_lengths, columns_everywhere):
    """The transposed layout's training (_engine.runs_in_columns, forced here), 2 layers x 2
    directions, against central differences."""
    case = Case(variant, np.float64, 2, True, use_lengths, True, steps=4, batch=5)
    _, _, dx, dinit = case.run()
    assert len(columns_everywhere[1]) == 4
    check_gradients(case, dx, dinit, np.random.default_rng(98))
