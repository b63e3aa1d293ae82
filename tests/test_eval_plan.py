"""Eval plans (``fastseq.layers.EvalPlan``): a layer's repeated eval calls replay the kernel
calls of its own path, on each call's arrays, and stop when the plan no longer fits."""

from __future__ import annotations

import numpy as np
import pytest

from fastseq import _engine, layers
from tests.conftest import VARIANTS, make_layer

#: (T, N, C, H, lengths, path): the kernel path each shape takes (see ``_engine.forward``).
SHAPES = [
    (6, 1, 5, 8, False, "rows"),  # one chunk: identity packing, packed input and output
    (7, 5, 4, 8, True, "rows"),  # chunks over lengths: gathered input, unpacked output
    (5, 64, 8, 16, False, "columns"),  # the transposed layout (LSTM, RNN; rows for the GRU)
    (4, 1, 6, 8, False, "units"),  # a batch of one split by units (forced below)
]


def _layer_pair(variant, shape, layers_dirs, monkeypatch):
    steps, batch, c, h, use_lengths, path = shape
    num_layers, bidirectional = layers_dirs
    if path == "units":
        monkeypatch.setattr(layers, "unit_parts", lambda batch, w_hh, splits=True: 2 if splits else 0)
    planned, fresh = (
        make_layer(variant, c, h, num_layers=num_layers, bidirectional=bidirectional, seed=3).eval()
        for _ in range(2)
    )
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((steps, batch, c)).astype(np.float32) for _ in range(3)]
    lengths = None
    if use_lengths:
        lengths = rng.integers(1, steps + 1, size=batch)
        lengths[0] = steps
    return planned, fresh, xs, lengths


def _assert_same(got, expected):
    out, states = got
    out_ref, states_ref = expected
    np.testing.assert_array_equal(out, out_ref)
    pairs = zip(states, states_ref, strict=True) if isinstance(states, tuple) else [(states, states_ref)]
    for s, s_ref in pairs:
        np.testing.assert_array_equal(s, s_ref)


@pytest.mark.parametrize("layers_dirs", [(1, False), (2, True)], ids=["1x1", "2x2"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] + ("-lengths" if s[4] else "") for s in SHAPES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_plan_replays_the_layer_path(variant, shape, layers_dirs, monkeypatch):
    """The third eval call of a layout runs through the plan (no ``_engine.forward``) on its
    own input, bitwise equal to a layer without a plan; the first two build it."""
    planned, fresh, xs, lengths = _layer_pair(variant, shape, layers_dirs, monkeypatch)
    planned(xs[0], lengths=lengths)
    assert planned._plan is None
    planned(xs[1], lengths=lengths)
    plan = planned._plan
    assert plan is not None
    names = [kernel.py_func.__name__ for kernel, _, _ in plan._calls]
    assert len(names) == layers_dirs[0] * (2 if layers_dirs[1] else 1)
    cell, opts = VARIANTS[variant]
    path = shape[-1]
    if path == "columns" and cell != "gru":
        assert set(names) == {"forward_columns"}
    elif path == "units" and opts.get("reset_after", True):
        assert set(names) == {f"{cell}_forward_units"}
    else:
        assert set(names) == {f"{cell}_forward"}
    expected = fresh(xs[2], lengths=lengths)

    def no_decisions(*args, **kwargs):
        raise AssertionError("the plan should make the kernel calls")

    monkeypatch.setattr(_engine, "forward", no_decisions)
    _assert_same(planned(xs[2], lengths=None if lengths is None else lengths.copy()), expected)
    assert planned._plan is plan


def _two_calls(layer, x, **kwargs):
    layer(x, **kwargs)
    layer(x, **kwargs)
    assert layer._plan is not None


def test_plan_follows_the_parameters():
    """Parameters updated in place are read by the plan; a parameter array replaced, or new
    bound arrays, stop it; ``train()`` drops it."""
    planned, fresh = (make_layer("lstm", 4, 8, seed=1).eval() for _ in range(2))
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    _two_calls(planned, x)
    plan = planned._plan
    for layer in (planned, fresh):
        layer.params["weight_hh_l0"] *= 0.5  # in place
    _assert_same(planned(x), fresh(x))
    assert planned._plan is plan
    replaced = planned.params["weight_ih_l0"] * 2
    planned.params["weight_ih_l0"] = replaced
    fresh.params["weight_ih_l0"][...] = replaced
    assert not plan.serves(planned, x, None)
    _assert_same(planned(x), fresh(x))
    planned.train()
    assert planned._plan is None
    planned.eval()
    _two_calls(planned, x)
    planned._bind(dict(planned.params), planned.grads)
    assert planned._plan is None


def test_plan_serves_only_its_layout():
    """Other lengths, another layout of the same values, a read-only input, an initial
    state or another dtype take the layer's own path (and its checks)."""
    layer = make_layer("gru", 4, 8, seed=2).eval()
    fresh = make_layer("gru", 4, 8, seed=2).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    _two_calls(layer, x, lengths=lengths)
    plan = layer._plan
    assert plan.serves(layer, x, lengths.copy())
    other = np.array([6, 3, 4])
    assert not plan.serves(layer, x, other)
    assert not plan.serves(layer, x, lengths.astype(np.int32))
    assert not plan.serves(layer, x, None)
    _assert_same(layer(x, lengths=other), fresh(x, lengths=other))
    strided = np.asfortranarray(x)
    assert not plan.serves(layer, strided, lengths)
    _assert_same(layer(strided, lengths=lengths), fresh(x, lengths=lengths))
    frozen = x.copy()
    frozen.flags.writeable = False
    assert not plan.serves(layer, frozen, lengths)
    hx = rng.standard_normal((1, 3, 8)).astype(np.float32)
    _assert_same(layer(x, hx, lengths=lengths), fresh(x, hx, lengths=lengths))
    with pytest.raises(TypeError, match="float32"):
        layer(x.astype(np.float64), lengths=lengths)
    with pytest.raises(ValueError, match="lengths"):
        layer(x, lengths=np.array([6, 0, 4]))
    assert layer._plan is plan


@pytest.mark.parametrize("layout", ["time-major", "batch-first", "unbatched"])
@pytest.mark.parametrize("variant", ["rnn-tanh", "lstm", "gru"])
def test_plan_takes_initial_states(variant, layout, monkeypatch):
    """Calls with ``hx`` (arrays of the state shape; an LSTM pair with either part None)
    run through the plan; any other ``hx`` goes to the layer's checks."""
    batch_first = layout == "batch-first"
    planned, fresh = (
        make_layer(variant, 4, 8, num_layers=2, bidirectional=True, batch_first=batch_first, seed=4).eval()
        for _ in range(2)
    )
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 4) if batch_first else (6, 4) if layout == "unbatched" else (6, 3, 4))
    x = x.astype(np.float32)
    state_shape = (4, 8) if layout == "unbatched" else (4, 3, 8)
    states = [rng.standard_normal(state_shape).astype(np.float32) for _ in range(2)]
    lstm = VARIANTS[variant][0] == "lstm"
    hxs = [(states[0], states[1]), (None, states[1]), [states[0], None]] if lstm else [states[0]]
    _two_calls(planned, x)
    plan = planned._plan
    expected = [fresh(x, hx) for hx in hxs]
    with monkeypatch.context() as patched:
        patched.setattr(_engine, "forward", lambda *a, **k: pytest.fail("the plan should make the calls"))
        for hx, want in zip(hxs, expected, strict=True):
            _assert_same(planned(x, hx), want)
    # valid but not arrays of the layer's dtype: the layer's checks convert it; the plan stays
    listed = [s.tolist() for s in hxs[0]] if lstm else hxs[0].tolist()
    _assert_same(planned(x, listed), expected[0])
    assert planned._plan is plan
    wrong = states[0][:-1]
    with pytest.raises(ValueError, match="hx"):
        planned(x, (wrong, states[1]) if lstm else wrong)
    with pytest.raises(TypeError, match="hx"):
        planned(x, (states[0].astype(np.float64), None) if lstm else states[0].astype(np.float64))
    if lstm:
        with pytest.raises(TypeError, match="pair"):
            planned(x, states[0])
    assert planned._plan is plan
