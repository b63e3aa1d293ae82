"""The kernels compiled for an AVX2 CPU on a host with AVX-512.

The GEMM micro-kernel's tile shapes, its few-row tiles and the choice of BLAS for the
chunk-level products follow the vector width numba compiles for (fastseq.kernels.gemm). On
an AVX-512 host those AVX2 paths never run in the main suite, so this test runs the GEMM
tests and the layers against the NumPy reference (also a training in the transposed layout
of small hidden sizes, whose transposes go by tiles of a vector's width) in a fresh
interpreter with numba's target set to Haswell (and an empty kernel cache of its own),
started with the session (tests/background.py).
"""

import os
import sys

import pytest

from fastseq.kernels.gemm import _target_features

HASWELL_FEATURES = ",".join(
    "+" + f
    for f in ("64bit", "avx", "avx2", "bmi", "bmi2", "cmov", "cx16", "f16c", "fma", "fsgsbase", "lzcnt",
              "mmx", "movbe", "popcnt", "sse", "sse2", "sse3", "sse4.1", "sse4.2", "ssse3", "xsave")
)  # fmt: skip


def _avx2_suite(workdir):
    """A fresh interpreter compiling for Haswell into an empty cache under ``workdir``:
    checks that the AVX2 paths are chosen, then runs the listed tests on them."""
    if "avx512f" not in _target_features():
        return None
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(workdir / "cache"),
        NUMBA_CPU_NAME="haswell",
        NUMBA_CPU_FEATURES=HASWELL_FEATURES,
    )
    training = "tests/test_reference.py::test_training_in_columns_matches_naive"  # its tiled transposes
    tests = ["tests/test_gemm.py", "tests/test_reference.py::test_shapes_match_naive",
             f"{training}[rnn-tanh-c20h20-1-True-True-float32]"]  # fmt: skip
    script = (
        "import sys, pytest; from fastseq.kernels import gemm; "
        "assert gemm.VECTOR_BYTES == 32 and gemm.BLAS_FOR_LARGE, gemm.VECTOR_BYTES; "
        f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', *{tests!r}]))"
    )
    return [sys.executable, "-c", script], env


@pytest.mark.skipif("avx512f" not in _target_features(), reason="the main suite already runs the AVX2 paths")
@pytest.mark.background(command=_avx2_suite)  # minutes of compiling, from the session's start
def test_kernels_compiled_for_avx2(background):
    run, _ = background
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
