"""Argument checks shared by every public entry point.

Wrong type or dtype -> TypeError; wrong shape, size, range or call order -> ValueError. Each
message names the argument, what was expected, what was received and, where there is one,
the likely fix. Checks run before any state is changed.
"""

from __future__ import annotations

import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_option(dtype) -> np.dtype:
    """The layer's ``dtype=`` option as an np.dtype (float32 or float64)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype must be np.float32 or np.float64; received {dtype!r}") from err
    if dt not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be np.float32 or np.float64; received {dt.name}")
    return dt


def positive_int(name: str, value, minimum: int = 1) -> int:
    """An integer option >= minimum (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; received {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; received {value}")
    return int(value)


def probability(name: str, value) -> float:
    """A float option in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1]; received {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; received {value}")
    return float(value)


def finite_float(name: str, value) -> float:
    """A finite real option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; received {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; received {value}")
    return float(value)


def flag(name: str, value) -> bool:
    """A boolean option."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; received {value!r}")
    return bool(value)


def float_array(name: str, value, dtype: np.dtype) -> np.ndarray:
    """``value`` as an ndarray of exactly ``dtype`` (no silent casts between precisions)."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype != dtype:
        if arr.dtype.kind in "fiub" and not isinstance(value, np.ndarray):
            # Python lists/scalars carry no precision of their own: take the layer's.
            with np.errstate(over="ignore"):
                cast = arr.astype(dtype)
            if np.isinf(cast).sum() != np.isinf(arr).sum():
                raise ValueError(
                    f"{name} holds values outside the {dtype.name} range (largest |value| {np.abs(arr).max():.3g})"
                )
            return cast
        raise TypeError(
            f"{name} must be a {dtype.name} array (the layer's dtype); received dtype "
            f"{arr.dtype}. Convert it with {name}.astype(np.{dtype.name}) or build the "
            f"layer with dtype=np.{arr.dtype.name}"
            if arr.dtype.kind == "f"
            else f"{name} must be a {dtype.name} array; received dtype {arr.dtype}. "
            f"Convert it with {name}.astype(np.{dtype.name})"
        )
    return arr


def shape(name: str, arr: np.ndarray, expected: tuple, described: str, hint: str = "") -> None:
    """Raise ValueError unless ``arr.shape == expected``."""
    if arr.shape != tuple(expected):
        msg = f"{name} has shape {arr.shape}; expected {described} = {tuple(expected)}"
        raise ValueError(msg + (f". {hint}" if hint else ""))


def lengths_array(lengths, steps: int, batch: int) -> np.ndarray:
    """Per-sample lengths as int64 (N,), each in [1, T]."""
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"lengths must be an integer array; received dtype {arr.dtype}. "
            "Convert it with np.asarray(lengths, dtype=np.int64)"
        )
    if arr.shape != (batch,):
        raise ValueError(f"lengths has shape {arr.shape}; expected one length per sample, (N,) = ({batch},)")
    if arr.min() < 1 or arr.max() > steps:
        raise ValueError(f"lengths must be in [1, T={steps}]; received min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64)


def seed_option(seed):
    """``seed=``: None or a non-negative integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or a non-negative integer; received {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be None or a non-negative integer; received {seed}")
    return int(seed)


def finite(name: str, arr: np.ndarray, time_axis: int | None = None, error=ValueError) -> None:
    """Raise ``error`` naming ``name`` and the first non-finite entry (its time step when
    ``time_axis`` is given) unless every entry is finite."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f" at time step {index[time_axis]}" if time_axis is not None else ""
    raise error(
        f"{name} has {int(bad.sum())} non-finite value(s){where} (first at index {index}: {arr[index]})"
    )


def forget_bias_option(value, bias: bool) -> float:
    """``forget_bias=``: finite, and only with a bias to add it to."""
    value = finite_float("forget_bias", value)
    if value and not bias:
        raise ValueError("forget_bias needs bias=True (it is added to bias_ih)")
    return value
