"""Activation functions for the gate loops, typed so float32 math stays float32.

float32: a branch-free rational approximation of tanh (the 13/6 odd rational form with
clamping used by Eigen's ``generic_fast_tanh_float``) that LLVM vectorises; sigmoid is
``0.5 * tanh(0.5 * x) + 0.5``. Maximum absolute error against float64 tanh is below 1e-6
(checked in ``tests/test_activations.py``).

float64: libm ``tanh`` and ``exp``, so float64 results match a float64 reference to
rounding (that is what the gradient checks and float64 torch parity rely on).

Derivatives are written in terms of the activation's output by the callers:
``tanh'(x) = 1 - y*y``, ``sigmoid'(x) = y * (1 - y)``.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from fastseq._jit import JIT_OPTIONS

_F = np.float32
_CLAMP = _F(7.90531110763549805)
_A1 = _F(4.89352455891786e-03)
_A3 = _F(6.37261928875436e-04)
_A5 = _F(1.48572235717979e-05)
_A7 = _F(5.12229709037114e-08)
_A9 = _F(-8.60467152213735e-11)
_A11 = _F(2.00018790482477e-13)
_A13 = _F(-2.76076847742355e-16)
_B0 = _F(4.89352518554385e-03)
_B2 = _F(2.26843463243900e-03)
_B4 = _F(1.18534705686654e-04)
_B6 = _F(1.19825839466702e-06)
_HALF32 = _F(0.5)


def tanh(x):
    """tanh of a scalar (pure-Python fallback; kernels use the overloads below)."""
    return np.tanh(x)


def sigmoid(x):
    """Logistic sigmoid of a scalar (pure-Python fallback)."""
    return 1.0 / (1.0 + np.exp(-x))


def _tanh_f32(x):
    # Comparisons (not min/max) so that NaN passes through unchanged.
    x = -_CLAMP if x < -_CLAMP else x
    x = _CLAMP if x > _CLAMP else x
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


def _is_f32(x):
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(tanh, jit_options=JIT_OPTIONS)
def _tanh_overload(x):
    if _is_f32(x):
        return _tanh_f32
    return lambda x: np.tanh(x)


@overload(sigmoid, jit_options=JIT_OPTIONS)
def _sigmoid_overload(x):
    if _is_f32(x):

        def impl(x):
            return _HALF32 * tanh(_HALF32 * x) + _HALF32

        return impl
    return lambda x: 1.0 / (1.0 + np.exp(-x))
