"""fastseq: RNN, LSTM and GRU layers for the CPU, forward and backward, in Numba.

Importing fastseq compiles nothing; kernels compile on first use and are cached on disk.
"""

from fastseq.cells import GRUCell, LSTMCell, RNNCell, Stream
from fastseq.layers import GRU, LSTM, RNN

__version__ = "0.1.0"

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "Stream", "__version__"]
