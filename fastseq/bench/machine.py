"""Facts about the machine, libraries and threading that make results comparable."""

from __future__ import annotations

import os
import platform
from importlib import metadata

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "neon", "asimd", "sve")  # fmt: skip


def cpu_info() -> dict:
    """CPU model, logical cores and the SIMD features that matter for the kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags]}


#: What fastseq runs on (every report gives their versions).
PACKAGES = ("fastseq", "numba", "llvmlite", "numpy", "scipy", "click")


def versions(peer_packages=()) -> dict:
    """Versions of fastseq and what it runs on, and of ``peer_packages`` (those of the peer
    being compared, ``peers.PEER_PACKAGES``)."""
    names = [*PACKAGES, *peer_packages]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def blas_info() -> list:
    """BLAS libraries loaded in this process (numba's np.dot uses SciPy's), with threads."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS numba calls)
    from threadpoolctl import threadpool_info

    keep = ("internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info() if lib.get("user_api") == "blas"]


def threading_info() -> dict:
    """Numba's threading layer (configured, and in use once a parallel kernel has run)."""
    import numba

    try:
        active = numba.threading_layer()
    except ValueError:
        active = None  # no parallel kernel has run in this process yet
    return {
        "configured": numba.config.THREADING_LAYER,
        "active": active,
        "numba_threads": numba.get_num_threads(),
    }
