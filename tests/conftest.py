import numpy as np
import pytest

import fastseq
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


def pytest_terminal_summary(terminalreporter):
    if tolerances.MAX_SEEN:
        terminalreporter.section("largest relative errors seen")
        for kind, err in sorted(tolerances.MAX_SEEN.items()):
            terminalreporter.write_line(f"{kind}: {err:.3g}")
