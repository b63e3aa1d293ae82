"""Results do not depend on the thread count; concurrent use is safe; global state is kept."""

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from fastseq._packing import Packing
from tests.cases import Case, run_in_threads
from tests.conftest import VARIANTS
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parent.parent


def _blas_threads():
    import scipy.linalg.cython_blas  # noqa: F401

    return sorted(
        (lib["filepath"], lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"
    )


def _run(case):
    out, finals, dx, dinit = case.run()
    return [out, *finals, dx, *dinit, *(g.copy() for g in case.layer.grads.values())]


_TRAINING_STEP = """
import sys, numpy as np, fastseq
results = {}
for name, kwargs in (("lstm", {}), ("peephole", {"peephole": True})):
    layer = fastseq.LSTM(16, 64, seed=0, **kwargs).train()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 5, 16)).astype(np.float32)
    layer.forward(x)
    results[name + "_dx"], _ = layer.backward(rng.standard_normal((30, 5, 64)).astype(np.float32))
    results.update({f"{name}_{k}": g for k, g in layer.grads.items()})
np.savez(sys.argv[1], **results)
"""


def _training_step_env(workdir):
    return dict(os.environ, NUMBA_CACHE_DIR=str(workdir / "cache"))


def _compiling_training_step(workdir):
    """The training step in a fresh interpreter compiling into an empty cache under workdir."""
    return [sys.executable, "-c", _TRAINING_STEP, str(workdir / "compiled.npz")], _training_step_env(workdir)


@pytest.mark.background(command=_compiling_training_step)  # a minute and more of compiling, from the start
def test_compiled_and_cached_kernels_give_the_same_gradients(background):
    # A training step in a process that compiles the kernels (an empty cache of its own),
    # then in one that loads them from that cache: bitwise the same (see fastseq._jit on
    # ``reassociate``; the LSTM's gradients differed in the last bits before).
    compiling, workdir = background
    assert compiling.returncode == 0, compiling.stderr[-3000:]
    command = [sys.executable, "-c", _TRAINING_STEP, str(workdir / "cached.npz")]
    subprocess.run(command, env=_training_step_env(workdir), check=True, cwd=ROOT)
    compiled, cached = np.load(workdir / "compiled.npz"), np.load(workdir / "cached.npz")
    assert len(compiled.files) == 11  # dx and 4 + 5 (peephole) parameter gradients
    differing = [k for k in compiled.files if not np.array_equal(compiled[k], cached[k])]
    assert not differing, differing


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitwise_identical_across_thread_counts(variant):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("this test needs NUMBA_NUM_THREADS >= 2 to compare thread counts")
    before = numba.get_num_threads()
    results = []
    for threads in (1, 2, 1):
        numba.set_num_threads(threads)
        case = Case(variant, np.float32, 2, True, True, True, steps=9, batch=7, input_size=5, hidden_size=16)
        results.append(_run(case))
    numba.set_num_threads(before)
    for a, b, c in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_global_thread_state_is_left_as_found():
    numba_before, blas_before = numba.get_num_threads(), _blas_threads()
    case = Case("lstm", np.float32, 2, True, True, True, batch=6)
    case.run()
    case.layer.eval()(case.x)
    assert numba.get_num_threads() == numba_before
    assert _blas_threads() == blas_before


def test_two_python_threads_run_layers_concurrently():
    cases = [
        Case(v, np.float64, 2, True, True, True, steps=30, batch=8, hidden_size=32, seed=i)
        for i, v in enumerate(("lstm", "gru", "rnn-tanh", "lstm-peephole"))
    ]
    main_thread = [_run(c) for c in cases]
    # Reference: the same runs, one after another, in another Python thread. (On AMD Zen,
    # OpenBLAS 0.3.30 gave results differing in the last bit, 1e-16, between the main
    # thread's first calls and later calls made once other threads had used BLAS; not with
    # OPENBLAS_NUM_THREADS=1. Deterministic, so not a race: compared with a tolerance below.)
    expected = [None] * len(cases)

    def serial():
        for k, c in enumerate(cases):
            expected[k] = _run(c)

    runner = threading.Thread(target=serial)
    runner.start()
    runner.join()
    for ref, main in zip(expected, main_thread, strict=True):
        for a, b in zip(ref, main, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    blas_before = _blas_threads()
    got = run_in_threads([lambda c=c: _run(c) for c in cases])
    for exp, res in zip(expected, got, strict=True):
        for a, b in zip(exp, res, strict=True):
            np.testing.assert_array_equal(a, b)
    assert _blas_threads() == blas_before


def test_kernel_threads_policy():
    from fastseq import _threads
    from fastseq._threads import SPREAD_STEP_BYTES, _blas_controller, kernel_threads
    from fastseq.kernels.gemm import BLAS_FOR_LARGE

    numba_before, blas_before = numba.get_num_threads(), _blas_threads()
    scipy_blas = _blas_controller()
    counts = [lib.num_threads for lib in scipy_blas]

    def packing(n_chunks, unit_parts=0, samples=1):  # ``samples`` in each chunk
        return SimpleNamespace(n_chunks=n_chunks, unit_parts=unit_parts, widest_chunk=samples,
                               chunk_samples=np.arange(n_chunks + 1) * samples)  # fmt: skip

    # one chunk, weights beyond a core's L2: numba's team of one, BLAS left as it was
    with kernel_threads(packing(1), np.empty(SPREAD_STEP_BYTES, np.uint8)):
        assert numba.get_num_threads() == 1
        assert _blas_threads() == blas_before
    # several chunks, small weights, or one chunk split by units, when the kernels may call
    # BLAS (chunks of one sample, or no AVX-512): BLAS (the kernels' copy) at one thread,
    # numba as it was; with chunks of several samples on the micro-kernel, BLAS as it was
    for pk, step_bytes in ((packing(2), SPREAD_STEP_BYTES), (packing(1), SPREAD_STEP_BYTES - 1),
                           (packing(1, 2), SPREAD_STEP_BYTES), (packing(2, samples=3), 64),
                           (packing(1, 2, samples=4), SPREAD_STEP_BYTES)):  # fmt: skip
        held = _threads.kernels_call_blas(pk)
        assert held == (BLAS_FOR_LARGE or pk.chunk_samples[1] == 1)
        with kernel_threads(pk, np.empty(step_bytes, np.uint8)):
            assert numba.get_num_threads() == numba_before
            expected = [1] * len(scipy_blas) if held else counts
            assert [lib.num_threads for lib in scipy_blas] == expected
    assert numba.get_num_threads() == numba_before
    assert _blas_threads() == blas_before
    # an error inside the context restores both pools and the running count (on exit, not
    # when the context object is freed: it is kept alive here)
    for pk, step_bytes in ((packing(1), SPREAD_STEP_BYTES), (packing(2, samples=1), 64)):
        context = kernel_threads(pk, np.empty(step_bytes, np.uint8))
        with pytest.raises(KeyError), context:
            assert _threads.RUNNING
            raise KeyError("inside")
        assert numba.get_num_threads() == numba_before and _blas_threads() == blas_before
        assert not _threads.RUNNING
    # the thread count the workers' pinning reads follows numba.set_num_threads
    with kernel_threads(packing(1), np.empty(SPREAD_STEP_BYTES, np.uint8)):
        assert _threads.active_threads() == 1
    assert _threads.active_threads() == numba_before
    # real layouts: chunks of 2 + 1 samples, then 1 + 1 (lengths do not matter)
    for batch, lengths, one_sample in ((3, None, False), (3, np.array([1, 5, 2]), False), (2, None, True)):
        layout = Packing(lengths, 5, batch, chunks=2)
        assert layout.widest_chunk == (1 if one_sample else 2)
        assert _threads.kernels_call_blas(layout) == (BLAS_FOR_LARGE or one_sample)


def test_forward_holds_blas_only_where_its_steps_call_it():
    """A forward pass over chunks of one sample switches BLAS to one thread exactly where
    ``kernels.common.step_panels`` hands its per-step products to BLAS (empty panels):
    short sequences with W_hh under ONE_ROW_DIRECT_BYTES read W_hh in place, long ones run
    on its panels, one chunk with W_hh of SPREAD_STEP_BYTES or more spreads on BLAS."""
    from fastseq import _threads
    from fastseq.kernels.common import (
        CHUNK_PANEL_STEPS,
        ONE_ROW_DIRECT_BYTES,
        ONE_ROW_PANEL_STEPS,
        ONE_ROW_SHALLOW_DEPTH,
        SPREAD_STEP_BYTES,
        step_panels,
    )
    from fastseq.kernels.gemm import BLAS_FOR_LARGE

    width = 64  # W_hh (rows, 64) float32: 256 bytes a row
    sizes = (16, SPREAD_STEP_BYTES // 256, ONE_ROW_DIRECT_BYTES // 256)
    steps = (1, CHUNK_PANEL_STEPS - 1, CHUNK_PANEL_STEPS, ONE_ROW_PANEL_STEPS - 1, ONE_ROW_PANEL_STEPS, 40)
    seen = set()
    shallow = ONE_ROW_SHALLOW_DEPTH  # W_hh of few columns: packed from fewer steps
    for rows, cols in [(rows, width) for rows in sizes] + [
        (16, shallow),
        (SPREAD_STEP_BYTES // 4 // shallow, shallow),
    ]:
        w_hh = np.ones((rows, cols), np.float32)
        for batch in (1, 2):
            for t in steps:
                layout = Packing(None, t, batch, chunks=batch)
                assert layout.widest_chunk == 1
                to_blas = step_panels(w_hh.T, layout.chunk_samples, layout.lengths, True).shape[0] == 0
                assert _threads.forward_steps_call_blas(layout, w_hh) == to_blas, (rows, batch, t)
                assert _threads.kernels_call_blas(layout, w_hh) == (BLAS_FOR_LARGE or to_blas)
                assert _threads.kernels_call_blas(layout)  # backward too: as before
                seen.add(to_blas)
    assert seen == {True, False}
    # chunks of several samples never call BLAS (with AVX-512); a split layout keeps it held
    assert _threads.kernels_call_blas(Packing(None, 5, 4, chunks=2), w_hh) == BLAS_FOR_LARGE
    assert _threads.kernels_call_blas(Packing(None, 5, 1, unit_parts=2), np.ones((16, width), np.float32))


def test_step_claims_take_each_part_once_and_wait_for_all():
    # the counters a unit-split forward's single region meets at (kernels.sync)
    from fastseq.kernels.sync import part_done, step_claims, take_part, wait_or_take

    parts = 3
    claims = step_claims(2, parts)
    assert claims.shape == (2 * (parts + 1),) and not claims.any()
    at = parts + 1  # the second step's counters
    assert take_part(claims, at, 1)
    assert not take_part(claims, at, 1)  # one thread per part
    assert not claims[:at].any()  # the first step's counters untouched
    # a waiting thread takes the parts no thread has taken, in order
    assert wait_or_take(claims, at, parts) == 0
    assert wait_or_take(claims, at, parts) == 2
    for _ in range(parts):
        part_done(claims, at, parts)
    assert wait_or_take(claims, at, parts) == -1  # every part done: no wait, nothing taken
    assert claims[at + parts] == parts


def test_one_region_only_while_no_other_kernel_runs(monkeypatch):
    from fastseq import _threads

    monkeypatch.setattr(_threads, "RUNNING", [None])  # this call's own entry
    assert _threads.one_region_threads() == _threads.active_threads()
    monkeypatch.setattr(_threads, "RUNNING", [None, None])  # another Python thread's kernel
    assert _threads.one_region_threads() == 0


@pytest.mark.parametrize("variant", ["lstm", "gru", "rnn-tanh"])
def test_batch_of_one_matches_its_row_in_a_batch(variant):
    # A batch of one with H = 512 takes the single-chunk path (numba's team of one, BLAS on
    # every thread for the per-step products); the same sample inside a batch of 3, with
    # the other rows' output gradients zero, takes the chunked one.
    case = Case(variant, np.float32, 1, False, False, True, steps=3, batch=3, input_size=8, hidden_size=512)
    layer, row = case.layer.train(), 1
    grad_row = np.zeros_like(case.grad_out)
    grad_row[:, row] = case.grad_out[:, row]
    results = []
    for x, grad_out in ((case.x, grad_row), (case.x[:, row : row + 1], case.grad_out[:, row : row + 1])):
        for g in layer.grads.values():
            g[...] = 0
        out, _ = layer(x)
        dx = layer.backward(grad_out)[0]
        results.append((out, dx, {k: g.copy() for k, g in layer.grads.items()}))
    (out, dx, grads), (out1, dx1, grads1) = results
    assert_close(out1[:, 0], out[:, row], np.float32, "output, batch of one")
    assert_close(dx1[:, 0], dx[:, row], np.float32, "dx, batch of one")
    for name, g in grads.items():
        assert_close(grads1[name], g, np.float32, f"{name}, batch of one")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weight_gradients_per_chunk_equal_all_rows(variant, monkeypatch):
    # Backward sums the weight gradients per chunk (partials added in chunk order) when the
    # chunks have many rows, else over all rows at once split by rows of the gradient; the
    # reference and torch tests use small batches, so the per-chunk path is forced here.
    from fastseq import _engine, _threads

    chosen = []
    policy = _threads.partial_weight_grads
    monkeypatch.setattr(
        _engine, "partial_weight_grads", lambda pk, width: chosen.append(policy(pk, width)) or chosen[-1]
    )
    results = []
    for rows in (10**9, 1):  # all rows at once; per chunk
        monkeypatch.setattr(_threads, "PARTIAL_SUM_ROWS", rows)
        monkeypatch.setattr(_threads, "PARTIAL_SUM_ROWS_PER_WIDTH", rows)
        case = Case(variant, np.float64, 2, True, True, True, steps=9, batch=7, input_size=5, hidden_size=16)
        results.append(_run(case))
    assert chosen and set(chosen[: len(chosen) // 2]) == {0} and 0 not in chosen[len(chosen) // 2 :]
    for a, b in zip(*results, strict=True):
        assert_close(a, b, np.float64, f"{variant}: per chunk vs all rows")


def test_workers_kept_off_the_calling_threads_cpu(monkeypatch):
    # After a multi-chunk kernel call, numba's workers for this thread may run on every
    # allowed CPU but the one the caller was on; the caller's own affinity is untouched.
    import os

    from fastseq import _threads

    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2 or numba.get_num_threads() < 2 or _threads._sched_getcpu is None:
        pytest.skip("needs two CPUs and two numba threads")
    monkeypatch.setattr(_threads._teams, "tids", None, raising=False)  # collect the team afresh
    case = Case("lstm", np.float32, 1, False, False, False, steps=4, batch=4, hidden_size=8)
    case.layer.eval()(case.x)
    team, cpu = _threads._teams.tids, _threads._teams.cpu
    assert team and cpu in allowed and threading.get_native_id() not in team
    for tid in team:
        assert os.sched_getaffinity(tid) == allowed - {cpu}
    assert os.sched_getaffinity(0) == allowed
    # the team is collected once per calling thread, not on every call
    collect = _threads.team_thread_ids
    calls = []
    monkeypatch.setattr(_threads, "team_thread_ids", lambda out: calls.append(1) or collect(out))
    case.layer.eval()(case.x)
    assert not calls and _threads._teams.tids == team


def test_single_threaded_blas_through_c_functions_or_threadpoolctl(monkeypatch):
    from fastseq import _threads

    # this machine's OpenBLAS (pthreads): its own C functions, found once
    _threads._switches = None
    get, set_threads = _threads._blas_switches()[0]
    assert type(get).__name__ == "_FuncPtr" and type(set_threads).__name__ == "_FuncPtr"
    before = get()
    with _threads.single_threaded_blas():
        assert [lib.num_threads for lib in _threads._blas_controller()] == [1]
        with _threads.single_threaded_blas():  # nested: restored by the outer block only
            pass
        assert get() == 1
    assert get() == before

    # another BLAS (no OpenBLAS symbols): threadpoolctl's calls
    class Lib:
        internal_api, threading_layer, num_threads = "mkl", "intel", 4

        def set_num_threads(self, n):
            self.num_threads = n

    lib = Lib()
    monkeypatch.setattr(_threads, "_controller", [lib])
    monkeypatch.setattr(_threads, "_switches", None)
    with _threads.single_threaded_blas():
        assert lib.num_threads == 1
    assert lib.num_threads == 4  # (monkeypatch puts the real libraries back afterwards)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_single_chunk_forward_keeps_the_thread_count(cell):
    """A forward over one chunk runs its chunk loop on one thread (``kernels.common.chunk_team``)
    and gives numba's thread count back, on the main thread and on another."""
    import fastseq

    layer = getattr(fastseq, cell.upper())(4, 8, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((5, 1, 4)).astype(np.float32)
    before = numba.get_num_threads()
    expected, _ = layer(x)
    assert layer._packing.n_chunks == 1
    assert numba.get_num_threads() == before
    seen = {}

    def other():
        seen["before"] = numba.get_num_threads()
        seen["out"], _ = layer(x)
        seen["after"] = numba.get_num_threads()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["after"] == seen["before"]
    np.testing.assert_array_equal(seen["out"], expected)
