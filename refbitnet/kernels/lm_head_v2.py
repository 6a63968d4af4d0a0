"""v2 of the bf16 LM head: the bf16 -> float32 widening stays in registers (an LLVM intrinsic).

Why: ``lm_head.bf16_matmul_kernel`` widens 4 rows into a uint32 scratch buffer and reads it back through a
float32 view, because Numba cannot bit-cast a scalar. For K = 2560 that scratch is 4 x 10 KB: more than the
32 KB L1, so every widened float is written to L2 and read back, on top of the 2 bytes per weight streamed
from memory. Here ``row_dots`` emits, per 16 weights of a row: one 32-byte load, zero-extend to 16 x i32,
shift left by 16, bit-cast to 16 x float32, multiply by x and add into 16 lanes (no fused multiply-add:
each product and each sum is rounded, as in the reference). Nothing is stored but the result.

Summation order: exactly ``reference.bf16_matmul_reference`` (and v1): lane l takes k = l, l + 16, ...
in increasing k starting from 0.0, then total = ((lane0 + lane1) + lane2) + ... + lane15. Requires
K % 16 == 0 (2B4T: 2560); ``kernels.bf16_matmul`` uses v1 otherwise.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .avx2 import prefetch
from .reference import LANES
from .sync import claim

ROWS_PER_STEP = 2      # rows dotted together: each 16-float block of x is loaded once for both rows, two
                       # independent accumulators; and each block asks for the same block of the next
                       # step's rows (PREFETCH_ROWS ahead). Each row is a stream of only 5 KB that the hardware
                       # prefetcher barely learns, so the prefetch keeps the reads going; with it, fewer rows
                       # in flight per thread read faster (fewer streams for the memory system to interleave),
                       # down to the two that hide the latency of the adds (benchmarks/results/kernels.md).
                       # The same sums for any count, so the same bits.
PREFETCH_ROWS = ROWS_PER_STEP
ROWS_PER_TASK = 256    # rows per parallel task (1.3 MB of table): each costs a claim, an atomic add


# How each table element becomes float32 in registers: (Numba dtype, LLVM element bits, widen(builder, v)).
# bf16 bits: zero-extend, shift left by 16, bit-cast (exact); int8 codes (lm_head_int8): sign-extend, convert.
ELEMENTS = {
    "bf16": (types.uint16, 16, lambda b, v: b.bitcast(b.shl(b.zext(v, ir.VectorType(ir.IntType(32), LANES)),
                                                            ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                                        [16] * LANES)),
                                                      ir.VectorType(ir.FloatType(), LANES))),
    "int8": (types.int8, 8, lambda b, v: b.sitofp(b.sext(v, ir.VectorType(ir.IntType(32), LANES)),
                                                  ir.VectorType(ir.FloatType(), LANES))),
}


def make_row_dots(n_rows, element="bf16", prefetch_rows=0):
    """Intrinsic (table [V, K] of element, x float32 [K], v0) -> UniTuple(float32, n_rows): the 16-lane dots
    of x with rows v0 .. v0+n_rows-1, each element widened exactly in registers (ELEMENTS); with
    prefetch_rows > 0, each block of a row also prefetches the same block prefetch_rows rows further on. No
    bounds checks: the caller keeps v0 + n_rows <= V, K % 16 == 0 (a prefetch past the table never faults)."""
    dtype, bits, widen = ELEMENTS[element]

    @intrinsic
    def row_dots(typingctx, table, x, v0):
        if not (isinstance(table, types.Array) and table.dtype == dtype and table.ndim == 2
                and isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 1):
            return None
        sig = types.UniTuple(types.float32, n_rows)(table, x, types.intp)

        def codegen(context, builder, signature, args):
            t_a = context.make_array(signature.args[0])(context, builder, args[0])
            x_a = context.make_array(signature.args[1])(context, builder, args[1])
            v0 = args[2]
            i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
            v16e, v16f32 = ir.VectorType(ir.IntType(bits), LANES), ir.VectorType(f32, LANES)
            row_stride = builder.extract_value(t_a.strides, 0)              # bytes per table row
            n_blocks = builder.udiv(builder.extract_value(t_a.shape, 1), ir.Constant(v0.type, LANES))
            t_ptr = builder.bitcast(t_a.data, i8.as_pointer())
            rows = [builder.bitcast(builder.gep(t_ptr, [builder.mul(builder.add(v0, ir.Constant(v0.type, r)),
                                                                    row_stride)]), v16e.as_pointer())
                    for r in range(n_rows)]
            x_ptr = builder.bitcast(x_a.data, v16f32.as_pointer())
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f32, [0.0] * LANES)) for _ in range(n_rows)]
            ahead = builder.mul(row_stride, ir.Constant(row_stride.type, prefetch_rows))        # bytes
            with cgutils.for_range(builder, n_blocks) as loop:
                xv = builder.load(builder.gep(x_ptr, [loop.index]), align=4)
                for r in range(n_rows if prefetch_rows else 0):
                    block = builder.bitcast(builder.gep(rows[r], [loop.index]), i8.as_pointer())
                    prefetch(builder, builder.gep(block, [ahead]))
                for r in range(n_rows):
                    w = widen(builder, builder.load(builder.gep(rows[r], [loop.index]), align=bits // 8))
                    builder.store(builder.fadd(builder.load(accs[r]), builder.fmul(xv, w)), accs[r])
            totals = []
            for acc in accs:
                lanes = builder.load(acc)
                total = builder.extract_element(lanes, ir.Constant(i32, 0))
                for lane in range(1, LANES):
                    total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(i32, lane)))
                totals.append(total)
            return context.make_tuple(builder, signature.return_type, totals)
        return sig, codegen

    return row_dots


row_dots_step = make_row_dots(ROWS_PER_STEP, prefetch_rows=PREFETCH_ROWS)
row_dots1 = make_row_dots(1)


@njit(cache=True, parallel=True)
def bf16_matmul_kernel_v2(x, table, out):
    """x float32 [S, K], table uint16 [V, K] (K % 16 == 0, rows contiguous), out float32 [S, V]
    <- x @ bf16(table).T in the 16-lane order."""
    S = x.shape[0]
    V = table.shape[0]
    for task in prange((V + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        v_end = min(V, (task + 1) * ROWS_PER_TASK)
        v0 = task * ROWS_PER_TASK
        while v0 + ROWS_PER_STEP <= v_end:
            for s in range(S):
                d = row_dots_step(table, x[s], v0)
                for r in range(ROWS_PER_STEP):
                    out[s, v0 + r] = d[r]
            v0 += ROWS_PER_STEP
        while v0 < v_end:
            for s in range(S):
                out[s, v0] = row_dots1(table, x[s], v0)[0]
            v0 += 1


def bf16_matmul_v2(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Unchecked: x float32 [S, K] C-contiguous, table uint16 [V, K] C-contiguous, K % 16 == 0 -> float32 [S, V]."""
    out = np.empty((x.shape[0], table.shape[0]), np.float32)
    bf16_matmul_kernel_v2(x, table, out)
    return out


@njit(cache=True)
def dot_rows_into(table, x, out, v0, v_end):
    """out[v] = the 16-lane dot of x float32 [K] with bf16 row v of table, v = v0 .. v_end-1 (ROWS_PER_STEP
    rows at a time, then one by one): one task of the one-token LM head."""
    while v0 + ROWS_PER_STEP <= v_end:
        d = row_dots_step(table, x, v0)
        for r in range(ROWS_PER_STEP):
            out[v0 + r] = d[r]
        v0 += ROWS_PER_STEP
    while v0 < v_end:
        out[v0] = row_dots1(table, x, v0)[0]
        v0 += 1


@njit(cache=True, parallel=True)
def bf16_matmul_claimed_v2(x, table, out, sync, n_threads):
    """bf16_matmul_kernel_v2 for one token (decoding: x float32 [1, K] -> out [1, V]) with the rows claimed
    ROWS_PER_TASK at a time (sync.claim: its counter sync int64 [1], zeroed here) instead of split in halves
    in advance: a thread that is descheduled claims nothing, the running ones do its share (the same dots,
    so the same bits as bf16_matmul_kernel_v2). n_threads: numba.get_num_threads() of the caller."""
    V = table.shape[0]
    n_tasks = (V + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    sync[:] = 0
    for t in prange(n_threads):
        while True:
            task = claim(sync, 0, n_tasks, np.int64(t))   # one compiled signature
            if task < 0:
                break
            dot_rows_into(table, x[0], out[0], task * ROWS_PER_TASK, min(V, (task + 1) * ROWS_PER_TASK))
