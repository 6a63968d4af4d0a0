"""v3: ternary GEMV/GEMM from uint16 words of packed codes and int16 activation "planes" (no intrinsics).

Weights: kernel layout (``layouts.pack_kernel``), uint8 [N, K/4] read as little-endian uint16 words
[N, K/8]; word w of row n holds the codes c = w + 1 in {0, 1, 2} of k = 8w .. 8w+7, field t (k = 8w + t)
at bits 2t of the word, i.e. bits 2(t % 4) of its low (t < 4) or high (t >= 4) byte.

Three ideas make the inner loop a run of int16 x int16 -> int32 multiply-adds (AVX2 ``vpmaddwd``,
16 products per instruction, about 0.2 instructions per weight):

1. sum_k w x = sum_k c x - sum_k x: the kernel multiplies the codes c as stored, no "- 1" per weight.
2. A field is masked in place, not shifted down: ``byte & (3 << 2i)`` equals c * 4**i. The matching
   activation is pre-multiplied by 4**(3 - i) in plane t, built once per token (act_quant.PLANE_FACTOR):
       planes[t, w] = xq[8w + t] * 4**(3 - t % 4)        # int16 [8, K/8], |value| <= 128 * 64
   so every product is 64 * c * x and one int32 accumulator holds 64 * sum c x (|.| <= 64*2*128*K,
   below 2**31 for K <= 131072). Then acc = (acc64 >> 6) - sum x, exactly.
3. Every product and partial sum is wrapped in np.int32(...): Numba types integers as int64, and only a
   32-bit loop lets LLVM pick vpmaddwd (with the '-vectorizer-maximize-bandwidth' option set by the
   package __init__, on 256-bit registers).

Plain Numba loops, so it runs wherever Numba does, for any K % 8 == 0: ``TernaryLinear`` falls back to it
where the AVX2 kernels (v4, v5: K % 128 == 0) cannot run.

GEMM (S > 1 tokens): a task owns ROWS_PER_TASK output rows (32 x K/4 bytes, at most 55 KB) and runs
every token over them, so the rows come from DRAM once per call. Its instructions per weight x token are
those of the GEMV (16 vpmaddwd among about 62 per 256 products), so the GEMM is bound by instruction
throughput and gains per token only what the GEMV lost waiting for memory. Doing better needs
vpmaddubsw (32 products per instruction) with int16 accumulators kept in registers across tokens, which
LLVM's loop vectorizer does not produce from Numba loops: v4_maddubs and v5_prefill emit it directly.

Activations: ``act_quant.word_planes`` (readable) / ``act_quant.quantize_word_planes`` (fused) build the
planes and xsum; ``refbitnet.kernels.TernaryLinear(kernel="v3")`` is the checked entry.
"""

import numpy as np
from numba import njit, prange

i32 = np.int32
MAX_K = 131072                     # 64 * 2 * 128 * K must fit in int32
ROWS_PER_TASK = 32                 # output rows per parallel task


@njit(cache=True, inline="always")
def dot_row(row, pl):
    """row uint16 [K/8] (one output row's words), pl int16 [8, K/8] (one token's planes) -> 64 * sum c x, int32."""
    p0 = pl[0]; p1 = pl[1]; p2 = pl[2]; p3 = pl[3]            # noqa: E702  fields of the low byte
    p4 = pl[4]; p5 = pl[5]; p6 = pl[6]; p7 = pl[7]            # noqa: E702  fields of the high byte
    acc = i32(0)
    for w in range(row.shape[0]):
        lo = i32(row[w])                                      # low byte's fields at bits 0..7
        hi = i32(lo >> 8)                                     # high byte's fields moved to bits 0..7
        acc = i32(acc + i32(i32(p0[w]) * i32(lo & 3)))        # c * 1  * x * 64
        acc = i32(acc + i32(i32(p1[w]) * i32(lo & 12)))       # c * 4  * x * 16
        acc = i32(acc + i32(i32(p2[w]) * i32(lo & 48)))       # c * 16 * x * 4
        acc = i32(acc + i32(i32(p3[w]) * i32(lo & 192)))      # c * 64 * x * 1
        acc = i32(acc + i32(i32(p4[w]) * i32(hi & 3)))
        acc = i32(acc + i32(i32(p5[w]) * i32(hi & 12)))
        acc = i32(acc + i32(i32(p6[w]) * i32(hi & 48)))
        acc = i32(acc + i32(i32(p7[w]) * i32(hi & 192)))
    return acc


@njit(cache=True, parallel=True)
def matmul_acc(words, planes, xsum, out):
    """words uint16 [N, K/8], planes int16 [S, 8, K/8], xsum int32 [S] -> out int32 [S, N] (= xq @ codes.T)."""
    N = words.shape[0]
    S = planes.shape[0]
    for task in prange((N + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for s in range(S):                                   # this token's planes stay in L1 ...
            for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):   # ... and the rows in L2
                out[s, n] = (dot_row(words[n], planes[s]) >> 6) - xsum[s]


@njit(cache=True, parallel=True)
def matmul_scaled(words, planes, xsum, s_act, row_scale, out):
    """As matmul_acc, then the fused epilogue out[s, n] = float32(float32(acc) / s_act[s]) * row_scale[n] (f32 [S, N])."""
    N = words.shape[0]
    S = planes.shape[0]
    for task in prange((N + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for s in range(S):
            for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
                acc = (dot_row(words[n], planes[s]) >> 6) - xsum[s]
                y = np.float32(np.float32(acc) / s_act[s])     # round the quotient to float32 first
                out[s, n] = np.float32(y * row_scale[n])
