"""The ``fastseq`` command: ``bench``, ``info``, ``warmup``."""

from __future__ import annotations

import datetime
import functools
import json
import time

import click

from fastseq.registry import CELLS

MODES = ("forward", "train", "stream")


@click.group()
@click.version_option(package_name="fastseq", prog_name="fastseq")
def main():
    """fastseq: fast RNN, LSTM and GRU on the CPU. Start with `fastseq bench`."""


def _threads_option(ctx, param, value):
    if value is None:
        return None
    import numba

    if value > numba.config.NUMBA_NUM_THREADS:
        raise click.BadParameter(
            f"{value} is more than the {numba.config.NUMBA_NUM_THREADS} threads numba started with "
            "(set NUMBA_NUM_THREADS to raise that)"
        )
    return value


@main.command()
@click.option(
    "--cell", "cells", multiple=True, type=click.Choice(list(CELLS)), help="Cell type (repeatable)."
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(MODES),
    help="forward (eval), train (forward + backward) or stream (one Cell call per step); repeatable.",
)
@click.option(
    "-N", "--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Batch size (repeatable)."
)
@click.option(
    "-T",
    "--seq-len",
    "steps",
    multiple=True,
    type=click.IntRange(min=1),
    help="Sequence length (repeatable).",
)
@click.option(
    "--input-size",
    "inputs",
    multiple=True,
    type=click.IntRange(min=1),
    help="Input features C (repeatable; default: equal to the hidden size).",
)
@click.option(
    "--hidden-size", "hiddens", multiple=True, type=click.IntRange(min=1), help="Hidden size H (repeatable)."
)
@click.option("--layers", default=1, show_default=True, type=click.IntRange(min=1), help="Stacked layers.")
@click.option("--bidirectional", is_flag=True, help="Two directions.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option(
    "--lengths",
    default="full",
    show_default=True,
    type=click.Choice(["full", "random"]),
    help="random: per-sample lengths uniform in [1, T] (one sample at T).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    callback=_threads_option,
    help="Numba and BLAS threads (and torch's, when compared). Default: as configured.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    help="Timed runs per case [default: at least 7 and at least 0.2 s of timing; --quick: 3 and 0.05 s].",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed runs per case [default: 2, --quick 1].")
@click.option(
    "--compare",
    multiple=True,
    type=click.Choice(["torch", "onnxruntime", "jax", "numpy"]),
    help="Also time a peer with the same weights (repeatable: several peers in turn, ratio to "
    "the fastest; onnxruntime: inference only).",
)
@click.option(
    "--format",
    "fmt",
    default="table",
    show_default=True,
    type=click.Choice(["table", "json", "csv", "markdown"]),
)
@click.option(
    "--output", type=click.Path(dir_okay=False, writable=True), help="Write the report to this file."
)
@click.option("--quick", is_flag=True, help="Fewer repetitions (a fast smoke run).")
@click.option(
    "--preset",
    type=click.Choice(["default", "targets"]),
    default="default",
    show_default=True,
    help="Case list when no shape options are given: the default grid, or the speed targets "
    "(N,T,C=H = 32,100,64 / 64,100,256 / 64,50,1024 / 2-layer bidirectional 64,100,256; stream N=1, H=128).",
)
def bench(cells, modes, batches, steps, inputs, hiddens, layers, bidirectional, dtype, lengths, threads,
          repeat, warmup, compare, fmt, output, quick, preset):  # fmt: skip
    """Measure throughput of forward, training and streaming steps.

    With no shape options, runs the default grid: the three cells at a small
    (N=32, T=100, C=H=64) and a medium (N=64, T=100, C=H=256) shape, forward and
    training steps, and streaming steps at N=1.
    """
    from fastseq.bench import harness, machine, peers, report

    compare = tuple(dict.fromkeys(compare))  # each peer once, in the order given
    for name in compare:
        try:
            peers.require(name)
        except peers.PeerUnavailable as err:
            raise click.UsageError(str(err)) from None
    min_time = 0.0 if repeat else (0.05 if quick else 0.2)
    repeat = repeat or (3 if quick else 7)
    warmup = (1 if quick else 2) if warmup is None else warmup
    options = {"layers": layers, "bidirectional": bidirectional, "dtype": dtype, "lengths": lengths}
    shape_options = batches or steps or inputs or hiddens
    if preset == "targets":
        if shape_options or layers != 1 or bidirectional:
            raise click.UsageError("--preset targets sets the shapes itself; drop -N/-T/--input-size/--hidden-size/"
                                   "--layers/--bidirectional")  # fmt: skip
        cases = harness.target_grid(cells or None, modes or None, dtype)
        cases = [harness.BenchCase(**{**c.__dict__, "lengths": lengths}) for c in cases]
    elif shape_options:
        cases = harness.grid(cells or tuple(CELLS), modes or MODES, batches or (64,), steps or (100,), inputs,
                             hiddens or (256,), **options)  # fmt: skip
    else:
        defaults = harness.default_grid(cells or None, modes or None)
        cases = [harness.BenchCase(**{**c.__dict__, **options}) for c in defaults]

    factories = [functools.partial(peers.PEERS[name], threads=threads) for name in compare]
    rows = []
    started = time.perf_counter()
    old_torch_threads = _torch_threads() if "torch" in compare else None
    try:
        with harness.thread_limits(threads):
            click.echo("measuring the BLAS sgemm rate ...", err=True)
            sgemm = harness.sgemm_gflops()
            for k, case in enumerate(cases, 1):
                click.echo(f"[{k}/{len(cases)}] {case.label()} {case.dtype} lengths={case.lengths}", err=True)
                row = harness.run_case(case, repeat, warmup, factories, min_time)
                row["pct_sgemm"] = 100.0 * row["gflops"] / sgemm
                rows.append(row)
            info = {"threading": machine.threading_info(), "blas": machine.blas_info()}
    finally:
        if old_torch_threads is not None:
            import torch

            torch.set_num_threads(old_torch_threads)
    click.echo(f"done in {time.perf_counter() - started:.1f} s", err=True)
    result = {
        "schema": "fastseq-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(click.get_current_context()),
        "machine": machine.cpu_info(),
        "versions": machine.versions([p for name in compare for p in peers.PEER_PACKAGES[name]]),
        "threads": threads,
        "sgemm_gflops": sgemm,
        **info,
        "results": rows,
    }
    text = report.FORMATS[fmt](result)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text)


def _command_line(ctx) -> list:
    """The invocation rebuilt from the parsed options (non-default values, long names)."""
    words = ["fastseq", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value in (None, False, ()) or value == param.default:
            continue
        option = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            words.append(option)
        else:
            for item in value if param.multiple else (value,):
                words += [option, str(item)]
    return words


def _torch_threads():
    import torch

    return torch.get_num_threads()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(as_json):
    """Versions, threading, BLAS, CPU features and the kernel cache."""
    from fastseq import _warmup
    from fastseq.bench import machine

    data = {
        "versions": machine.versions(),
        "threading": machine.threading_info(),
        "blas": machine.blas_info(),
        "cpu": machine.cpu_info(),
        "kernel_cache": {"directory": _warmup.cache_dir(), "cached_specialisations": _warmup.cache_status()},
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    v = data["versions"]
    click.echo("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    t = data["threading"]
    click.echo(f"numba threading layer: {t['configured']} (configured)"
               + (f", {t['active']} (in use)" if t["active"] else "") + f"; threads: {t['numba_threads']}")  # fmt: skip
    for b in data["blas"]:
        click.echo(
            f"BLAS: {b['internal_api']} {b['version']}, {b['num_threads']} threads, {b['architecture']} ({b['filepath']})"
        )
    c = data["cpu"]
    click.echo(f"CPU: {c['model']}, {c['cores']} logical cores, SIMD: {' '.join(c['simd']) or 'unknown'}")
    click.echo(f"kernel cache: {data['kernel_cache']['directory']}")
    status = data["kernel_cache"]["cached_specialisations"]
    compiled = sum(1 for n in status.values() if n)
    click.echo(f"compiled kernels on disk: {compiled} of {len(status)}"
               + ("" if compiled == len(status) else " (run `fastseq warmup` to compile the rest)"))  # fmt: skip
    for name, n in status.items():
        click.echo(f"  {name}: {'unknown' if n is None else n} specialisation(s)")


@main.command()
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(["float32", "float64"]),
    help="Precisions to compile (repeatable) [default: both].",
)
def warmup(dtypes):
    """Compile every kernel and store it in the disk cache (for images and first-run latency)."""
    from fastseq import _warmup

    tasks = _warmup.tasks(dtypes or ("float32", "float64"))
    started = time.perf_counter()
    for k, (name, task) in enumerate(tasks, 1):
        t0 = time.perf_counter()
        task()
        click.echo(f"[{k}/{len(tasks)}] {name}: {time.perf_counter() - t0:.1f} s", err=True)
    click.echo(f"kernels ready in {time.perf_counter() - started:.1f} s; cache: {_warmup.cache_dir()}")


if __name__ == "__main__":  # pragma: no cover
    main()
