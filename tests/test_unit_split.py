"""The unit-split path (a small batch with large recurrent weights: one chunk, each step
split across threads by hidden units) against finite differences, torch, the NumPy
reference and the chunked path: the LSTM's batches of 1-8, the GRU's and RNN's batch of
one, and the GRU's and RNN's batches of 2-16 (the policy by the core's L2,
``_threads.L2_SPLIT_SHARES``). The fixtures open every byte range (:func:`split_every_batch`),
so small layers take the path; H is odd so that the parts have unequal widths."""

import numba
import numpy as np
import pytest

import fastseq
from fastseq import _engine, _threads, layers
from fastseq._packing import Packing
from fastseq.kernels.common import (
    CHUNK_PANEL_STEPS,
    DIRECT_PROJECTION_ROWS,
    DIRECT_STEP_ROWS,
    ONE_ROW_PANEL_STEPS,
    SHORT_SPLIT_ROWS,
    UPFRONT_LARGE_BYTES,
    UPFRONT_LARGE_ROWS,
    UPFRONT_PROJECTION_BYTES,
    UPFRONT_PROJECTION_ROWS,
    input_panels,
    steps_region_start,
    unit_bounds,
    unit_projection_start,
    unit_recurrent_panels,
)
from fastseq.registry import CELLS
from tests.cases import Case, assert_matches, run_in_threads
from tests.conftest import make_layer
from tests.test_api import check_padded_outputs_written
from tests.test_gradcheck import check_gradients
from tests.test_reference import _naive
from tests.test_torch_parity import torch_run
from tests.tolerances import assert_close


def _count_kernel_calls(monkeypatch, names):
    """Wrap the named ``_engine`` kernels (``<cell>_forward_units`` / ``_backward_units``)
    to count their calls: {"forward": n, "backward": n}."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("the unit-split path needs NUMBA_NUM_THREADS >= 2")
    calls = {"forward": 0, "backward": 0}
    for name in names:
        kernel = getattr(_engine, name)
        kind = "forward" if "_forward_" in name else "backward"

        def counted(*args, kernel=kernel, kind=kind):
            calls[kind] += 1
            return kernel(*args)

        monkeypatch.setattr(_engine, name, counted)
    return calls


def split_every_batch(monkeypatch, largest=16):
    """Split batches of 1 to ``largest`` samples by units whatever the size of W_hh (the
    batch of one's range, the shares of the core's L2 and their floor opened)."""
    monkeypatch.setattr(_threads, "SINGLE_SPLIT_BYTES", (0, 1 << 62))
    monkeypatch.setattr(_threads, "L2_SPLIT_SHARES", ((largest, 0.0),))
    monkeypatch.setattr(_threads, "L2_SPLIT_MIN_BYTES", 0)


@pytest.fixture
def unit_split(monkeypatch):
    """Force the LSTM's unit-split path and count its kernel calls: {"forward": n, "backward": n}."""
    split_every_batch(monkeypatch)
    return _count_kernel_calls(monkeypatch, ("lstm_forward_units", "lstm_backward_units"))


def _chunked(monkeypatch):
    monkeypatch.setattr(layers, "unit_parts", lambda *args, **kwargs: 0)


def _step_results(case):
    """One training step of ``case``: output, final states, dx, gradients of the initial
    states and of the parameters."""
    out, finals, dx, dinit = case.run()
    return [out, *finals, dx, *dinit, *(g.copy() for g in case.layer.grads.values())]


def _split_then_chunked(monkeypatch, make_case):
    """:func:`_step_results` of ``make_case()`` on the split path, then on the chunked path,
    with the same dropout masks."""
    results = []
    for split in (True, False):
        case = make_case()
        case.layer._rng = np.random.default_rng(11)  # the same masks on both paths
        if not split:
            _chunked(monkeypatch)
        results.append(_step_results(case))
    return results


def _at_thread_counts(make_case, counts=(1, 2, 1)):
    """:func:`_step_results` of ``make_case()`` with each active numba thread count."""
    return _at_each_thread_count(lambda: _step_results(make_case()), counts)


def _at_each_thread_count(run, counts):
    """``run()``'s result with each active numba thread count in ``counts``."""
    before = numba.get_num_threads()
    results = []
    try:
        for threads in counts:
            numba.set_num_threads(threads)
            results.append(run())
    finally:
        numba.set_num_threads(before)
    return results


@pytest.mark.parametrize("shares", [((2, 0.75), (4, 1.0)), ((4, 0.75), (12, 1.0), (16, 1.5))])
def test_unit_parts_policy_by_l2(monkeypatch, shares):
    # the tables of AMD's Zen and of other CPUs: batches up to each entry's largest split
    # from its share of the core's L2 (not under L2_SPLIT_MIN_BYTES), larger ones never; a
    # batch of one in a fixed range
    l2 = 2 << 20
    monkeypatch.setattr(_threads, "L2_BYTES", l2)
    monkeypatch.setattr(_threads, "L2_SPLIT_SHARES", shares)
    parts = numba.config.NUMBA_NUM_THREADS
    smallest = 2
    for largest, share in shares:
        lo = int(share * l2)
        for batch in range(smallest, largest + 1):
            for nbytes, split in ((lo - 4, False), (lo, True), (64 << 20, True)):
                w_hh = np.empty((1, nbytes // 4), np.float32)
                assert _threads.unit_parts(batch, w_hh) == (parts if split else 0), (batch, nbytes)
        smallest = largest + 1
    assert _threads.unit_parts(smallest, np.empty((1, 16 << 20), np.float32)) == 0  # 64 MB: chunks
    lo, hi = _threads.SINGLE_SPLIT_BYTES
    for nbytes, split in ((lo - 4, False), (lo, True), (hi - 4, True), (hi, False)):
        assert (_threads.unit_parts(1, np.empty((1, nbytes // 4), np.float32)) > 0) == split, nbytes
    # the LSTM's and the GRU's W_hh (G*H, H) from a lower size
    gated_lo = _threads.SINGLE_SPLIT_GATED_MIN_BYTES
    assert gated_lo < lo
    for gates in (3, 4):
        for hidden in (96, 128, 256):
            w_hh = np.empty((gates * hidden, hidden), np.float32)
            assert (_threads.unit_parts(1, w_hh) > 0) == (w_hh.nbytes >= gated_lo), (gates, hidden)
    assert _threads.unit_parts(1, np.empty((256, 256), np.float32)) == 0  # an RNN's 256 KB
    gru_without_split = np.empty((1, 1 << 22), np.float32)  # GRU reset_after=False
    assert _threads.unit_parts(2, gru_without_split, splits=False) == 0
    monkeypatch.setattr(_threads, "L2_BYTES", 256 << 10)  # a small L2: never under L2_SPLIT_MIN_BYTES
    least = _threads.L2_SPLIT_MIN_BYTES
    for nbytes, split in ((least - 4, False), (least, True)):
        assert (_threads.unit_parts(2, np.empty((1, nbytes // 4), np.float32)) > 0) == split, nbytes


def test_core_l2_bytes_reads_sysfs(tmp_path):
    for index, level, size in ((0, 1, "48K"), (2, 2, "2048K"), (3, 3, "480M")):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "size").write_text(f"{size}\n")
    assert _threads.core_l2_bytes(str(tmp_path)) == 2 << 20
    (tmp_path / "index2" / "size").write_text("1M\n")
    assert _threads.core_l2_bytes(str(tmp_path)) == 1 << 20
    assert _threads.core_l2_bytes(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize(
    ("variant", "num_layers", "bidirectional", "use_lengths", "use_hx", "bias"),
    [
        ("lstm", 1, False, False, False, True),
        ("lstm", 2, True, True, True, True),
        ("lstm-peephole", 2, True, True, True, False),
        ("lstm-peephole", 1, False, True, False, True),
    ],
)
def test_unit_split_finite_differences(
    unit_split, variant, num_layers, bidirectional, use_lengths, use_hx, bias
):
    case = Case(variant, np.float64, num_layers, bidirectional, use_lengths, use_hx, bias, steps=4, batch=3,
                hidden_size=5)  # fmt: skip
    _, _, dx, dinit = case.run()
    assert unit_split["forward"] > 0 and unit_split["backward"] > 0
    check_gradients(case, dx, dinit, np.random.default_rng(7))


def test_short_split_passes_read_the_weights_in_place():
    """Which weights a forward packs for all to share: W_ih from DIRECT_PROJECTION_ROWS + 1
    rows of input, from UPFRONT_PROJECTION_ROWS + 1 when it has UPFRONT_PROJECTION_BYTES,
    from UPFRONT_LARGE_ROWS + 1 with UPFRONT_LARGE_BYTES (fewer rows project up front); a
    split forward's W_hh from ONE_ROW_PANEL_STEPS steps or DIRECT_STEP_ROWS + 1 samples, and
    for up to SHORT_SPLIT_ROWS samples from CHUNK_PANEL_STEPS steps."""
    w_ih, w_hh = np.ones((12, 5), np.float32), np.ones((12, 3), np.float32)
    units = unit_bounds(3, 2)
    mid = np.ones((UPFRONT_PROJECTION_BYTES // 4 // 64, 64), np.float32)
    large = np.ones((UPFRONT_LARGE_BYTES // 4 // 1024, 1024), np.float32)
    for weights, most in ((w_ih, DIRECT_PROJECTION_ROWS), (mid[:-1], DIRECT_PROJECTION_ROWS),
                          (mid, UPFRONT_PROJECTION_ROWS), (large[:-1], UPFRONT_PROJECTION_ROWS),
                          (large, UPFRONT_LARGE_ROWS)):  # fmt: skip
        for rows in (1, most, most + 1):
            packed = input_panels(weights, rows).shape[0] > 0
            assert packed == (rows > most), (weights.shape, rows)
    for steps in (1, CHUNK_PANEL_STEPS - 1, CHUNK_PANEL_STEPS, ONE_ROW_PANEL_STEPS - 1, ONE_ROW_PANEL_STEPS):
        for batch in (1, DIRECT_STEP_ROWS, DIRECT_STEP_ROWS + 1, SHORT_SPLIT_ROWS, SHORT_SPLIT_ROWS + 1):
            packed = unit_recurrent_panels(w_hh, 4, units, steps, batch).shape[1] > 0
            in_place = (steps < ONE_ROW_PANEL_STEPS and batch <= DIRECT_STEP_ROWS) or (
                steps < CHUNK_PANEL_STEPS and batch <= SHORT_SPLIT_ROWS
            )
            assert packed != in_place, (steps, batch)


# Steps: short sequences of up to DIRECT_STEP_ROWS samples read W_hh in place at every step,
# and up to DIRECT_PROJECTION_ROWS rows of input read W_ih in place; longer ones pack them
# (small W_ih: larger ones project up front, see test_split_upfront_projection_matches_torch).
SPLIT_STEPS = [7, ONE_ROW_PANEL_STEPS + 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("steps", SPLIT_STEPS)
def test_unit_split_torch_parity(unit_split, dtype, batch, steps):
    case = Case("lstm", dtype, 2, True, True, True, steps=steps, batch=batch, input_size=6, hidden_size=9)
    got = case.run()
    assert unit_split["forward"] == 4 and unit_split["backward"] == 4
    assert_matches(case, got, torch_run(case), "torch parity")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    ("variant", "batch", "size"), [("lstm", 2, 128), ("gru", 1, 160), ("rnn-tanh", 1, 256)]
)
def test_split_upfront_projection_matches_torch(unit_split, one_sample_split, variant, batch, size, training):
    """A split forward of more than DIRECT_PROJECTION_ROWS rows with W_ih of
    UPFRONT_PROJECTION_BYTES or more (float64) projects its whole input first, W_ih packed a
    block at a time by each thread (common.project_packing); torch agrees in inference and in
    a training step."""
    case = Case(
        variant, np.float64, 1, False, False, True, steps=40, batch=batch, input_size=size, hidden_size=size
    )
    w_ih = np.empty((CELLS[case.cell].gates * size, size))
    assert (
        w_ih.nbytes >= UPFRONT_PROJECTION_BYTES
        and DIRECT_PROJECTION_ROWS < 40 * batch <= UPFRONT_PROJECTION_ROWS
    )
    calls = unit_split if case.cell == "lstm" else one_sample_split
    expected = torch_run(case)
    if training:
        assert_matches(case, case.run(), expected, "torch parity")
    else:
        case.layer.eval()
        out, final = case.layer(case.x, case.hx())
        assert_close(out, expected[0], np.float64, "split inference vs torch")
        for a, b in zip(case.states(final), expected[1], strict=True):
            assert_close(a, b, np.float64, "split inference vs torch")
    assert calls["forward"] == 1 and calls["backward"] == (1 if training else 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unit_split_matches_chunks_with_dropout(unit_split, monkeypatch, dtype):
    results = _split_then_chunked(monkeypatch, lambda: Case(
        "lstm-peephole", dtype, 2, True, True, True, steps=6, batch=4, hidden_size=7,
        extra={"recurrent_dropout": 0.3, "dropout": 0.2}))  # fmt: skip
    assert unit_split["forward"] == 4  # the first run only
    for a, b in zip(*results, strict=True):
        assert_close(a, b, dtype, "unit split vs chunks")


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_unit_split_inference_over_several_projection_blocks(unit_split, monkeypatch, equal_lengths):
    # Inference projects the input a block of steps at a time (512 rows: 170 steps of 3
    # samples) with a region per step (here at one thread); 600 steps take four blocks,
    # forwards and in reverse. With a thread for each part, all of it first (one region).
    layer = fastseq.LSTM(3, 5, bidirectional=True, dtype=np.float64, seed=2).eval()
    x = np.random.default_rng(3).standard_normal((600, 3, 3))
    lengths = None if equal_lengths else [600, 431, 17]
    split = _at_each_thread_count(lambda: layer(x, lengths=lengths), (numba.config.NUMBA_NUM_THREADS, 1))
    assert unit_split["forward"] == 4
    _chunked(monkeypatch)
    ref_out, (ref_h, ref_c) = layer(x, lengths=lengths)
    for out, (h, c) in split:
        for a, b in ((out, ref_out), (h, ref_h), (c, ref_c)):
            assert_close(a, b, np.float64, "unit split vs chunks, inference")


@pytest.mark.parametrize("lengths", [[600, 600, 600], [600, 431, 17]])
def test_one_region_projects_every_row_first(lengths):
    # An inference split whose input projection (R x G*H) fits ONE_REGION_PROJECTION_BYTES
    # projects all R packed rows first and runs its steps in one region (step counters
    # returned), at unequal lengths too: blocks of steps hold capacity // N steps each, so
    # over unequal lengths one block would not do.
    parts, hd, cin = 2, 5, 3
    packing = Packing(np.array(lengths, np.int64), 600, 3, 1, parts)
    rows = packing.rows
    rng = np.random.default_rng(0)
    x, w_ih = rng.standard_normal((rows, cin)), rng.standard_normal((4 * hd, cin))
    panels = input_panels(w_ih, rows)
    gates, h, rmask = np.empty((0, 4 * hd)), np.zeros((3, hd)), np.empty((0, hd))
    block, proj, s_next = unit_projection_start(x, w_ih, panels, gates, packing.lengths, parts)
    assert block.shape[0] < rows and s_next == 0  # inference projects a block at a time
    for threads, one_region in ((parts, True), (1, False)):
        layout = (packing.offsets[0], packing.lengths, False)
        proj, base, s_next, h_buf, claims = steps_region_start(
            x, w_ih, panels, *layout, block, proj, 0, parts, threads, h, rmask
        )
        assert (claims.shape[0] > 0) == one_region and (h_buf.shape[0] == 2) == one_region
        if one_region:
            assert (base, s_next) == (0, lengths[0])
            np.testing.assert_allclose(proj[:rows], x @ w_ih.T, rtol=1e-12, atol=1e-12)
        else:
            assert s_next == 0


@pytest.mark.parametrize("training", [False, True])
def test_unit_split_writes_padded_outputs(unit_split, monkeypatch, training):
    case = Case("lstm", np.float32, 2, True, True, steps=7, batch=3, hidden_size=5, seed=3)
    check_padded_outputs_written(monkeypatch, case, training)
    assert unit_split["forward"] == 8  # 2 calls x 2 layers x 2 directions


def test_unit_split_bitwise_identical_across_thread_counts(unit_split):
    results = _at_thread_counts(lambda: Case("lstm-peephole", np.float32, 2, True, True, True, steps=9, batch=4,
                                             input_size=5, hidden_size=17))  # fmt: skip
    assert unit_split["forward"] == 3 * 4
    for a, b, c in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("variant", ["lstm-peephole", "gru", "rnn-relu"])
def test_one_region_steps_taken_by_a_single_thread(monkeypatch, variant):
    # All steps of a split forward in one parallel region (kernels.sync), its iterations run
    # one after the other by a single thread (numba at one thread, the kernel told it has
    # two): the first takes its own part and, after the wait, the other's, at every step;
    # the results are bitwise those of one region on two threads and of a region per step.
    split_every_batch(monkeypatch)
    parts = numba.config.NUMBA_NUM_THREADS
    if parts < 2:
        pytest.fail("the unit-split path needs NUMBA_NUM_THREADS >= 2")

    def make_case():
        return Case(
            variant,
            np.float32,
            1,
            True,
            True,
            True,
            steps=7,
            batch=2,
            input_size=5,
            hidden_size=13,
            extra={"recurrent_dropout": 0.25},
        )

    results = _at_thread_counts(make_case, counts=(parts, 1))
    monkeypatch.setattr(_engine, "one_region_threads", lambda: parts)
    results += _at_thread_counts(make_case, counts=(1,))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_unit_split_layers_in_concurrent_python_threads(unit_split):
    cases = [
        Case("lstm", np.float64, 1, True, True, True, steps=20, batch=3, hidden_size=9, seed=i)
        for i in range(3)
    ]
    expected = [[a.copy() for a in _flat(c.run())] for c in cases]
    got = run_in_threads([lambda c=c: _flat(c.run()) for c in cases])
    for exp, res in zip(expected, got, strict=True):
        for a, b in zip(exp, res, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _flat(result):
    out, finals, dx, dinit = result
    return [out, *finals, dx, *dinit]


@pytest.mark.parametrize("steps", [1, 2])
def test_unit_split_with_more_parts_than_rows(unit_split, monkeypatch, steps):
    # On a machine with many threads a short batch has fewer packed rows than parts: the
    # row ranges of the weight gradients are then empty for some parts, whose partial sums
    # (uninitialised pool scratch) must count as zero.
    results = []
    for parts in (8, 0):
        monkeypatch.setattr(layers, "unit_parts", lambda *args, parts=parts, **kwargs: parts)
        case = Case("lstm-peephole", np.float64, 1, False, False, True, steps=steps, batch=3, hidden_size=11)
        for _ in range(2):  # the second step reuses the layer's scratch
            results.append(_step_results(case))
    assert unit_split["forward"] == 2 and unit_split["backward"] == 2
    for split_first, split_second, chunks, _ in zip(*results, strict=True):
        assert_close(split_first, chunks, np.float64, "8 parts vs chunks")
        assert_close(split_second, chunks, np.float64, "8 parts vs chunks, second step")


GRU_RNN_SPLIT_KERNELS = ("gru_forward_units", "rnn_forward_units", "gru_backward_units", "rnn_backward_units")


@pytest.fixture
def one_sample_split(monkeypatch):
    """Force the GRU/RNN split of a batch of one (any W_hh) and count its kernel calls."""
    monkeypatch.setattr(_threads, "SINGLE_SPLIT_BYTES", (0, 1 << 62))
    return _count_kernel_calls(monkeypatch, GRU_RNN_SPLIT_KERNELS)


class GruRnnSplit:
    """How a GRU/RNN split test runs: ``calls`` (kernel calls counted), ``batch`` and
    ``use_lengths`` for its cases."""

    def __init__(self, calls, batch, use_lengths):
        self.calls, self.batch, self.use_lengths = calls, batch, use_lengths

    def case(self, variant, dtype, num_layers, bidirectional, bias=True, **kwargs):
        return Case(variant, dtype, num_layers, bidirectional, self.use_lengths, True, bias, batch=self.batch,
                    **kwargs)  # fmt: skip

    @property
    def lengths(self):
        """Lengths for the 600-step test (None: all 600)."""
        return [600, 431, 17, 600, 80][: self.batch] if self.use_lengths else None


@pytest.fixture(params=["one sample", "batch"])
def gru_rnn_split(request, monkeypatch):
    """Force the GRU/RNN split: of a batch of one (any W_hh; equal lengths), or of a batch of
    4 (SHORT_SPLIT_ROWS: W_hh read in place at SPLIT_STEPS[0], packed at [1]), unequal
    lengths (the policy by the core's L2, ``_threads.L2_SPLIT_SHARES``, opened to any W_hh)."""
    if request.param == "one sample":
        return GruRnnSplit(request.getfixturevalue("one_sample_split"), 1, False)
    split_every_batch(monkeypatch)
    return GruRnnSplit(_count_kernel_calls(monkeypatch, GRU_RNN_SPLIT_KERNELS), 4, True)


GRU_RNN_VARIANTS = ["gru", "rnn-tanh", "rnn-relu"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", GRU_RNN_VARIANTS)
@pytest.mark.parametrize("steps", SPLIT_STEPS)
def test_gru_rnn_split_inference_matches_naive_and_torch(gru_rnn_split, variant, dtype, steps):
    # two layers, both directions, H odd (parts of unequal widths)
    case = gru_rnn_split.case(variant, dtype, 2, True, steps=steps, input_size=6, hidden_size=9)
    case.layer.eval()
    out, h_n = case.layer(case.x, case.hx(), lengths=case.lengths)
    assert gru_rnn_split.calls["forward"] == 4
    ref_out, ref_final, *_ = _naive(case)
    assert_close(out, ref_out, dtype, "split vs naive")
    assert_close(h_n, ref_final[0], dtype, "split vs naive")
    torch_out, torch_final, *_ = torch_run(case)
    assert_close(out, torch_out, dtype, "split vs torch")
    assert_close(h_n, torch_final[0], dtype, "split vs torch")


@pytest.mark.parametrize("variant", GRU_RNN_VARIANTS)
@pytest.mark.parametrize(("num_layers", "bidirectional", "bias"), [(1, False, True), (2, True, False)])
def test_gru_rnn_split_finite_differences(gru_rnn_split, variant, num_layers, bidirectional, bias):
    case = gru_rnn_split.case(variant, np.float64, num_layers, bidirectional, bias, steps=4, hidden_size=5)
    _, _, dx, dinit = case.run()
    assert gru_rnn_split.calls["forward"] > 0 and gru_rnn_split.calls["backward"] > 0
    check_gradients(case, dx, dinit, np.random.default_rng(7))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", GRU_RNN_VARIANTS)
@pytest.mark.parametrize("steps", SPLIT_STEPS)
def test_gru_rnn_split_training_torch_parity(gru_rnn_split, variant, dtype, steps):
    case = gru_rnn_split.case(variant, dtype, 2, True, steps=steps, input_size=6, hidden_size=9)
    got = case.run()
    assert gru_rnn_split.calls["forward"] == 4 and gru_rnn_split.calls["backward"] == 4
    assert_matches(case, got, torch_run(case), "torch parity")


@pytest.mark.parametrize("batch", [2, 16])
def test_gru_rnn_batch_split_sizes_torch_parity(monkeypatch, batch):
    # the smallest and the largest batch the policy by the core's L2 splits (on CPUs other than Zen)
    split_every_batch(monkeypatch)
    calls = _count_kernel_calls(monkeypatch, GRU_RNN_SPLIT_KERNELS)
    for variant in ("gru", "rnn-tanh"):
        case = Case(
            variant, np.float32, 1, True, True, True, steps=9, batch=batch, input_size=6, hidden_size=9
        )
        assert_matches(case, case.run(), torch_run(case), "torch parity")
    assert calls["forward"] == 4 and calls["backward"] == 4


@pytest.mark.parametrize("variant", GRU_RNN_VARIANTS)
def test_gru_rnn_split_matches_chunks_with_dropout(gru_rnn_split, monkeypatch, variant):
    results = _split_then_chunked(monkeypatch, lambda: gru_rnn_split.case(
        variant, np.float64, 2, True, steps=6, hidden_size=7,
        extra={"recurrent_dropout": 0.3, "dropout": 0.2}))  # fmt: skip
    assert gru_rnn_split.calls["forward"] == 4 and gru_rnn_split.calls["backward"] == 4  # the first run only
    for a, b in zip(*results, strict=True):
        assert_close(a, b, np.float64, "split vs chunks")


@pytest.mark.parametrize("variant", ["gru", "rnn-tanh"])
def test_gru_rnn_split_over_several_projection_blocks(gru_rnn_split, monkeypatch, variant):
    # 600 steps: inference projects the input a block of 512 rows at a time with a region
    # per step (here at one thread), forwards and in reverse (over unequal lengths too); with
    # a thread for each part, all of it first (one region)
    layer = make_layer(variant, 3, 5, bidirectional=True, dtype=np.float64, seed=2).eval()
    x = np.random.default_rng(3).standard_normal((600, gru_rnn_split.batch, 3))
    split = _at_each_thread_count(
        lambda: layer(x, lengths=gru_rnn_split.lengths), (numba.config.NUMBA_NUM_THREADS, 1)
    )
    assert gru_rnn_split.calls["forward"] == 4
    _chunked(monkeypatch)
    ref_out, ref_h = layer(x, lengths=gru_rnn_split.lengths)
    for out, h in split:
        assert_close(out, ref_out, np.float64, "split vs chunks")
        assert_close(h, ref_h, np.float64, "split vs chunks")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("variant", GRU_RNN_VARIANTS)
def test_gru_rnn_split_writes_padded_outputs(gru_rnn_split, monkeypatch, variant, training):
    case = Case(variant, np.float32, 2, True, True, steps=7, batch=gru_rnn_split.batch, hidden_size=5, seed=3)
    if gru_rnn_split.batch == 1:
        case.lengths[:] = 4
    check_padded_outputs_written(monkeypatch, case, training)
    assert gru_rnn_split.calls["forward"] == 8


def test_gru_rnn_split_bitwise_identical_across_thread_counts(gru_rnn_split):
    results = _at_thread_counts(
        lambda: gru_rnn_split.case("gru", np.float32, 2, True, steps=9, input_size=5, hidden_size=17)
    )
    assert gru_rnn_split.calls["forward"] == 3 * 4
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_gru_rnn_split_not_for_gru_reset_before(gru_rnn_split):
    layer = make_layer("gru-reset-before", 3, 5, dtype=np.float64, seed=2)
    out, _ = layer(np.zeros((4, gru_rnn_split.batch, 3)))
    layer.backward(np.ones_like(out))
    assert gru_rnn_split.calls["forward"] == gru_rnn_split.calls["backward"] == 0
