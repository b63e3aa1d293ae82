"""Report formats for ``fastseq bench``: an aligned table, JSON and CSV.

JSON schema ``fastseq-bench/1``::

    {"schema": "fastseq-bench/1", "created": ISO-8601 time, "command": [argv...],
     "machine": {"model", "cores", "simd": [...]},
     "versions": {"python", "fastseq", "numba", "llvmlite", "numpy", "scipy", "click",
                  [the compared peer's packages: "torch" / "onnxruntime", "onnx" / "jax", "jaxlib"]},
     "threading": {"configured", "active", "numba_threads"}, "threads": requested or null,
     "blas": [{"internal_api", "version", "num_threads", "threading_layer", "architecture",
               "filepath"}],
     "sgemm_gflops": float (1024^3 float32 GEMM through the kernels' BLAS, best of 5),
     "results": [row...]}

Each row: cell, mode, batch, steps, input_size, hidden_size, layers, bidirectional,
directions, dtype, lengths, median_s, spread (interquartile range / median), us_per_step,
sequences_per_s, tokens_per_s (valid tokens), gflops (GEMM work only), pct_sgemm,
compile_s; with peers also peer, peer_median_s, peer_spread, ratio (fastseq / peer time,
lower is better: the fastest peer's, see ``harness.run_case``) and peer_note when no peer
could run the case; with several peers, peers: [{peer, median_s, spread, ratio, note}].

CSV: one line per row with the row's fields followed by machine_model, cores, simd,
fastseq, numba, numpy, blas, threading_layer, numba_threads, sgemm_gflops; with several
peers then <peer>_median_s and <peer>_ratio for each.
"""

from __future__ import annotations

import csv
import io
import json

from fastseq.bench.machine import PACKAGES

ROW_FIELDS = ("cell", "mode", "batch", "steps", "input_size", "hidden_size", "layers", "bidirectional",
              "directions", "dtype", "lengths", "median_s", "spread", "us_per_step", "sequences_per_s",
              "tokens_per_s", "gflops", "pct_sgemm", "compile_s", "peer", "peer_median_s", "peer_spread",
              "ratio", "peer_note")  # fmt: skip
MACHINE_FIELDS = ("machine_model", "cores", "simd", "fastseq", "numba", "numpy", "blas", "threading_layer",
                  "numba_threads", "sgemm_gflops")  # fmt: skip


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = peer_names(report["results"])
    per_peer = [(n, k) for n in names for k in ("median_s", "ratio")] if len(names) > 1 else []
    writer.writerow(ROW_FIELDS + MACHINE_FIELDS + tuple(f"{n}_{k}" for n, k in per_peer))
    blas = ";".join(f"{b['internal_api']} {b['version']}" for b in report["blas"])
    machine = (report["machine"]["model"], report["machine"]["cores"], " ".join(report["machine"]["simd"]),
               report["versions"]["fastseq"], report["versions"]["numba"], report["versions"]["numpy"], blas,
               report["threading"]["active"] or report["threading"]["configured"],
               report["threading"]["numba_threads"], round(report["sgemm_gflops"], 2))  # fmt: skip
    for row in report["results"]:
        each = {r["peer"]: r for r in row.get("peers", ())}
        extra = ["" if each[n][k] is None else each[n][k] for n, k in per_peer]
        writer.writerow([row.get(f, "") for f in ROW_FIELDS] + list(machine) + extra)
    return buf.getvalue()


def peer_names(rows) -> list:
    """The peers of a report, in the order they were given."""
    for row in rows:
        if "peers" in row:
            return [r["peer"] for r in row["peers"]]
    return list(dict.fromkeys(row["peer"] for row in rows if "peer" in row))


def _peer_times(row) -> dict:
    """Peer name -> its median seconds (None where it could not run the case)."""
    if "peers" in row:
        return {r["peer"]: r["median_s"] for r in row["peers"]}
    return {row["peer"]: row["peer_median_s"]} if "peer" in row else {}


def _peer_versions(versions: dict) -> str:
    """ ", torch 2.13.0" etc.: the versions of the compared peer's packages, if any."""
    return "".join(f", {k} {v}" for k, v in versions.items() if k not in PACKAGES and k != "python" and v)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def to_table(report: dict) -> str:
    rows = report["results"]
    names = peer_names(rows)
    has_peer = bool(names)
    peer = names[0] if len(names) == 1 else "fastest"
    head = ["cell", "mode", "N", "T", "C", "H", "L", "D", "median", "spread", "us/step", "seq/s",
            "tokens/s", "GFLOP/s", "%sgemm", "compile"]  # fmt: skip
    if has_peer:
        head += (
            [f"{n} median" for n in names] + (["fastest"] if len(names) > 1 else []) + [f"ratio vs {peer}"]
        )
    lines = []
    for r in rows:
        line = [r["cell"], r["mode"], r["batch"], r["steps"], r["input_size"], r["hidden_size"], r["layers"],
                r["directions"], _fmt_time(r["median_s"]), f"±{r['spread'] * 100:.0f}%", f"{r['us_per_step']:.1f}",
                f"{r['sequences_per_s']:.4g}", f"{r['tokens_per_s']:.4g}", f"{r['gflops']:.1f}",
                f"{r['pct_sgemm']:.0f}%", f"{r['compile_s']:.2f} s"]  # fmt: skip
        if has_peer:
            times = _peer_times(r)
            line += [_fmt_time(times[n]) if times.get(n) is not None else "-" for n in names]
            if len(names) > 1:
                line.append(r["peer"] if r.get("ratio") is not None else "-")
            line.append(f"{r['ratio']:.2f}x" if r.get("ratio") is not None else r.get("peer_note", "-"))
        lines.append([str(c) for c in line])
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    left = {0, 1}

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )  # noqa: E731

    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines]
    m, v = report["machine"], report["versions"]
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)" for b in report["blas"]
    )
    out.append("")
    out.append(f"machine: {m['model']}, {m['cores']} cores, SIMD {' '.join(m['simd']) or 'unknown'}")
    out.append(
        f"fastseq {v['fastseq']}, numba {v['numba']}, numpy {v['numpy']}, BLAS {blas}" + _peer_versions(v)
    )
    t = report["threading"]
    out.append(f"threading layer {t['active'] or t['configured']}, numba threads {t['numba_threads']}; "
               f"sgemm rate {report['sgemm_gflops']:.1f} GFLOP/s (1024^3 float32, same BLAS as the kernels)")  # fmt: skip
    if has_peer:
        out.append(
            f"ratio = fastseq time / {peer} peer's time (lower is better); compile = first call minus median"
        )
    return "\n".join(out)


def to_markdown(report: dict) -> str:
    """A compact Markdown table (for the README), with the machine and versions below it."""
    rows = report["results"]
    names = peer_names(rows)
    several = len(names) > 1
    peer = ("the fastest of " + ", ".join(names)) if several else (names[0] if names else None)
    head = ["cell", "mode", "N, T, C=H", "layers x dirs", "fastseq", "GFLOP/s", "% sgemm"]
    if names:
        head += names + (["fastest", "ratio"] if several else ["ratio"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        shape = f"{r['batch']}, {r['steps']}, {r['hidden_size']}"
        if r["input_size"] != r["hidden_size"]:
            shape = f"{r['batch']}, {r['steps']}, C={r['input_size']} H={r['hidden_size']}"
        cells = [r["cell"], r["mode"], shape, f"{r['layers']} x {r['directions']}", _fmt_time(r["median_s"]),
                 f"{r['gflops']:.0f}", f"{r['pct_sgemm']:.0f}%"]  # fmt: skip
        if names:
            ok = r.get("ratio") is not None
            times = _peer_times(r)
            cells += [_fmt_time(times[n]) if times.get(n) is not None else "-" for n in names]
            if several:
                cells.append(r["peer"] if ok else "-")
            cells.append(f"{r['ratio']:.2f}" if ok else r.get("peer_note", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    m, v, t = report["machine"], report["versions"], report["threading"]
    lines.append("")
    lines.append(f"`{' '.join(report['command'])}` on {report['created']}: {m['model']}, {m['cores']} cores "
                 f"({' '.join(m['simd'])}); fastseq {v['fastseq']}, numba {v['numba']}, numpy {v['numpy']}"
                 + _peer_versions(v)
                 + f"; threading layer {t['active'] or t['configured']}, {t['numba_threads']} threads; "
                 f"sgemm {report['sgemm_gflops']:.0f} GFLOP/s. Times are medians; ratio = fastseq / {peer or 'peer'} "
                 "(lower is better).")  # fmt: skip
    return "\n".join(lines)


FORMATS = {"table": to_table, "json": to_json, "csv": to_csv, "markdown": to_markdown}
