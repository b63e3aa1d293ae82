"""Profile fastseq's compiled kernels with Linux ``perf``: a perf map names the JIT code.

    python benchmarks/perf_map.py rnn forward 32 100 64 [--lengths random] [--seconds 10]

perf cannot name numba's JIT code by itself (numba's ``NUMBA_ENABLE_PROFILING`` wrote no
jitdump here), so this script writes ``/tmp/perf-<pid>.map``, perf's map of JIT symbols,
for every function of every fastseq kernel compiled in the process, then runs the case
(``fastseq bench``'s data) for ``--seconds``. Attach perf meanwhile, after the line with
the pid, e.g.::

    perf record -p <pid> -o perf.data -- sleep 5
    perf report -i perf.data --no-children --sort sym

By default the kernels compile in the process, into a temporary ``NUMBA_CACHE_DIR``
(about a minute): only then does numba hold every function's code, the linked-in callees
(``gemm.gemm_packed`` ...) included; a kernel loaded from the cache gives its entry point
alone (``--use-cache`` to accept that). Names are shortened to ``module.function.vN``
(N: numba's specialisation); ``__numba_parfor_gufunc`` is the body of a ``prange``. The
OpenMP runtime (``libgomp``) has no symbols: its samples are threads waiting in or for a
parallel region.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

_MANGLED_NAME = re.compile(r"(\d+)")


def short_name(symbol: str) -> str:
    """``_ZN7fastseq7kernels4gemm11gemm_packedB3v56...`` -> ``gemm.gemm_packed.v56``: the
    last two name parts of numba's mangled symbol and its version tag."""
    start = symbol.find("_ZN")
    if start < 0:
        return symbol
    pos, parts = start + 3, []
    while pos < len(symbol) and symbol[pos].isdigit():
        digits = _MANGLED_NAME.match(symbol, pos).group()
        pos += len(digits)
        parts.append(symbol[pos : pos + int(digits)])
        pos += int(digits)
    version = re.match(r"B\d+v(\d+)", symbol[pos:])
    prefix = (
        "cpython." if symbol.startswith("_ZN7cpython") else "cfunc." if symbol.startswith("cfunc.") else ""
    )
    parts = [p for p in parts if p != "_3cdynamic_3e"]  # "<dynamic>": a prange body's module
    return prefix + ".".join(parts[-2:]) + (f".v{version.group(1)}" if version else "")


def compiled_functions() -> dict:
    """{address: symbol} of the code of every compiled fastseq kernel in this process."""
    from numba.core.registry import CPUDispatcher

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastseq") or module is None:
            continue
        for obj in vars(module).values():
            if not isinstance(obj, CPUDispatcher):
                continue
            for result in obj.overloads.values():
                library = result.library
                symbols = [f.name for f in library._final_module.functions if not f.is_declaration]
                for symbol in symbols or [result.fndesc.llvm_func_name]:  # cache-loaded: entry only
                    address = library.get_pointer_to_function(symbol)
                    if address:
                        found.setdefault(address, symbol)
    return found


def write_perf_map(path: str | None = None) -> int:
    """Write perf's map of JIT symbols (default ``/tmp/perf-<pid>.map``): each function from
    its address to the next one's (at most 1 MB). Returns the number of functions."""
    found = compiled_functions()
    addresses = sorted(found)
    ends = addresses[1:] + addresses[-1:]  # the last function: 4 KB
    with open(path or f"/tmp/perf-{os.getpid()}.map", "w") as out:
        for address, following in zip(addresses, ends, strict=True):
            following = following if following > address else address + 4096
            out.write(f"{address:x} {min(following - address, 1 << 20):x} {short_name(found[address])}\n")
    return len(addresses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", choices=("rnn", "lstm", "gru"))
    parser.add_argument("mode", choices=("forward", "train", "stream"))
    parser.add_argument("shape", nargs=3, type=int, metavar=("N", "T", "H"), help="batch, steps, C = H")
    parser.add_argument("--lengths", choices=("full", "random"), default="full")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--use-cache", action="store_true", help="load kernels from numba's cache (entry points only)"
    )
    args = parser.parse_args(argv)
    if not args.use_cache:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastseq-perf-")
    from fastseq.bench.harness import BenchCase, Inputs, build_fastseq

    n, t, h = args.shape
    case = BenchCase(args.cell, args.mode, n, t, h, h, lengths=args.lengths)
    run = build_fastseq(case, Inputs(case))[0]
    run()
    run()
    print(f"pid {os.getpid()}: {write_perf_map()} functions mapped; running {case.label()} for {args.seconds} s",
          flush=True)  # fmt: skip
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        run()
        calls += 1
    print(f"{calls} calls, {(time.perf_counter() - start) / calls * 1e6:.1f} us a call")


if __name__ == "__main__":
    main()
