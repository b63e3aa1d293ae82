"""Data-parallel training job for tests/test_distributed.py.

``train(cell)`` trains a small language model with truncated BPTT, Adam and gradient
clipping on one global batch. Under ``mpiexec -n K python tests/mpi_job.py CELL OUT`` every
rank takes its shard of the batch and gradients are averaged over MPI; rank 0 writes the
final parameters to OUT.npz and a checkpoint to OUT-ckpt.* .
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastseq  # noqa: E402
from fastseq import nn  # noqa: E402

LAYERS = {"rnn": fastseq.RNN, "lstm": fastseq.LSTM, "gru": fastseq.GRU}
VOCAB, STEPS, BATCH = 9, 12, 8


def train(cell, parallel=None, epochs=2, window=4):
    """Returns the model after ``epochs`` passes over a fixed (STEPS, BATCH) token batch."""
    model = nn.Sequential(
        nn.Embedding(VOCAB, 4, dtype=np.float64, seed=1),
        LAYERS[cell](4, 6, num_layers=2, dtype=np.float64, seed=2),
        nn.Linear(6, VOCAB, dtype=np.float64, seed=3),
    )
    if parallel is not None:
        parallel = parallel(model)
    data = np.random.default_rng(0).integers(0, VOCAB, size=(STEPS + 1, BATCH))
    columns = np.arange(BATCH) if parallel is None else parallel.shard(np.arange(BATCH))
    data = data[:, columns]
    opt = nn.Adam(model, lr=0.05)
    ce = nn.CrossEntropyLoss()
    for _ in range(epochs):
        state = None
        for a, b in nn.truncated_bptt(STEPS, window):
            opt.zero_grad()
            ce(model(data[a:b], state=state), data[a + 1 : b + 1])
            model.backward(ce.backward())
            if parallel is not None:
                parallel.allreduce_gradients()
            nn.clip_grad_norm(model, 0.5)  # on the averaged gradient
            opt.step()
            state = model.final_states
    return model, parallel


def main(cell, out):
    from fastseq.distributed import DataParallel

    model, dp = train(cell, DataParallel)
    divergence = dp.max_divergence()
    dp.save(f"{out}-ckpt", metadata={"ranks": dp.size})
    if dp.is_root:
        np.savez(f"{out}.npz", flat=model.flat_params)
        Path(f"{out}.json").write_text(json.dumps({"ranks": dp.size, "divergence": divergence}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
