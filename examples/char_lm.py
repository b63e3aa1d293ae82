"""Character-level language model on the text of Python's own documentation topics.

The data is ``pydoc_data.topics`` from the standard library (about 465,000 characters), the
last 10% held out. Training is stateful truncated BPTT: the training text is cut into
``--batch`` parallel streams, processed ``--bptt`` characters at a time, each window starting
from the previous window's final states (no gradient flows across windows). Reports the
held-out bits per character and prints samples generated through the cell path.

    python examples/char_lm.py                 # default run: about 9 minutes on 2 cores
    python examples/char_lm.py --minutes 1 --plot loss.png
    mpiexec -n 2 python examples/char_lm.py --mpi   # data parallel: each rank takes half the streams
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Progress, Timer, pyplot  # noqa: E402

import fastseq  # noqa: E402
from fastseq import nn  # noqa: E402


def load_text(chars):
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[:chars] if chars else text


def streams(ids, batch):
    """(L,) -> (L // batch, batch): column n is the n-th contiguous stretch of the text."""
    steps = len(ids) // batch
    return np.ascontiguousarray(ids[: steps * batch].reshape(batch, steps).T)


def evaluate(model, data, bptt):
    """Mean cross-entropy (nats per character) over ``data`` (T, N), carrying the states."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    total, count, state = 0.0, 0, None
    for a, b in nn.truncated_bptt(data.shape[0] - 1, bptt):
        logits = model(data[a:b], state=state)
        state = model.final_states
        n = (b - a) * data.shape[1]
        total += loss_fn(logits, data[a + 1 : b + 1]) * n
        count += n
    model.train()
    return total / count


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cell", type=click.Choice(["lstm", "gru"]), default="lstm", show_default=True)
@click.option("--hidden", default=512, show_default=True, help="Hidden units.")
@click.option("--embedding", default=64, show_default=True, help="Character embedding size.")
@click.option("--batch", default=64, show_default=True, help="Parallel text streams.")
@click.option("--bptt", default=100, show_default=True, help="Truncated BPTT window (characters).")
@click.option("--lr", default=2e-3, show_default=True, help="Adam learning rate (halved on a plateau).")
@click.option("--clip", default=1.0, show_default=True, help="Gradient norm clipping.")
@click.option("--dropout", default=0.1, show_default=True, help="Dropout before the output layer.")
@click.option("--minutes", default=9.0, show_default=True, help="Training time budget.")
@click.option("--epochs", default=100, show_default=True, help="At most this many passes over the text.")
@click.option("--chars", default=0, show_default=True, help="Use only the first N characters (0: all).")
@click.option("--seed", default=0, show_default=True)
@click.option("--sample-length", default=400, show_default=True, help="Characters per printed sample.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the loss curves to this PNG file.")
@click.option(
    "--mpi", is_flag=True, help="Data-parallel over MPI ranks (run under mpiexec; needs fastseq[mpi])."
)
def main(
    cell,
    hidden,
    embedding,
    batch,
    bptt,
    lr,
    clip,
    dropout,
    minutes,
    epochs,
    chars,
    seed,
    sample_length,
    plot,
    mpi,
):
    """Train a character-level LSTM/GRU language model on pydoc_data.topics."""
    timer = Timer()
    echo = click.echo
    text = load_text(chars)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    split = int(len(ids) * 0.9)
    train, valid = streams(ids[:split], batch), streams(ids[split:], 8)
    echo(
        f"text: {len(text):,} characters, vocabulary {len(vocab)}; train {split:,}, validation {len(ids) - split:,}"
    )

    layer = {"lstm": fastseq.LSTM, "gru": fastseq.GRU}[cell]
    model = nn.Sequential(
        nn.Embedding(len(vocab), embedding, seed=seed),
        layer(embedding, hidden, seed=seed + 1),
        nn.Dropout(dropout, seed=seed + 2),
        nn.Linear(hidden, len(vocab), seed=seed + 3),
    )
    parallel = None
    if mpi:
        from fastseq.distributed import DataParallel

        parallel = DataParallel(model)  # rank 0's initial weights everywhere, 1 thread per rank
        train = np.ascontiguousarray(train[:, parallel.shard(np.arange(batch))])
        if not parallel.is_root:
            echo = lambda *a, **k: None  # noqa: E731 - only rank 0 reports
        echo(f"MPI: {parallel.size} rank(s), {train.shape[1]} streams each")
    opt = nn.Adam(model, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    windows = nn.truncated_bptt(train.shape[0] - 1, bptt)
    budget = minutes * 60
    history, best, epoch = {"train": [], "valid": []}, math.inf, 0
    step_seconds, out_of_time = 0.0, False
    while epoch < epochs and not out_of_time:
        epoch += 1
        state, losses = None, []
        with Progress(
            len(windows), f"epoch {epoch}", hidden=parallel is not None and not parallel.is_root
        ) as bar:
            for a, b in windows:
                start = Timer()
                opt.zero_grad()
                loss = loss_fn(model(train[a:b], state=state), train[a + 1 : b + 1])
                model.backward(loss_fn.backward())
                if parallel is not None:
                    parallel.allreduce_gradients()  # average over ranks, then clip
                nn.clip_grad_norm(model, clip)
                opt.step()
                step_seconds += start()
                state = model.final_states  # carried into the next window, no gradient
                losses.append(loss)
                bar.update(loss)
                out_of_time = timer() >= budget
                if parallel is not None:  # every rank stops at the same step
                    out_of_time = parallel.comm.bcast(out_of_time, root=0)
                if out_of_time:
                    break
        valid_loss = evaluate(model, valid, 500)
        history["train"].append(float(np.mean(losses)) / math.log(2))
        history["valid"].append(valid_loss / math.log(2))
        if valid_loss > best:
            opt.lr /= 2
        best = min(best, valid_loss)
        echo(
            f"epoch {epoch}: train {history['train'][-1]:.3f} bits/char, validation "
            f"{history['valid'][-1]:.3f} bits/char, lr {opt.lr:.2g}, {timer():.0f} s"
        )

    final = evaluate(model, valid, 500) / math.log(2)
    echo(f"validation bits/char: {final:.3f} after {epoch} epoch(s), {timer():.0f} s")
    echo(f"time in training steps: {step_seconds:.1f} s")
    if parallel is not None:
        echo(f"MPI: allreduce {parallel.allreduce_seconds:.2f} s = "
             f"{parallel.allreduce_seconds / step_seconds:.1%} of the training steps on rank 0")  # fmt: skip
    for k, temperature in enumerate((0.5, 0.8)):
        prime = np.array([index[c] for c in "The "], dtype=np.int64)
        out = nn.generate(model, prime, sample_length, temperature=temperature, top_k=20, seed=seed + k)
        echo(f"--- sample, temperature {temperature} ---\nThe {''.join(vocab[i] for i in out)}")
    if plot and (parallel is None or parallel.is_root):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, epoch + 1), history["train"], label="train")
        ax.plot(range(1, epoch + 1), history["valid"], label="validation")
        ax.set(xlabel="epoch", ylabel="bits per character", title=f"char LM ({cell}, H={hidden})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=80)
        echo(f"plot written to {plot}")


if __name__ == "__main__":
    main()
