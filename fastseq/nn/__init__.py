"""Training building blocks around the recurrent layers: modules, losses, optimisers,
containers with checkpoints, and sequence patterns.

Everything follows torch's definitions (names, shapes, update rules) and has forward and
backward passes; see tests/test_nn.py and tests/test_training.py for the checks against torch.
"""

from fastseq.nn.container import Seq2Seq, Sequential, load, save
from fastseq.nn.losses import CrossEntropyLoss, MSELoss
from fastseq.nn.modules import Dropout, Embedding, Linear
from fastseq.nn.optim import SGD, Adam, AdamW, CosineAnnealingLR, StepLR, clip_grad_norm, clip_grad_value
from fastseq.nn.sequence import (
    LastStep,
    generate,
    layer_cells,
    length_mask,
    reset_states,
    sliding_windows,
    truncated_bptt,
)

__all__ = [
    "SGD", "Adam", "AdamW", "CosineAnnealingLR", "CrossEntropyLoss", "Dropout", "Embedding", "LastStep",
    "Linear", "MSELoss", "Seq2Seq", "Sequential", "StepLR", "clip_grad_norm", "clip_grad_value", "generate",
    "layer_cells", "length_mask", "load", "reset_states", "save", "sliding_windows", "truncated_bptt",
]  # fmt: skip
