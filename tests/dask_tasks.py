"""Task functions for the Dask tests (shipped to the workers by value)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import fastseq
from fastseq import nn


def train_task(config):
    """Train a tiny GRU regressor; ``config``: hidden, lr, and optionally ``fail``:
    "raise" (an exception every time) or a marker path: the worker process dies the first
    time (the marker does not exist yet), and the task succeeds when rescheduled."""
    fail = config.get("fail")
    if fail == "raise":
        raise ValueError(f"bad configuration {config}")
    if fail and not Path(fail).exists():
        Path(fail).write_text("died once")
        os._exit(1)  # the worker process dies mid-sweep
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 16, 2))
    y = x.sum(axis=(0, 2))[:, None] / 5
    model = nn.Sequential(
        fastseq.GRU(2, config["hidden"], dtype=np.float64, seed=1),
        nn.LastStep(),
        nn.Linear(config["hidden"], 1, dtype=np.float64, seed=2),
    )
    opt, mse = nn.Adam(model, lr=config["lr"]), nn.MSELoss()
    for _ in range(20):
        opt.zero_grad()
        loss = mse(model(x), y)
        model.backward(mse.backward())
        opt.step()
    return {"loss": loss, "pid": os.getpid()}
