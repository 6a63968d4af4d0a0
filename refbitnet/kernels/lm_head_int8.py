"""An opt-in 8-bit LM head: the tied bf16 embedding quantized per row to int8 codes and one float32 scale.

Why: in a 2B4T decode step the bf16 LM head is the largest single read (V x D x 2 bytes = 0.66 GB against
0.52 GB for all packed projections). Rows of int8 codes halve it. This is NOT the model's arithmetic: the
logits change (by about scale/2 per weight, summed over D), so it is opt-in, and its cost is measured
(logit error, greedy agreement, perplexity: benchmarks/bench_int8_head.py, results/int8_head.md).

Quantization (``quantize_rows_int8``), per vocabulary row v of the widened table W [V, K]:
    scale[v] = max_k |W[v, k]| / 127 (float32; 1 for an all-zero row)
    q[v, k]  = round_half_even(W[v, k] / scale[v]), in -127 .. 127
Logits (``int8_matmul``): y[s, v] = fl(scale[v] * dot(x[s], q[v])), the dot in the 16-lane order of the
bf16 kernels (lane l takes k = l, l + 16, ..; each product and sum rounded; lanes added left to right),
each code widened exactly to float32 in registers (lm_head_v2's ``make_row_dots`` with int8 elements: load
16 bytes, sign-extend, convert). K % 16 == 0.
"""

import numpy as np
from numba import njit, prange

from ..checks import check_array
from ..errors import RefBitNetError
from .lm_head_v2 import make_row_dots
from .reference import LANES
from .sync import claim

ROWS_PER_STEP = 2      # rows dotted together, the next 2 prefetched meanwhile, as lm_head_v2's bf16 head:
PREFETCH_ROWS = 2      # on the Zen 5 VM 45.7 GB/s at 2 threads, against 39.2 for 16 rows without prefetch
                       # and 43.0 for 4 with it (results/int8_head.md)
ROWS_PER_TASK = 256    # rows per claimed task (0.66 MB of codes)


def quantize_rows_int8(table: np.ndarray, chunk_rows: int = 4096):
    """Table [V, K] (bf16 bits uint16, or float16/float32) -> (q int8 [V, K], scale float32 [V]), a chunk of
    rows widened at a time (no float32 copy of the whole table)."""
    from ..model import widen
    table = check_array(table, "table", None, 2, nonempty=True)
    v_rows, k = table.shape
    q = np.empty((v_rows, k), np.int8)
    scale = np.empty(v_rows, np.float32)
    for r0 in range(0, v_rows, chunk_rows):
        w = widen(table[r0:r0 + chunk_rows])                                         # [chunk, K] float32
        if not np.isfinite(w).all():
            raise RefBitNetError(f"table: expected finite values (rows {r0}..{r0 + w.shape[0] - 1})")
        m = np.abs(w).max(axis=1)                                                   # [chunk]
        s = np.where(m > 0, m / np.float32(127), np.float32(1)).astype(np.float32)
        q[r0:r0 + w.shape[0]] = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
        scale[r0:r0 + w.shape[0]] = s
    return q, scale


row_dots_step = make_row_dots(ROWS_PER_STEP, "int8", prefetch_rows=PREFETCH_ROWS)   # int8 codes widened
row_dots1 = make_row_dots(1, "int8")


@njit(cache=True)
def int8_rows_into(q, scale, x, out, v0, v_end):
    """out[v] = fl(scale[v] * the 16-lane dot of x float32 [K] with int8 row v of q), v = v0 .. v_end-1
    (ROWS_PER_STEP rows at a time, then one by one): one task of the one-token head (also decode_step's)."""
    while v0 + ROWS_PER_STEP <= v_end:
        d = row_dots_step(q, x, v0)
        for r in range(ROWS_PER_STEP):
            out[v0 + r] = np.float32(scale[v0 + r] * d[r])
        v0 += ROWS_PER_STEP
    while v0 < v_end:
        out[v0] = np.float32(scale[v0] * row_dots1(q, x, v0)[0])
        v0 += 1


@njit(cache=True, parallel=True)
def int8_matmul_kernel(x, q, scale, out, sync, n_threads):
    """x float32 [S, K], q int8 [V, K], scale float32 [V] -> out float32 [S, V]; rows claimed ROWS_PER_TASK at
    a time (sync.claim; its counter sync int64 [1], zeroed here)."""
    V = q.shape[0]
    n_tasks = (V + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    sync[:] = 0
    for t in prange(n_threads):
        while True:
            task = claim(sync, 0, n_tasks, np.int64(t))   # one compiled signature
            if task < 0:
                break
            for s in range(x.shape[0]):
                int8_rows_into(q, scale, x[s], out[s], task * ROWS_PER_TASK, min(V, (task + 1) * ROWS_PER_TASK))


def int8_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Checked: x float32 [S, K], q int8 [V, K] (K % 16 == 0), scale float32 [V] -> logits float32 [S, V]."""
    import numba
    x = check_array(x, "x", np.float32, 2, contiguous=True, nonempty=True)
    q = check_array(q, "q", np.int8, 2, contiguous=True, nonempty=True)
    scale = check_array(scale, "scale", np.float32, 1, contiguous=True)
    if q.shape[1] != x.shape[1] or q.shape[1] % LANES or scale.shape[0] != q.shape[0]:
        raise RefBitNetError(f"q: expected int8 [V, K] with K = {x.shape[1]} (a multiple of {LANES}) and scale "
                             f"[V], found q {q.shape}, scale {scale.shape}")
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    int8_matmul_kernel(x, q, scale, out, np.zeros(1, np.int64), numba.get_num_threads())
    return out


def int8_matmul_reference(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """NumPy, the same 16-lane order: what int8_matmul must equal bit for bit."""
    s_len, k = x.shape
    lanes = (x.reshape(s_len, 1, k // LANES, LANES) * q.astype(np.float32).reshape(1, -1, k // LANES, LANES))
    acc = np.zeros((s_len, q.shape[0], LANES), np.float32)
    for b in range(k // LANES):                                      # lane l: k = l, l + 16, ... in order
        acc += lanes[:, :, b, :]
    total = acc[..., 0].copy()
    for lane in range(1, LANES):
        total += acc[..., lane]
    return (scale[None, :] * total).astype(np.float32)
