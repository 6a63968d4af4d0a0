"""The tied LM head: float32 activations times the bf16 embedding table, widened inside the kernel.

table: uint16 [V, K] of bf16 bits (V = 128256, K = 2560 for 2B4T: 656 MB), typically a read-only memory
map of the checkpoint. It is never converted as a whole: a task widens ROWS_PER_STEP rows at a time into a
small uint32 scratch buffer (bits << 16) and reads that buffer through a float32 view (Numba cannot
bit-cast a scalar uint32 to float32, but an array view works).

Summation order (the one ``reference.bf16_matmul_reference`` reproduces): LANES = 16 partial sums, lane l
taking k = l, l + 16, ... in increasing k, then lanes added left to right. Written as an explicit inner
loop over 16 lanes, LLVM vectorizes it without fastmath (two 8-float registers per row, four rows per step
= eight independent add chains), so the result is the same for any thread count and any machine.
"""

import numpy as np
from numba import njit, prange

from .reference import LANES

ROWS_PER_STEP = 4      # rows widened and dotted together (shares each activation load four ways)
ROWS_PER_TASK = 64     # rows per parallel task


@njit(cache=True, parallel=True)
def bf16_matmul_kernel(x, table, out):
    """x float32 [S, K], table uint16 [V, K], out float32 [S, V] <- x @ bf16(table).T in the 16-lane order."""
    S, K = x.shape
    V = table.shape[0]
    n_full = K // LANES
    for task in prange((V + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        bits = np.empty((ROWS_PER_STEP, K), np.uint32)       # widened rows, as bits ...
        w = bits.view(np.float32)                            # ... and as float32
        lanes = np.empty((ROWS_PER_STEP, LANES), np.float32)
        v_end = min(V, (task + 1) * ROWS_PER_TASK)
        for v0 in range(task * ROWS_PER_TASK, v_end, ROWS_PER_STEP):
            rows = min(ROWS_PER_STEP, v_end - v0)
            for r in range(rows):
                src = table[v0 + r]
                dst = bits[r]
                for k in range(K):
                    dst[k] = np.uint32(src[k]) << 16         # bf16 -> float32 bits, exact
            for r in range(rows, ROWS_PER_STEP):             # last step of a ragged task: zero rows, unused
                bits[r, :] = 0
            for s in range(S):
                xs = x[s]
                lanes[:, :] = 0
                for b in range(n_full):
                    k0 = b * LANES
                    for lane in range(LANES):
                        xv = xs[k0 + lane]
                        lanes[0, lane] += xv * w[0, k0 + lane]
                        lanes[1, lane] += xv * w[1, k0 + lane]
                        lanes[2, lane] += xv * w[2, k0 + lane]
                        lanes[3, lane] += xv * w[3, k0 + lane]
                for k in range(n_full * LANES, K):           # tail, K % 16 != 0
                    for r in range(ROWS_PER_STEP):
                        lanes[r, k - n_full * LANES] += xs[k] * w[r, k]
                for r in range(rows):
                    total = lanes[r, 0]
                    for lane in range(1, LANES):
                        total += lanes[r, lane]
                    out[s, v0 + r] = total


def bf16_matmul_v1(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Unchecked: x float32 [S, K] C-contiguous, table uint16 [V, K] C-contiguous -> float32 [S, V]."""
    out = np.empty((x.shape[0], table.shape[0]), np.float32)
    bf16_matmul_kernel(x, table, out)
    return out
