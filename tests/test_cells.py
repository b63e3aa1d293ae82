"""Cells: one step of the layer's math, forward and backward, for every variant."""

import numba
import numpy as np
import pytest

from fastseq import _threads
from fastseq.kernels.gemm import FEW_ROWS
from fastseq.kernels.lstm import lstm_step, lstm_step_units
from tests.cases import run_in_threads
from tests.conftest import VARIANTS, make_cell, make_layer
from tests.tolerances import assert_close


def _states(cell, value):
    return [value] if cell == "rnn" or cell == "gru" else list(value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unrolled_cell_equals_layer(variant, dtype, rng):
    """Stepping a cell T times and back-propagating in reverse step order gives exactly the
    layer's outputs and gradients (same weights)."""
    cell_name = VARIANTS[variant][0]
    steps, batch, c, h = 5, 3, 4, 6
    layer = make_layer(variant, c, h, dtype=dtype, seed=2)
    cell = make_cell(variant, c, h, dtype=dtype, seed=9)
    cell.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = rng.standard_normal((steps, batch, c)).astype(dtype)
    n_states = 2 if cell_name == "lstm" else 1
    h0 = [rng.standard_normal((batch, h)).astype(dtype) for _ in range(n_states)]
    grad_out = rng.standard_normal((steps, batch, h)).astype(dtype)

    out, _ = layer(x, h0[0][None] if n_states == 1 else tuple(s[None] for s in h0))
    dx, dhx = layer.backward(grad_out)

    state = h0[0] if n_states == 1 else tuple(h0)
    outs = []
    for t in range(steps):
        state = cell(x[t], state)
        outs.append(_states(cell_name, state)[0])
    assert_close(np.stack(outs), out, dtype, "cell outputs")
    dstate = [np.zeros((batch, h), dtype) for _ in range(n_states)]
    dxs = []
    for t in range(steps - 1, -1, -1):
        dstate[0] = dstate[0] + grad_out[t]
        dxt, dprev = cell.backward(dstate[0] if n_states == 1 else tuple(dstate))
        dstate = _states(cell_name, dprev)
        dxs.append(dxt)
    assert_close(np.stack(dxs[::-1]), dx, dtype, "cell dx")
    for a, b in zip(dstate, _states(cell_name, dhx), strict=True):
        assert_close(a, b[0], dtype, "cell dhx")
    for name, g in cell.grads.items():
        assert_close(g, layer.grads[name + "_l0"], dtype, name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cell_finite_differences(variant, rng):
    cell_name = VARIANTS[variant][0]
    cell = make_cell(variant, 3, 4, dtype=np.float64, seed=5)
    x = rng.standard_normal((2, 3))
    n_states = 2 if cell_name == "lstm" else 1
    hx = [rng.standard_normal((2, 4)) for _ in range(n_states)]
    gs = [rng.standard_normal((2, 4)) for _ in range(n_states)]

    def loss():
        cell.eval()
        new = _states(cell_name, cell(x, hx[0] if n_states == 1 else tuple(hx)))
        cell.train()
        return sum(float(np.sum(a * g)) for a, g in zip(new, gs, strict=True))

    cell(x, hx[0] if n_states == 1 else tuple(hx))
    dx, dhx = cell.backward(gs[0] if n_states == 1 else tuple(gs))
    for name, arr, analytic in (
        [("x", x, dx)]
        + [(f"hx{k}", s, d) for k, (s, d) in enumerate(zip(hx, _states(cell_name, dhx), strict=True))]
        + [(k, cell.params[k], cell.grads[k].copy()) for k in cell.params]
    ):
        idx = np.unravel_index(rng.integers(arr.size), arr.shape)
        old = arr[idx]
        arr[idx] = old + 1e-6
        plus = loss()
        arr[idx] = old - 1e-6
        minus = loss()
        arr[idx] = old
        np.testing.assert_allclose(analytic[idx], (plus - minus) / 2e-6, rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("variant", ["rnn-tanh", "lstm", "gru"])
def test_cell_unbatched_and_eval(variant, rng):
    cell = make_cell(variant, 3, 4, dtype=np.float64, seed=1)
    x = rng.standard_normal(3)
    batched = cell.eval()(x[None])
    single = cell(x)
    for a, b in zip(
        _states(VARIANTS[variant][0], single), _states(VARIANTS[variant][0], batched), strict=True
    ):
        assert a.shape == (4,)
        np.testing.assert_array_equal(a, b[0])
    with pytest.raises(ValueError, match="backward\\(\\) needs a preceding forward\\(\\) in training mode"):
        cell.backward(np.zeros(4) if variant != "lstm" else (np.zeros(4), None))


@pytest.fixture
def split_streams(monkeypatch):
    """Every stream that can split its steps by hidden units does (thresholds at 0)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("the unit-split stream needs NUMBA_NUM_THREADS >= 2")
    monkeypatch.setattr(_threads, "STREAM_SPLIT_BYTES", 0)
    monkeypatch.setattr(_threads, "STREAM_SPLIT_WORK", 0)


# Batches on either side of FEW_ROWS: the step's products computed by fastseq or by BLAS;
# each as a serial step and, where the step can be split by hidden units (up to FEW_ROWS
# rows; not GRU's reset_after=False), split.
@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("batch", [3, FEW_ROWS + 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stream_matches_cell_steps(variant, dtype, batch, split, rng, request):
    cell_name = VARIANTS[variant][0]
    cell = make_cell(variant, 5, 7, dtype=dtype, seed=3).eval()
    splits = split and batch <= FEW_ROWS and variant != "gru-reset-before"
    if split:
        request.getfixturevalue("split_streams")
    assert cell.stream(batch=batch).unit_parts == (min(numba.config.NUMBA_NUM_THREADS, 7) if splits else 0)
    n_states = 2 if cell_name == "lstm" else 1
    x = rng.standard_normal((6, batch, 5)).astype(dtype)
    h0 = [rng.standard_normal((batch, 7)).astype(dtype) for _ in range(n_states)]
    hx = h0[0] if n_states == 1 else tuple(h0)
    stream = cell.stream(hx)
    assert stream.batch == batch and not stream.unbatched
    state = hx
    for t in range(6):
        state = cell(x[t], state)
        got = stream.step(x[t])
        for a, b in zip(_states(cell_name, got), _states(cell_name, state), strict=True):
            assert_close(a, b, dtype, "stream step")
    for a, b in zip(_states(cell_name, stream.state), _states(cell_name, state), strict=True):
        assert_close(a, b, dtype, "state")
    single = cell.stream()  # unbatched
    out = single.step(x[0, 0])
    ref = cell(x[0, 0])
    for a, b in zip(_states(cell_name, out), _states(cell_name, ref), strict=True):
        assert a.shape == (7,)
        assert_close(a, b, dtype, "unbatched stream step")


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
def test_stream_uses_live_weights_reset_and_validation(split, rng, request):
    if split:
        request.getfixturevalue("split_streams")
    cell = make_cell("lstm", 3, 4, dtype=np.float64, seed=0)
    stream = cell.stream(batch=2)
    assert bool(stream.unit_parts) == split
    x = rng.standard_normal((2, 3))
    first = stream.step(x)
    stream.reset()
    np.testing.assert_array_equal(stream.step(x)[0], first[0])  # same start, same result
    stream.reset()
    cell.params["weight_ih"] *= 2  # in-place updates take effect
    assert not np.allclose(stream.step(x)[0], first[0])
    first[0][:] = 99  # returned states are copies
    assert not np.any(stream.state[0] == 99)
    with pytest.raises(ValueError, match=r"x has shape \(2, 4\); expected \(N, C\) = \(2, 3\)"):
        stream.step(np.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"x must be a float64 array; received dtype int64"):
        stream.step(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"batch must be >= 1; received 0"):
        cell.stream(batch=0)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\) has shape \(2, 5\); expected \(N, H\) = \(2, 4\)"):
        stream.reset((np.zeros((2, 4)), np.zeros((2, 5))))
    stream.step(np.asfortranarray(rng.standard_normal((2, 3))))  # any layout is accepted


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
def test_stream_steps_call_the_compiled_kernel(split, rng, request):
    """After its first step a stream calls its kernel's compiled function (_jit.entry_point)
    instead of numba's dispatcher, with bitwise the dispatcher's results, for inputs of any
    layout (they are copied to the one type the compiled function takes)."""
    if split:
        request.getfixturevalue("split_streams")
    cell = make_cell("lstm", 3, 4, dtype=np.float32, seed=0).eval()
    direct, dispatched = cell.stream(batch=2), cell.stream(batch=2)
    attribute, kernel = ("_split", lstm_step_units) if split else ("_kernel", lstm_step)
    setattr(dispatched, attribute, kernel)
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    wide = np.zeros((2, 6), np.float32)
    wide[:, ::2] = x[2]
    readonly = x[3].copy()
    readonly.flags.writeable = False
    inputs = [x[0], np.asfortranarray(x[1]), wide[:, ::2], readonly]
    for t, given in enumerate(inputs):
        got, want = direct.step(given), dispatched.step(x[t])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        compiled = [overload.entry_point for overload in kernel.overloads.values()]
        assert any(getattr(direct, attribute) is entry for entry in compiled), t


def test_stream_split_policy():
    """Which streams split their steps by hidden units (_threads.stream_parts), at the
    shipped thresholds, with two or more threads."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("needs NUMBA_NUM_THREADS >= 2")
    parts = min(numba.config.NUMBA_NUM_THREADS, 128)
    cases = [  # cell, H, N, parts
        ("lstm", 128, 1, 0),  # 512 KB of weights, one row: the region's launch does not pay
        ("lstm", 128, 4, parts),
        ("lstm", 256, 1, parts),
        ("gru", 256, 1, parts),  # 1.5 MB of weights x rows: STREAM_SPLIT_WORK
        ("lstm", 128, 3, parts),  # 1.5 MB
        ("lstm", 128, 2, 0),  # 1 MB: mixed, stays serial
        ("rnn-tanh", 128, 32, 0),  # 128 KB: fits one core's L2
        ("gru", 128, 8, parts),
        ("lstm", 128, FEW_ROWS + 1, 0),  # BLAS spreads the products
    ]
    for cell, hd, n, expected in cases:
        stream = make_cell(cell, hd, hd, seed=0).stream(batch=n)
        assert stream.unit_parts == expected, (cell, hd, n)
    assert make_cell("gru-reset-before", 256, 256, seed=0).stream(batch=8).unit_parts == 0


@pytest.mark.parametrize("variant", ["rnn-tanh", "lstm-peephole", "gru"])
def test_split_stream_bitwise_across_thread_counts(variant, split_streams, rng):
    """The parts are fixed by the start-up thread count, so a split stream gives the same
    bits with one active thread as with all of them."""
    cell = make_cell(variant, 5, 9, dtype=np.float32, seed=4).eval()
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    results = []
    for threads in (numba.config.NUMBA_NUM_THREADS, 1):
        saved = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            stream = cell.stream(batch=3)
            results.append([stream.step(x[t]) for t in range(4)])
        finally:
            numba.set_num_threads(saved)
    for a, b in zip(results[0], results[1], strict=True):
        for u, v in zip(_states(VARIANTS[variant][0], a), _states(VARIANTS[variant][0], b), strict=True):
            np.testing.assert_array_equal(u, v)


def test_split_streams_from_concurrent_threads(split_streams, rng):
    """Several Python threads stepping their own streams that can split at once (each then
    runs its serial kernel: not the main thread) get what each gets alone on the main thread,
    where the steps split."""
    cells = [
        make_cell(v, 5, 9, dtype=np.float64, seed=k).eval() for k, v in enumerate(["lstm", "gru", "rnn-tanh"])
    ]
    x = rng.standard_normal((20, 3, 5))

    def run(cell):
        stream = cell.stream(batch=3)
        assert stream.unit_parts
        return [np.concatenate(_states(cell._cell, stream.step(x[t])), axis=1) for t in range(20)]

    alone = [run(cell) for cell in cells]
    together = run_in_threads([lambda c=c: run(c) for c in cells])
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(np.stack(a), np.stack(b))


@pytest.mark.parametrize("hidden", [7, 12, 130])
@pytest.mark.parametrize("variant", ["rnn-tanh", "rnn-relu", "lstm", "lstm-peephole", "gru"])
def test_split_stream_steps_equal_serial_bitwise(variant, hidden, split_streams, rng):
    """A split step sums every output exactly as the serial step does, so Stream.step may
    pick either (it splits only when no other kernel runs)."""
    cell = make_cell(variant, 5, hidden, dtype=np.float32, seed=6).eval()
    x = rng.standard_normal((5, 3, 5)).astype(np.float32)
    stream = cell.stream(batch=3)
    assert stream.unit_parts
    split, serial = [], []
    for t in range(5):
        split.append(stream.step(x[t]))
    stream.reset()
    _threads.RUNNING.append(None)  # as if another Python thread were running a kernel
    try:
        for t in range(5):
            serial.append(stream.step(x[t]))
    finally:
        _threads.RUNNING.pop()
    for a, b in zip(split, serial, strict=True):
        for u, v in zip(_states(VARIANTS[variant][0], a), _states(VARIANTS[variant][0], b), strict=True):
            np.testing.assert_array_equal(u, v)


def test_stream_splits_only_when_alone(split_streams, rng):
    """The split kernel runs only on the main thread while no other fastseq kernel is in
    flight."""
    stream = make_cell("lstm", 5, 8, seed=0).eval().stream(batch=2)
    calls = []
    split = stream._split
    stream._split = lambda *args: (calls.append("split"), split(*args))
    kernel = stream._kernel
    stream._kernel = lambda *args: (calls.append("serial"), kernel(*args))
    x = rng.standard_normal((2, 5)).astype(np.float32)
    stream.step(x)
    _threads.RUNNING.append(None)
    try:
        stream.step(x)
    finally:
        _threads.RUNNING.pop()
    stream.step(x)
    run_in_threads([lambda: stream.step(x)], repeats=1)  # not the main thread
    assert calls == ["split", "serial", "split", "serial"] and not _threads.RUNNING
