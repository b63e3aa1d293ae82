"""Helpers shared by the examples: a progress bar that shows the loss, and an optional plot."""

from __future__ import annotations

import time

import click
import numpy as np

from fastseq import nn


class Progress:
    """A click progress bar on stderr whose label shows the latest loss."""

    def __init__(self, length, label, hidden=False):
        self.loss = float("nan")
        self._bar = click.progressbar(
            hidden=hidden,
            length=length,
            label=label,
            file=click.get_text_stream("stderr"),
            item_show_func=lambda _: f"loss {self.loss:.4f}",
            show_eta=True,
        )

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        result = self._bar.__exit__(*exc)
        if not self._bar.hidden and not click.get_text_stream("stderr").isatty():
            # click draws no bar without a terminal: leave one line with the loss in logs
            click.echo(
                f"{self._bar.label}: {self._bar.pos}/{self._bar.length} done, loss {self.loss:.4f}", err=True
            )
        return result

    def update(self, loss, steps=1):
        self.loss = loss
        self._bar.update(steps, current_item=loss)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (pip install 'fastseq[examples]')."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise click.ClickException("--plot needs matplotlib: pip install 'fastseq[examples]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Timer:
    """Seconds since creation."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


def fit(model, loss_fn, batch_loss, samples, epochs, batch, lr, rng, clip=None):
    """Shuffled minibatch epochs with Adam and a cosine learning-rate schedule.

    ``batch_loss(idx)`` runs the forward on the samples ``idx`` and returns ``loss_fn``'s loss
    (whose backward gives the output gradient); ``clip``: gradient-norm clipping. Returns the
    mean loss of each epoch.
    """
    opt = nn.Adam(model, lr=lr)
    sched = nn.CosineAnnealingLR(opt, epochs)
    curve = []
    with Progress(epochs, "training") as bar:
        for _ in range(epochs):
            order = rng.permutation(samples)
            losses = []
            for k in range(0, samples, batch):
                opt.zero_grad()
                losses.append(batch_loss(order[k : k + batch]))
                model.backward(loss_fn.backward())
                if clip is not None:
                    nn.clip_grad_norm(model, clip)
                opt.step()
            sched.step()
            curve.append(float(np.mean(losses)))
            bar.update(curve[-1])
    return curve
