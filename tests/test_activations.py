"""The kernels' fast float32 activations stay within 1e-6 of float64 tanh/sigmoid."""

import re

import numpy as np
import pytest

from fastseq._jit import jit
from fastseq.kernels.activations import sigmoid, tanh


@jit
def _apply(x, t_out, s_out):
    for i in range(x.shape[0]):
        t_out[i] = tanh(x[i])
        s_out[i] = sigmoid(x[i])


@pytest.mark.parametrize("dtype,bound", [(np.float32, 1e-6), (np.float64, 1e-15)])
def test_activation_accuracy(dtype, bound):
    x = np.concatenate([np.linspace(-30, 30, 600001), [0.0, 1e-8, -1e-8, 1e4, -1e4]]).astype(dtype)
    t, s = np.empty_like(x), np.empty_like(x)
    _apply(x, t, s)
    assert t.dtype == dtype and s.dtype == dtype
    x64 = x.astype(np.float64)
    assert np.abs(t - np.tanh(x64)).max() < bound
    assert np.abs(s - 0.5 * (1 + np.tanh(x64 / 2))).max() < bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_propagate_nan_and_saturate_inf(dtype):
    x = np.array([np.nan, np.inf, -np.inf], dtype)
    t, s = np.empty_like(x), np.empty_like(x)
    _apply(x, t, s)
    assert np.isnan(t[0]) and np.isnan(s[0])
    np.testing.assert_allclose(t[1:], [1, -1], atol=1e-6)
    np.testing.assert_allclose(s[1:], [1, 0], atol=1e-6)


def _gate_loop_cases():
    from fastseq.kernels import gru, lstm, rnn

    h = 37
    v = lambda n: np.zeros(n, np.float32)  # noqa: E731
    peep = np.zeros((3, h), np.float32)
    return {
        "lstm_cell_forward": (lstm.lstm_cell_forward, (v(4 * h), v(4 * h), v(4 * h), v(4 * h), peep, False, v(h), v(h))),
        "lstm_cell_backward": (lstm.lstm_cell_backward, (v(4 * h), v(h), v(h), v(h), v(h), v(h), peep, False)),
        "gru_cell_forward": (gru.gru_cell_forward, (v(3 * h), v(3 * h), v(3 * h), v(3 * h), v(h))),
        "rnn_cell_forward": (rnn.rnn_cell_forward, (v(h), v(h), v(h), v(h), False, v(h))),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_gate_loop_cases()))
def test_gate_loops_vectorise(name):
    # The gate loops must compile to packed float32 math (the rational tanh's division as
    # vdivps): a change that stops LLVM vectorising them (for instance indices it cannot
    # prove apart) costs 5-8x in the gate math and leaves every result correct.
    import numba

    from fastseq._jit import JIT_OPTIONS

    func, args = _gate_loop_cases()[name]
    options = {k: v for k, v in JIT_OPTIONS.items() if k != "cache"}
    fresh = numba.njit(**options)(func.py_func)
    fresh(*args)
    asm = "\n".join(fresh.inspect_asm().values())
    assert re.search(r"\bv?divps\b", asm), f"{name}: no packed float32 division in its assembly"
