import numpy as np
import pytest

import fastseq
from tests import background as background_jobs
from tests import tolerances

#: Every cell and variant: (cell, layer class, constructor options).
VARIANTS = {
    "rnn-tanh": ("rnn", {"nonlinearity": "tanh"}),
    "rnn-relu": ("rnn", {"nonlinearity": "relu"}),
    "lstm": ("lstm", {}),
    "lstm-peephole": ("lstm", {"peephole": True}),
    "gru": ("gru", {}),
    "gru-reset-before": ("gru", {"reset_after": False}),
}
TORCH_VARIANTS = ["rnn-tanh", "rnn-relu", "lstm", "gru"]
LAYER_CLASSES = {"rnn": fastseq.RNN, "lstm": fastseq.LSTM, "gru": fastseq.GRU}
CELL_CLASSES = {"rnn": fastseq.RNNCell, "lstm": fastseq.LSTMCell, "gru": fastseq.GRUCell}


def make_layer(variant, input_size, hidden_size, **kwargs):
    cell, opts = VARIANTS[variant]
    return LAYER_CLASSES[cell](input_size, hidden_size, **opts, **kwargs)


def make_cell(variant, input_size, hidden_size, **kwargs):
    cell, opts = VARIANTS[variant]
    return CELL_CLASSES[cell](input_size, hidden_size, **opts, **kwargs)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def columns_everywhere(monkeypatch):
    """Every LSTM and RNN pass the transposed layout supports runs in it
    (``_engine.runs_in_columns``), whatever the batch and hidden size; returns the lists
    the layout's forward and backward kernels append their calls' training flag to."""
    from fastseq import _engine

    monkeypatch.setattr(_engine, "COLUMNS_MIN_SAMPLES", 0)
    monkeypatch.setattr(_engine, "COLUMNS_TRAIN_MIN_SAMPLES", {"lstm": 0, "rnn": 0})
    monkeypatch.setattr(_engine, "COLUMNS_TRAIN_SAMPLES_PER_UNIT", 0)
    for name in ("COLUMNS_MAX_HIDDEN", "COLUMNS_UNEQUAL_MAX_HIDDEN", "COLUMNS_TRAIN_MAX_HIDDEN"):
        monkeypatch.setattr(_engine, name, {"lstm": 64, "rnn": 64})
    forwards, backwards = [], []
    forward, backward = _engine.forward_columns, _engine.backward_columns
    monkeypatch.setattr(_engine, "forward_columns", lambda *a: forwards.append(a[-4].size > 0) or forward(*a))
    monkeypatch.setattr(_engine, "backward_columns", lambda *a: backwards.append(True) or backward(*a))
    return forwards, backwards


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "background(command=...): run command's subprocess from the session's start (tests/background.py)",
    )
    config.addinivalue_line(
        "markers",
        "after_compiles: run after the other tests (its subprocesses load the kernels they compiled)",
    )


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start only selected tests' jobs
def pytest_collection_modifyitems(config, items):
    """Start the background tests' subprocesses; run the tests marked after_compiles after
    the others, and the background tests last (they wait)."""
    waiting = [item for item in items if item.get_closest_marker("background") is not None]
    for item in waiting if not config.option.collectonly else ():
        background_jobs.start(item.nodeid, item.get_closest_marker("background").kwargs["command"])
    late = [item for item in items if item.get_closest_marker("after_compiles") is not None]
    items[:] = [item for item in items if item not in waiting and item not in late] + late + waiting


def pytest_sessionfinish(session):
    background_jobs.stop_all()


@pytest.fixture
def background(request):
    """(subprocess.CompletedProcess or None, workdir) of the test's background marker."""
    return background_jobs.result(request.node.nodeid)


def pytest_terminal_summary(terminalreporter):
    if tolerances.MAX_SEEN:
        terminalreporter.section("largest relative errors seen")
        for kind, err in sorted(tolerances.MAX_SEEN.items()):
            terminalreporter.write_line(f"{kind}: {err:.3g}")
