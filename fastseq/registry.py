"""The one table of recurrent cells: layers, cells, the CLI and the benchmarks read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellSpec:
    """What the rest of fastseq needs to know about one cell type.

    Attributes
    ----------
    name : str
        Registry key, also the CLI's ``--cell`` choice.
    gates : int
        Gate blocks stacked in the weight matrices (G): RNN 1, GRU 3, LSTM 4.
    gate_names : tuple of str
        Gate order in the stacked weights (torch's).
    n_states : int
        Recurrent state arrays: 1 (h) or 2 (h, c).
    torch_layer, torch_cell : str
        Names of the equivalent ``torch.nn`` classes.
    """

    name: str
    gates: int
    gate_names: tuple[str, ...]
    n_states: int
    torch_layer: str
    torch_cell: str


CELLS: dict[str, CellSpec] = {
    "rnn": CellSpec("rnn", 1, ("h",), 1, "RNN", "RNNCell"),
    "lstm": CellSpec("lstm", 4, ("i", "f", "g", "o"), 2, "LSTM", "LSTMCell"),
    "gru": CellSpec("gru", 3, ("r", "z", "n"), 1, "GRU", "GRUCell"),
}


def gemm_flops(cell: str, batch: int, steps: int, input_size: int, hidden_size: int) -> float:
    """GEMM floating-point operations of one forward pass of one layer and direction.

    ``2 * N * T * G * H * (C + H)``; a training step (forward + backward) counts three times
    this. Elementwise gate math is not counted.
    """
    g = CELLS[cell].gates
    return 2.0 * batch * steps * g * hidden_size * (input_size + hidden_size)
