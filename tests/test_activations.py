"""The kernels' fast float32 activations stay within 1e-6 of float64 tanh/sigmoid."""

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
