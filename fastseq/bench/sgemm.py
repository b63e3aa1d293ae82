"""A jitted GEMM: measures the BLAS rate that the kernels' np.dot actually gets."""

import numpy as np

from fastseq._jit import jit


@jit
def matmul_into(a, b, out):
    """out (M, N) = a (M, K) @ b (K, N), through numba's np.dot (BLAS)."""
    np.dot(a, b, out=out)
