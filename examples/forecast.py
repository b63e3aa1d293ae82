"""Forecast the Mauna Loa CO2 series (statsmodels' ``co2``, weekly, 1958-2001) with an LSTM.

Sliding windows of ``--window`` weeks predict the next ``--horizon`` weeks at once. The last
20% of the series is the test period. Reports test RMSE and MAE of the model against two
baselines: naive (the last observed value, repeated) and seasonal naive (the value one year,
52 weeks, before each target).

    python examples/forecast.py
    python examples/forecast.py --plot forecast.png
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

SEASON = 52


def load_series():
    import statsmodels.api as sm

    data = sm.datasets.co2.load_pandas().data["co2"]
    return data.interpolate().to_numpy(dtype=np.float64), data.index  # 59 missing weeks filled


def scores(pred, truth):
    err = pred - truth
    return float(np.sqrt(np.mean(err**2))), float(np.mean(np.abs(err)))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--window", default=104, show_default=True, help="Weeks of history per sample.")
@click.option("--horizon", default=26, show_default=True, help="Weeks predicted at once.")
@click.option("--hidden", default=64, show_default=True)
@click.option("--epochs", default=150, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", default=0, show_default=True, help="Use only the last N weeks (0: all).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write forecast vs truth to this PNG file.")
def main(window, horizon, hidden, epochs, batch, lr, seed, limit, plot):
    """Train an LSTM forecaster on statsmodels' co2 series and compare it with baselines."""
    timer = Timer()
    series, dates = load_series()
    if limit:
        series, dates = series[-limit:], dates[-limit:]
    split = int(len(series) * 0.8)
    if split < window + horizon or len(series) - split < horizon:
        raise click.BadParameter("series too short for this window and horizon", param_hint="--limit")
    # Model the series relative to each window's last value, scaled by the training spread.
    train_part = series[:split]
    scale = float(np.std(np.diff(train_part))) * np.sqrt(horizon)
    x_train, y_train = nn.sliding_windows(train_part, window, horizon)  # (M, window, 1) views
    # Test targets lie in the test period; their windows may reach back into training.
    first = split - window
    x_test, y_test = nn.sliding_windows(series[first:], window, horizon)

    def prepare(x, y=None):
        last = x[:, -1:, :]
        inputs = np.ascontiguousarray((x - last) / scale, dtype=np.float32)
        target = None if y is None else ((y - last) / scale)[:, :, 0].astype(np.float32)
        return inputs, target, last[:, 0, 0]

    xin, yin, _ = prepare(x_train, y_train)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        fastseq.LSTM(1, hidden, batch_first=True, seed=seed),
        nn.LastStep(batch_first=True),
        nn.Linear(hidden, horizon, seed=seed + 1),
    )
    loss_fn = nn.MSELoss()

    def batch_loss(idx):
        return loss_fn(model(xin[idx]), yin[idx])

    curve = fit(model, loss_fn, batch_loss, len(xin), epochs, batch, lr, rng, clip=1.0)

    model.eval()
    xt, _, last = prepare(x_test)
    pred = model(xt) * scale + last[:, None]
    truth = y_test[:, :, 0]
    naive = np.repeat(last[:, None], horizon, axis=1)
    target_index = first + window + np.arange(len(truth))[:, None] + np.arange(horizon)[None, :]
    seasonal = series[target_index - SEASON]
    click.echo(
        f"co2: {len(series)} weeks, train {split} ({dates[0]:%Y-%m} to {dates[split - 1]:%Y-%m}), "
        f"test {len(series) - split} weeks; {len(truth)} test forecasts of {horizon} weeks"
    )
    click.echo(f"{'method':<16}{'RMSE':>8}{'MAE':>8}   (ppm, over all test forecasts and horizons)")
    results = {}
    for name, p in (("LSTM", pred), ("naive", naive), ("seasonal naive", seasonal)):
        results[name] = scores(p, truth)
        click.echo(f"{name:<16}{results[name][0]:>8.3f}{results[name][1]:>8.3f}")
    beats = all(results["LSTM"][k] < min(results["naive"][k], results["seasonal naive"][k]) for k in (0, 1))
    click.echo(f"LSTM beats both baselines: {'yes' if beats else 'no'} ({timer():.0f} s)")
    if plot:
        plt = pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        step = max(1, horizon)
        test_dates = dates[split:]
        ax.plot(test_dates, series[split:], color="black", lw=1, label="truth")
        for k in range(0, len(pred), step):
            t = dates[first + window + k : first + window + k + horizon]
            ax.plot(t, pred[k], color="tab:red", lw=1, label="LSTM" if k == 0 else None)
        ax.set(title=f"co2 test period, {horizon}-week forecasts", ylabel="ppm")
        ax.legend()
        ax2.plot(curve)
        ax2.set(title="training loss", xlabel="epoch", ylabel="MSE (scaled)", yscale="log")
        fig.tight_layout()
        fig.savefig(plot, dpi=80)
        click.echo(f"plot written to {plot}")


if __name__ == "__main__":
    main()
