"""v1: int8 activations x unpacked int8 ternary codes, one int32 accumulator per output row.

The plainest exact kernel: codes int8 [N, K] (one byte per weight, four times the packed size), a
prange over output rows, int32 products and sums (np.int32 wrappers keep LLVM in 32 bits so the loop
vectorizes). It is correct and simple, but it reads 8 bits per 1.58-bit weight: a GEMV moves four times
the bytes of the packed kernels, so at best it runs at a quarter of their speed on a bandwidth-bound
machine. It is kept as the first step of the ladder and as a check on the idea "int8 x ternary -> int32".
"""

import numpy as np
from numba import njit, prange

i32 = np.int32


@njit(cache=True, parallel=True)
def matmul_acc_unpacked(xq, codes, out):
    """xq int8 [S, K], codes int8 [N, K] in {-1, 0, 1} -> out int32 [S, N] = xq @ codes.T."""
    S, K = xq.shape
    N = codes.shape[0]
    for n in prange(N):
        row = codes[n]
        for s in range(S):
            xs = xq[s]
            acc = i32(0)
            for k in range(K):
                acc = i32(acc + i32(i32(row[k]) * i32(xs[k])))
            out[s, n] = acc


def ternary_matmul_acc_v1(xq: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Unchecked: xq int8 [S, K], codes int8 [N, K], both C-contiguous -> int32 [S, N]."""
    out = np.empty((xq.shape[0], codes.shape[0]), np.int32)
    matmul_acc_unpacked(xq, codes, out)
    return out
