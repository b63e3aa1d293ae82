"""Training building blocks around the recurrent layers: modules, losses, optimisers.

Everything follows torch's definitions (names, shapes, update rules) and has forward and
backward passes; see tests/test_nn.py for the parity checks against torch.
"""

from fastseq.nn.losses import CrossEntropyLoss, MSELoss
from fastseq.nn.modules import Dropout, Embedding, Linear
from fastseq.nn.optim import SGD, Adam, AdamW, CosineAnnealingLR, StepLR, clip_grad_norm, clip_grad_value

__all__ = [
    "SGD", "Adam", "AdamW", "CosineAnnealingLR", "CrossEntropyLoss", "Dropout", "Embedding", "Linear",
    "MSELoss", "StepLR", "clip_grad_norm", "clip_grad_value",
]  # fmt: skip
