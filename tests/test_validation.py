"""Bad input gets a clear TypeError/ValueError naming the argument, and changes nothing."""

import copy

import numpy as np
import pytest

import fastseq


def _snapshot(module):
    return (
        {k: v.copy() for k, v in module.params.items()},
        {k: v.copy() for k, v in module.grads.items()},
        copy.deepcopy(getattr(module, "_rng", None)).bit_generator.state if hasattr(module, "_rng") else None,
        getattr(module, "_cache", None),
        len(getattr(module, "_stack", [])),
    )


def _assert_unchanged(module, snap):
    params, grads, rng_state, cache, stack = snap
    for k, v in module.params.items():
        np.testing.assert_array_equal(v, params[k])
    for k, v in module.grads.items():
        np.testing.assert_array_equal(v, grads[k])
    if rng_state is not None:
        assert module._rng.bit_generator.state == rng_state
    assert getattr(module, "_cache", None) is cache
    assert len(getattr(module, "_stack", [])) == stack


@pytest.fixture
def lstm():
    layer = fastseq.LSTM(4, 3, num_layers=2, bidirectional=True, dropout=0.2, seed=0)
    x = np.zeros((5, 2, 4), np.float32)
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    layer(x)  # a pending workspace the failed calls must not touch
    return layer


X = np.zeros((5, 2, 4), np.float32)
H = np.zeros((4, 2, 3), np.float32)

FORWARD_CASES = [
    (
        {"x": X.astype(np.int64)},
        TypeError,
        r"x must be a float32 array; received dtype int64\. Convert it with x\.astype\(np\.float32\)",
    ),
    (
        {"x": X.astype(np.float64)},
        TypeError,
        r"x must be a float32 array .*received dtype float64.*dtype=np\.float64",
    ),
    ({"x": np.array([["a"] * 4] * 5)}, TypeError, r"x must be a float32 array; received dtype <U1"),
    ({"x": np.empty((5, 2, 4), object)}, TypeError, r"x must be a float32 array; received dtype object"),
    (
        {"x": np.zeros(4, np.float32)},
        ValueError,
        r"x has 1 dimension\(s\) \(shape \(4,\)\); expected a 3-D batch \(T, N, C\)",
    ),
    ({"x": np.zeros((1, 5, 2, 4), np.float32)}, ValueError, r"x has 4 dimension\(s\)"),
    (
        {"x": np.zeros((5, 2, 7), np.float32)},
        ValueError,
        r"x has shape \(5, 2, 7\); expected \(T, N, C\) with C = input_size = 4",
    ),
    (
        {"x": np.zeros((4, 2, 5), np.float32)},
        ValueError,
        r"C = input_size = 4\. The features must be the last axis",
    ),
    (
        {"x": np.zeros((0, 2, 4), np.float32)},
        ValueError,
        r"x has shape \(0, 2, 4\); the time and batch axes must not be empty",
    ),
    ({"x": np.zeros((5, 0, 4), np.float32)}, ValueError, r"must not be empty"),
    ({"hx": H}, TypeError, r"hx must be a pair \(h, c\) of arrays for an LSTM; received ndarray"),
    ({"hx": (H,)}, TypeError, r"hx must be a pair \(h, c\).*of length 1"),
    (
        {"hx": (H, np.zeros((4, 2, 5), np.float32))},
        ValueError,
        r"hx\[1\] \(c\) has shape \(4, 2, 5\); expected \(D\*num_layers, N, H\) = \(4, 2, 3\)",
    ),
    (
        {"hx": (np.zeros((2, 2, 3), np.float32), H)},
        ValueError,
        r"hx\[0\] \(h\) has shape \(2, 2, 3\); expected .* = \(4, 2, 3\)",
    ),
    ({"hx": (np.zeros((4, 5, 3), np.float32), H)}, ValueError, r"so N = 2\. Did you mean batch_first=True\?"),
    (
        {"hx": (H.astype(np.int32), H)},
        TypeError,
        r"hx\[0\] \(h\) must be a float32 array; received dtype int32",
    ),
    (
        {"lengths": [5, 5, 5]},
        ValueError,
        r"lengths has shape \(3,\); expected one length per sample, \(N,\) = \(2,\)",
    ),
    ({"lengths": [0, 5]}, ValueError, r"lengths must be in \[1, T=5\]; received min 0, max 5"),
    ({"lengths": [-1, 5]}, ValueError, r"lengths must be in \[1, T=5\]; received min -1"),
    ({"lengths": [6, 5]}, ValueError, r"lengths must be in \[1, T=5\]; received min 5, max 6"),
    ({"lengths": [2.5, 5.0]}, TypeError, r"lengths must be an integer array; received dtype float64"),
    ({"lengths": [[5, 5]]}, ValueError, r"lengths has shape \(1, 2\)"),
    ({"lengths": ["5", "5"]}, TypeError, r"lengths must be an integer array"),
]


@pytest.mark.parametrize("kwargs,error,match", FORWARD_CASES)
def test_forward_rejects(lstm, kwargs, error, match):
    snap = _snapshot(lstm)
    args = {"x": X, **kwargs}
    with pytest.raises(error, match=match):
        lstm(args.pop("x"), **args)
    _assert_unchanged(lstm, snap)


def test_unbatched_with_lengths_is_rejected(lstm):
    with pytest.raises(ValueError, match=r"lengths needs batched 3-D input"):
        lstm(np.zeros((5, 4), np.float32), lengths=[3])


BACKWARD_CASES = [
    (
        (np.zeros((5, 2, 5), np.float32),),
        ValueError,
        r"grad_output has shape \(5, 2, 5\); expected the forward's output shape = \(5, 2, 6\)",
    ),
    ((np.zeros((5, 2, 6), np.float64),), TypeError, r"grad_output must be a float32 array"),
    ((np.zeros((5, 2, 6), np.float32), H), TypeError, r"grad_h_n must be a pair \(h, c\)"),
    (
        (np.zeros((5, 2, 6), np.float32), (H, np.zeros((4, 1, 3), np.float32))),
        ValueError,
        r"grad_h_n\[1\] \(c\) has shape \(4, 1, 3\)",
    ),
]


@pytest.mark.parametrize("args,error,match", BACKWARD_CASES)
def test_backward_rejects_and_keeps_the_workspace(lstm, args, error, match):
    snap = _snapshot(lstm)
    with pytest.raises(error, match=match):
        lstm.backward(*args)
    _assert_unchanged(lstm, snap)
    lstm.backward(np.zeros((5, 2, 6), np.float32))  # the workspace is still usable


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"input_size": 0}, ValueError, r"input_size must be >= 1; received 0"),
        ({"input_size": -3}, ValueError, r"input_size must be >= 1; received -3"),
        ({"input_size": 2.5}, TypeError, r"input_size must be an integer; received 2\.5"),
        ({"input_size": True}, TypeError, r"input_size must be an integer; received True"),
        ({"hidden_size": 0}, ValueError, r"hidden_size must be >= 1; received 0"),
        ({"num_layers": 0}, ValueError, r"num_layers must be >= 1; received 0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\]; received -0\.1"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\]; received 1\.5"),
        ({"dropout": "0.5"}, TypeError, r"dropout must be a number in \[0, 1\]"),
        ({"recurrent_dropout": 1.5}, ValueError, r"recurrent_dropout must be in \[0, 1\]; received 1\.5"),
        ({"recurrent_dropout": None}, TypeError, r"recurrent_dropout must be a number in \[0, 1\]"),
        ({"dtype": np.float16}, ValueError, r"dtype must be np\.float32 or np\.float64; received float16"),
        ({"dtype": np.int32}, ValueError, r"dtype must be np\.float32 or np\.float64; received int32"),
        ({"dtype": "banana"}, TypeError, r"dtype must be np\.float32 or np\.float64; received 'banana'"),
        ({"bias": "yes"}, TypeError, r"bias must be True or False; received 'yes'"),
        ({"bidirectional": 2}, TypeError, r"bidirectional must be True or False"),
        ({"batch_first": None}, TypeError, r"batch_first must be True or False"),
        ({"peephole": 1}, TypeError, r"peephole must be True or False"),
        ({"forget_bias": float("nan")}, ValueError, r"forget_bias must be finite"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    args = {"input_size": 4, "hidden_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        fastseq.LSTM(args.pop("input_size"), args.pop("hidden_size"), **args)


def test_variant_option_errors():
    with pytest.raises(ValueError, match=r"nonlinearity must be 'tanh' or 'relu'; received 'sigmoid'"):
        fastseq.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"nonlinearity must be 'tanh' or 'relu'"):
        fastseq.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(TypeError, match=r"reset_after must be True or False"):
        fastseq.GRU(3, 4, reset_after="no")


def test_cell_rejects_and_changes_nothing():
    cell = fastseq.GRUCell(4, 3, seed=0)
    cell(np.zeros((2, 4), np.float32))
    snap = _snapshot(cell)
    with pytest.raises(
        ValueError, match=r"x has shape \(2, 5\); expected \(N, C\) or \(C,\) with C = input_size = 4"
    ):
        cell(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"hx has shape \(3, 3\); expected \(N, H\) = \(2, 3\)"):
        cell(np.zeros((2, 4), np.float32), np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match=r"x must be a float32 array; received dtype int64"):
        cell(np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"grad has shape \(2, 4\); expected the shape of h' = \(2, 3\)"):
        cell.backward(np.zeros((2, 4), np.float32))
    _assert_unchanged(cell, snap)
    cell.backward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"backward\(\) needs a preceding forward\(\)"):
        cell.backward(np.zeros((2, 3), np.float32))


def test_unusual_but_valid_inputs_match_clean_ones():
    layer = fastseq.GRU(4, 3, bidirectional=True, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 3, 4))
    ref, ref_h = layer(base)
    variants = {
        "fortran": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=2)[:, :, ::2],
        "list": base.tolist(),
    }
    ro = base.copy()
    ro.flags.writeable = False
    variants["read-only"] = ro
    for name, x in variants.items():
        out, h = layer(x)
        np.testing.assert_array_equal(out, ref, err_msg=name)
        np.testing.assert_array_equal(h, ref_h, err_msg=name)
    layer.batch_first = True
    out, _ = layer(base.transpose(1, 0, 2))  # a non-contiguous view
    np.testing.assert_array_equal(out.transpose(1, 0, 2), ref)


@pytest.mark.parametrize("cls", [fastseq.RNN, fastseq.LSTM, fastseq.GRU])
def test_nan_and_inf_propagate(cls):
    layer = cls(2, 3, seed=0)
    x = np.zeros((4, 2, 2), np.float32)
    x[1, 0, 0] = np.nan
    x[1, 1, 1] = np.inf
    out, _ = layer(x)
    assert np.isnan(out[1:, 0]).all()  # NaN reaches every later step of that sample
    assert not np.isnan(out[0]).any()
    assert np.isfinite(out[1, 1]).all()  # +inf saturates the gates: finite outputs


@pytest.mark.parametrize("cls", [fastseq.RNN, fastseq.LSTM, fastseq.GRU])
def test_extreme_inputs_give_finite_outputs_and_gradients(cls):
    layer = cls(3, 4, num_layers=2, seed=0)
    x = np.random.default_rng(0).uniform(-1e4, 1e4, size=(50, 3, 3)).astype(np.float32)
    out, _ = layer(x)
    dx, _ = layer.backward(np.ones_like(out))
    assert np.isfinite(out).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in layer.grads.values())


def test_relu_keeps_nan():
    layer = fastseq.RNN(2, 3, nonlinearity="relu", seed=0)
    x = np.zeros((3, 1, 2), np.float32)
    x[0, 0, 0] = np.nan
    out, _ = layer(x)
    assert np.isnan(out).all()


def test_check_finite_names_tensor_and_step():
    layer = fastseq.GRU(2, 3, seed=0, check_finite=True)
    x = np.zeros((6, 3, 2), np.float32)
    x[4, 1, 0] = np.nan
    snap = _snapshot(layer)
    with pytest.raises(
        ValueError, match=r"x has 1 non-finite value\(s\); the first at time step 4, sample 1, feature 0"
    ):
        layer(x)
    _assert_unchanged(layer, snap)
    # NaN in padding beyond a sample's length is not an error
    out, _ = layer(x, lengths=[6, 4, 6])
    assert np.isfinite(out).all()
    with pytest.raises(
        ValueError, match=r"hx has 9 non-finite value\(s\) \(first at index \(0, 0, 0\): inf\)"
    ):
        layer(np.zeros((6, 3, 2), np.float32), np.full((1, 3, 3), np.inf, np.float32))
    out, _ = layer(np.zeros((6, 3, 2), np.float32))
    bad = np.zeros_like(out)
    bad[2, 0, 1] = np.inf
    snap = _snapshot(layer)
    with pytest.raises(
        ValueError, match=r"grad_output has 1 non-finite value\(s\); the first at time step 2, sample 0"
    ):
        layer.backward(bad)
    _assert_unchanged(layer, snap)
    layer.backward(np.ones_like(out))
    with pytest.raises(TypeError, match=r"check_finite must be True or False"):
        fastseq.LSTM(2, 3, check_finite="yes")


@pytest.mark.parametrize("batch, lengths", [(1, None), (3, None), (3, [6, 4, 5])])
def test_check_finite_names_the_first_non_finite_output(batch, lengths):
    # N=1 runs on packed rows that are the output itself; N=3 writes the (T, N, H) output
    # directly from the kernels (packing.out_rows): the message must name the same entry
    kwargs = {"nonlinearity": "relu", "seed": 0, "dtype": np.float32}
    scales = np.array([2.0] if batch == 1 else [0.5, 2.0, 0.1], np.float32)  # sample 1 overflows first
    x = np.ones((6, batch, 2), np.float32) * scales[None, :, None]
    unchecked = fastseq.RNN(2, 3, **kwargs)
    unchecked.params["weight_hh_l0"][:] = 1e20
    with np.errstate(over="ignore", invalid="ignore"):
        out, _ = unchecked(x, lengths=lengths)
    step, sample, feature = (int(i) for i in np.argwhere(~np.isfinite(out))[0])
    assert step != sample or batch == 1  # a swap of the two would show
    layer = fastseq.RNN(2, 3, check_finite=True, **kwargs)
    layer.params["weight_hh_l0"][:] = 1e20
    with pytest.raises(FloatingPointError, match=rf"time step {step}, sample {sample}, feature {feature}:"):
        layer(x, lengths=lengths)


def test_check_finite_catches_overflow_in_outputs_and_gradients():
    layer = fastseq.RNN(2, 3, nonlinearity="relu", seed=0, dtype=np.float32, check_finite=True)
    layer.params["weight_hh_l0"][:] = 1e20
    with pytest.raises(
        FloatingPointError, match=r"out has \d+ non-finite value\(s\); the first at time step"
    ):
        layer(np.ones((6, 2, 2), np.float32))
    layer.params["weight_hh_l0"][:] = 0.1
    out, _ = layer(np.ones((3, 2, 2), np.float32))
    with pytest.raises(FloatingPointError, match=r"non-finite"):
        layer.backward(np.full_like(out, 3e38))


def test_seed_validation():
    with pytest.raises(TypeError, match=r"seed must be None or a non-negative integer; received 'abc'"):
        fastseq.GRU(2, 3, seed="abc")
    with pytest.raises(ValueError, match=r"seed must be None or a non-negative integer; received -1"):
        fastseq.LSTMCell(2, 3, seed=-1)


@pytest.mark.parametrize("cls", [fastseq.RNN, fastseq.LSTM, fastseq.GRU])
def test_very_long_sequence(cls):
    layer = cls(3, 4, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((10_000, 2, 3)).astype(np.float32)
    out, _ = layer(x)
    dx, _ = layer.backward(np.ones_like(out))
    assert np.isfinite(out).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in layer.grads.values())


def test_python_values_outside_float32_range_are_rejected():
    layer = fastseq.RNN(2, 3, seed=0)
    with pytest.raises(
        ValueError, match=r"x holds values outside the float32 range \(largest \|value\| 1e\+39\)"
    ):
        layer([[[1e39, 0.0]]])
