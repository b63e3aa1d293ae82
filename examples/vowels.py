"""Speaker classification on JapaneseVowels (shipped by sktime): variable-length sequences.

640 utterances of /ae/ by 9 speakers, 12 LPC cepstrum coefficients per frame, 7 to 29 frames
each; the standard split is 270 training and 370 test utterances. The sequences go in as one
zero-padded batch plus ``lengths``: the bidirectional GRU runs each sequence only over its
valid frames and :class:`fastseq.nn.LastStep` takes each direction's last valid output, so
there is no padding logic here. Reports test accuracy.

    python examples/vowels.py
    python examples/vowels.py --plot confusion.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Timer, fit, pyplot  # noqa: E402

import fastseq  # noqa: E402
from fastseq import nn  # noqa: E402


def load(split):
    """(T_max, N, 12) zero-padded float32 batch, lengths (N,), labels 0..8 (N,)."""
    from sktime.datasets import load_japanese_vowels

    frame, labels = load_japanese_vowels(split=split, return_X_y=True)
    series = [np.stack([frame.iloc[n, c].to_numpy() for c in range(frame.shape[1])], axis=1)
              for n in range(frame.shape[0])]  # fmt: skip
    lengths = np.array([len(s) for s in series])
    x = np.zeros((lengths.max(), len(series), frame.shape[1]), np.float32)
    for n, s in enumerate(series):
        x[: len(s), n] = s
    return x, lengths, np.asarray(labels).astype(np.int64) - 1


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cell", type=click.Choice(["gru", "lstm"]), default="gru", show_default=True)
@click.option("--hidden", default=64, show_default=True)
@click.option("--epochs", default=60, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--limit", default=0, show_default=True, help="Use only the first N training utterances (0: all)."
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write the test confusion matrix to this PNG file."
)
def main(cell, hidden, epochs, batch, lr, seed, limit, plot):
    """Train a bidirectional GRU/LSTM speaker classifier on JapaneseVowels."""
    timer = Timer()
    x_train, len_train, y_train = load("train")
    x_test, len_test, y_test = load("test")
    if limit:
        x_train, len_train, y_train = x_train[:, :limit], len_train[:limit], y_train[:limit]
    mean = x_train.sum(axis=(0, 1)) / len_train.sum()  # padding is zero: sum over valid frames
    valid = nn.length_mask(len_train, x_train.shape[0])[:, :, None]
    std = np.sqrt((((x_train - mean) * valid) ** 2).sum(axis=(0, 1)) / len_train.sum())

    def normalise(x, lengths):
        return ((x - mean) / std * nn.length_mask(lengths, x.shape[0])[:, :, None]).astype(np.float32)

    x_train, x_test = normalise(x_train, len_train), normalise(x_test, len_test)
    classes = 9
    layer = {"gru": fastseq.GRU, "lstm": fastseq.LSTM}[cell]
    model = nn.Sequential(
        layer(x_train.shape[2], hidden, bidirectional=True, seed=seed),
        nn.LastStep(bidirectional=True),
        nn.Dropout(0.2, seed=seed + 1),
        nn.Linear(2 * hidden, classes, seed=seed + 2),
    )
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(idx):
        steps = len_train[idx].max()  # the padded batch is as long as its longest sample
        return loss_fn(model(x_train[:steps, idx], lengths=len_train[idx]), y_train[idx])

    fit(model, loss_fn, batch_loss, len(y_train), epochs, batch, lr, np.random.default_rng(seed))

    model.eval()
    predicted = np.argmax(model(x_test, lengths=len_test), axis=1)
    accuracy = float(np.mean(predicted == y_test))
    click.echo(
        f"JapaneseVowels: {len(y_train)} training, {len(y_test)} test utterances, "
        f"{len_test.min()}-{max(len_train.max(), len_test.max())} frames"
    )
    click.echo(
        f"test accuracy: {accuracy:.4f} ({int(np.sum(predicted == y_test))}/{len(y_test)}), {timer():.0f} s"
    )
    if plot:
        confusion = np.zeros((classes, classes), int)
        np.add.at(confusion, (y_test, predicted), 1)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.imshow(confusion, cmap="Blues")
        for i in range(classes):
            for j in range(classes):
                if confusion[i, j]:
                    ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=8)
        ticks = range(classes)
        ax.set(
            xticks=ticks, yticks=ticks, xticklabels=[k + 1 for k in ticks], yticklabels=[k + 1 for k in ticks]
        )
        ax.set(xlabel="predicted speaker", ylabel="true speaker", title=f"test accuracy {accuracy:.1%}")
        fig.tight_layout()
        fig.savefig(plot, dpi=80)
        click.echo(f"plot written to {plot}")


if __name__ == "__main__":
    main()
