"""Property-based tests: random configurations against the NumPy reference, and random junk
input that may only ever raise TypeError or ValueError."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseq
from tests.cases import Case
from tests.conftest import VARIANTS
from tests.test_reference import _compare, _naive

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    variant=st.sampled_from(list(VARIANTS)),
    dtype=st.sampled_from([np.float32, np.float64]),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    use_lengths=st.booleans(),
    use_hx=st.booleans(),
    bias=st.booleans(),
    steps=st.integers(1, 7),
    batch=st.integers(1, 6),
    input_size=st.integers(1, 6),
    hidden_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_match_reference(**kw):
    kw["use_lengths"] = kw["use_lengths"] and kw["batch"] > 1
    case = Case(**kw)
    _compare(case, case.run(), _naive(case))


JUNK = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.lists(st.integers(-3, 3), max_size=4),
    st.lists(st.lists(st.floats(-2, 2), max_size=3), max_size=3),
    st.builds(lambda s, d: np.zeros(s, d), st.lists(st.integers(0, 4), max_size=4).map(tuple),
              st.sampled_from([np.float32, np.float64, np.int32, np.bool_, object])),
)  # fmt: skip


@SETTINGS
@given(x=JUNK, hx=JUNK, lengths=JUNK, cell=st.sampled_from(["RNN", "LSTM", "GRU"]))
def test_junk_input_raises_only_type_or_value_errors(x, hx, lengths, cell):
    layer = getattr(fastseq, cell)(3, 2, seed=0)
    try:
        out, _ = layer(x, hx, lengths)
    except (TypeError, ValueError):
        return
    layer.backward(np.zeros_like(out))  # whatever was accepted runs through backward too


@SETTINGS
@given(grad=JUNK, grad_h=JUNK)
def test_junk_gradients_raise_only_type_or_value_errors(grad, grad_h):
    layer = fastseq.LSTM(3, 2, seed=0)
    layer(np.zeros((2, 2, 3), np.float32))
    try:
        layer.backward(grad, grad_h)
    except (TypeError, ValueError):
        assert layer._cache is not None  # a rejected call keeps the workspace
