"""The one place where test tolerances live, and a record of the largest errors seen."""

from __future__ import annotations

import numpy as np

#: Relative tolerance per dtype (issue: float32 2e-4, float64 1e-9 for torch parity).
RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}
#: Finite differences in float64: central differences with this step.
FD_EPS = 1e-6
FD_RTOL = 1e-5

#: Largest error seen per check kind, relative to the compared tensor's largest magnitude.
MAX_SEEN: dict[str, float] = {}


def _record(kind, actual, expected):
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0)) / scale
    MAX_SEEN[kind] = max(MAX_SEEN.get(kind, 0.0), err)


def assert_close(actual, expected, dtype, what="", kind=None):
    """allclose with rtol by dtype and atol = rtol * max|expected| (so entries near zero
    are judged on the tensor's scale)."""
    dtype = np.dtype(dtype)
    rtol = RTOL[dtype]
    expected = np.asarray(expected, np.float64)
    assert np.shape(actual) == expected.shape, f"{what}: shape {np.shape(actual)} != {expected.shape}"
    atol = rtol * float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=what)
    _record(kind or f"{dtype.name}", actual, expected)


def assert_fd_close(analytic, numeric, what=""):
    """Finite-difference check in float64."""
    numeric = np.asarray(numeric)
    atol = FD_RTOL * max(float(np.max(np.abs(numeric), initial=0.0)), 1e-3)
    np.testing.assert_allclose(analytic, numeric, rtol=FD_RTOL, atol=atol, err_msg=what)
    _record("finite differences", analytic, numeric)
