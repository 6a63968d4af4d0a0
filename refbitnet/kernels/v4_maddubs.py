"""v4: ternary GEMV/GEMM with AVX2 ``vpmaddubsw`` (32 byte products per instruction), via an LLVM intrinsic.

Why: the v3 kernel is bound by instructions, not memory (about 0.22 instructions per weight with
``vpmaddwd``, 16 products each). ``vpmaddubsw`` multiplies 32 unsigned bytes by 32 signed bytes: the codes
c = w + 1 in {0, 1, 2} are the unsigned operand and the int8 activations the signed one, so a 32-byte chunk
of packed codes (128 weights) times one token is 4 of them. LLVM's loop vectorizer does not produce it from
a Numba loop, so ``block_dot`` emits it directly (building blocks: ``refbitnet.kernels.avx2``).

Layout: weights in the kernel layout (``layouts.pack_kernel``): byte j of a row holds c of k = 4j + i at
bits 2i. Activations per token as 4 int8 planes: planes[i, j] = xq[4j + i]. For a chunk W of a row:
    f_i = (W >> 2i) & 3                      # u8 codes of k = 4j + i   (vpsrlw + vpand)
    p_i = maddubs(f_i, planes[i, chunk])     # i16: c[2m] x[2m] + c[2m+1] x[2m+1], |.| <= 2*2*128 = 512
    acc16 += p_0 + p_1 + p_2 + p_3           # |.| <= 2048 per chunk
The GEMV alternates chunks between two int16 accumulators, so each takes at most WIDEN_CHUNKS = 15 of a
block's up to 30 chunks (|acc16| <= 30720 < 2**15); then both are widened with vpmaddwd by ones and
summed: sum_k c x exactly, so acc = sum_k c x - sum_k x = sum_k w x (int32, exact). About 15
instructions per 128 weights (0.12 per weight, v3: 0.22).

Why two accumulators and 30-chunk blocks: a 2B4T row of K = 2560 is 20 chunks; with one accumulator it
was a block of 15 and a block of 5, each with its loop tail and horizontal sum, which cost a GEMV on a
Zen 3 core ~10% in cycles per chunk; now it is one block of 20 whose chunk pairs are independent. And each
chunk pair (one 64-byte line of the row) asks for the row bytes PREFETCH ahead: a row is only 640 bytes,
too short a stream for the hardware prefetcher to run ahead of (the rows of a task are contiguous, so
this fetches the rows to come). Measured in benchmarks/results/kernels.md.

Two kernels: ``matmul_scaled_v4``, the GEMV (decode, one token per pass over a row), and
``matmul_scaled_v4_blocked``, the same arithmetic for TOKENS_PER_PASS = 4 tokens per pass (prefill of a few
tokens), sharing each chunk's load and field extraction between them. Both need AVX2 (``available()``)
and K % 128 == 0; ``refbitnet.kernels.TernaryLinear`` runs v3 otherwise.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .avx2 import (CHUNK, I8, V16I16, V32I8, WIDEN_CHUNKS, code_fields, load32, madd_intrinsics, prefetch,
                   sum_i16_lanes, sum_i32_lanes, widen)

__all__ = ["matmul_scaled_v4", "matmul_scaled_v4_blocked", "CHUNK", "TOKENS_PER_PASS"]

ROWS_PER_TASK = 32
PREFETCH = 2048          # bytes of the row stream requested ahead of the chunk pair being read


@intrinsic
def block_dot(typingctx, row, planes, chunk0, nchunks):
    """sum over chunks chunk0 .. chunk0+nchunks-1 (nchunks <= 2 * WIDEN_CHUNKS) of sum c x: row uint8 [K/4]
    (one row), planes int8 [4, K/4] (one token) -> int32. Even chunks of the block go to one int16
    accumulator, odd ones to the other (at most WIDEN_CHUNKS each). No bounds checks: the caller keeps
    chunks inside the row (the prefetch may point past it: a prefetch never faults)."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(planes, types.Array)
            and planes.dtype == types.int8 and planes.ndim == 2):
        return None
    sig = types.int32(row, planes, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_a = context.make_array(signature.args[0])(context, builder, args[0])
        pl_a = context.make_array(signature.args[1])(context, builder, args[1])
        chunk0, nchunks = args[2], args[3]
        intp = chunk0.type
        maddubs, maddwd = madd_intrinsics(builder.module)
        plane_stride = builder.extract_value(pl_a.strides, 0)            # bytes between planes (= K/4)
        row_ptr = builder.bitcast(row_a.data, I8.as_pointer())
        pl_ptr = builder.bitcast(pl_a.data, I8.as_pointer())
        accs = [cgutils.alloca_once_value(builder, ir.Constant(V16I16, None)) for _ in range(2)]

        def add_chunk(chunk, acc_ptr):                   # acc16 += sum over the 4 fields of maddubs(f_i, plane i)
            offset = builder.mul(chunk, ir.Constant(intp, CHUNK))
            fields = code_fields(builder, load32(builder, row_ptr, offset))
            total = None
            for i in range(4):
                poff = builder.add(builder.mul(plane_stride, ir.Constant(plane_stride.type, i)), offset)
                p = builder.call(maddubs, [fields[i], load32(builder, pl_ptr, poff)])
                total = p if total is None else builder.add(total, p)
            builder.store(builder.add(builder.load(acc_ptr), total), acc_ptr)

        two = ir.Constant(intp, 2)
        with cgutils.for_range(builder, builder.udiv(nchunks, two)) as loop:      # chunk pairs
            chunk = builder.add(chunk0, builder.mul(loop.index, two))
            add_chunk(chunk, accs[0])
            add_chunk(builder.add(chunk, ir.Constant(intp, 1)), accs[1])
            ahead = builder.add(builder.mul(chunk, ir.Constant(intp, CHUNK)), ir.Constant(intp, PREFETCH))
            prefetch(builder, builder.gep(row_ptr, [ahead]))
        with builder.if_then(builder.trunc(nchunks, ir.IntType(1))):                # an odd last chunk
            add_chunk(builder.add(chunk0, builder.sub(nchunks, ir.Constant(intp, 1))), accs[0])
        return sum_i32_lanes(builder, builder.add(widen(builder, maddwd, builder.load(accs[0])),
                                                  widen(builder, maddwd, builder.load(accs[1]))))   # [8] i32
    return sig, codegen


@njit(cache=True, inline="always")
def dot_row(row, pl):
    """row uint8 [K/4], pl int8 [4, K/4] (K/4 % 32 == 0) -> sum_k c x, int32."""
    n_chunks = row.shape[0] // CHUNK
    acc = np.int32(0)
    for c0 in range(0, n_chunks, 2 * WIDEN_CHUNKS):
        acc += block_dot(row, pl, c0, min(2 * WIDEN_CHUNKS, n_chunks - c0))
    return acc


@njit(cache=True, parallel=True)
def matmul_scaled_v4(packed, planes, xsum, s_act, row_scale, out):
    """packed uint8 [N, K/4], planes int8 [S, 4, K/4], xsum int32 [S], s_act f32 [S], row_scale f32 [N]
    -> out f32 [S, N] = fl(fl(float32(acc) / s_act[s]) * row_scale[n]), acc = xq @ w.T exactly."""
    N = packed.shape[0]
    S = planes.shape[0]
    for task in prange((N + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for s in range(S):
            for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
                acc = dot_row(packed[n], planes[s]) - xsum[s]
                y = np.float32(np.float32(acc) / s_act[s])
                out[s, n] = np.float32(y * row_scale[n])


# ----------------------------------------------------------------------------- prefill: 4 tokens per pass
# Prefill multiplies the same rows by several tokens, so the field extraction of a chunk (a load, 3 shifts,
# 4 ands) can be shared between them. Here TOKENS_PER_PASS = 4 tokens are register-blocked (one int16
# accumulator register each; 4 field registers, the mask: <= 16 ymm registers), and their activations
# are stored chunk-interleaved, so that all 16 plane loads of one chunk sit at constant offsets from one
# pointer (with one pointer per token LLVM keeps shuffling the pointers between registers):
#     blocks int8 [B, C, 4, 4, 32], B = ceil(S/4), C = K/128:  blocks[b, c, t, i, j] = xq[4b + t, 4(32c + j) + i]
# (tokens past S are zero planes and their outputs are not written).
TOKENS_PER_PASS = 4
BLOCKED_ROWS_PER_TASK = 16   # 16 rows of K = 2560 (10 KB) + one token block (10 KB) stay in the 32 KB L1


@intrinsic
def block_dot4(typingctx, row, blocks, b, chunk0, nchunks):
    """(row uint8 [K/4], blocks int8 [B, C, 4, 4, 32], b, chunk0, nchunks <= 15) -> UniTuple(int32, 4): for
    the 4 tokens of block b, sum c x over chunks chunk0 .. chunk0+nchunks-1. No bounds checks."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(blocks, types.Array)
            and blocks.dtype == types.int8 and blocks.ndim == 5):
        return None
    sig = types.UniTuple(types.int32, TOKENS_PER_PASS)(row, blocks, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_a = context.make_array(signature.args[0])(context, builder, args[0])
        bl_a = context.make_array(signature.args[1])(context, builder, args[1])
        b, chunk0, nchunks = args[2], args[3], args[4]
        i8, i32 = ir.IntType(8), ir.IntType(32)
        maddubs, maddwd = madd_intrinsics(builder.module)
        block_stride = builder.extract_value(bl_a.strides, 0)
        chunk_stride = builder.extract_value(bl_a.strides, 1)           # = 4 * 4 * 32 bytes
        row_ptr = builder.bitcast(row_a.data, i8.as_pointer())
        base = builder.gep(builder.bitcast(bl_a.data, i8.as_pointer()), [builder.mul(b, block_stride)])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(V16I16, None)) for _ in range(TOKENS_PER_PASS)]
        with cgutils.for_range(builder, nchunks) as loop:
            chunk = builder.add(chunk0, loop.index)
            w = load32(builder, row_ptr, builder.mul(chunk, ir.Constant(chunk.type, CHUNK)))
            fields = code_fields(builder, w)
            x_ptr = builder.bitcast(builder.gep(base, [builder.mul(chunk, chunk_stride)]), V32I8.as_pointer())
            for t, acc_ptr in enumerate(accs):
                total = None
                for i in range(4):
                    x = builder.load(builder.gep(x_ptr, [ir.Constant(i32, 4 * t + i)]), align=1)
                    p = builder.call(maddubs, [fields[i], x])
                    total = p if total is None else builder.add(total, p)
                builder.store(builder.add(builder.load(acc_ptr), total), acc_ptr)
        results = [sum_i16_lanes(builder, maddwd, builder.load(acc_ptr)) for acc_ptr in accs]
        return context.make_tuple(builder, signature.return_type, results)
    return sig, codegen


@njit(cache=True, parallel=True)
def matmul_scaled_v4_blocked(packed, blocks, xsum, s_act, row_scale, out):
    """matmul_scaled_v4 for a block of S tokens (prefill): packed uint8 [N, K/4], blocks int8
    [ceil(S/4), K/128, 4, 4, 32] (see above), xsum int32 [S], s_act f32 [S], row_scale f32 [N] -> out f32
    [S, N]. Each group of 4 tokens shares every weight chunk's load and field extraction. Same integers
    and the same epilogue as matmul_scaled_v4, so the same output."""
    N = packed.shape[0]
    S = out.shape[0]
    n_chunks = packed.shape[1] // CHUNK
    for task in prange((N + BLOCKED_ROWS_PER_TASK - 1) // BLOCKED_ROWS_PER_TASK):
        for b in range(blocks.shape[0]):
            s0 = b * TOKENS_PER_PASS
            n_tok = min(TOKENS_PER_PASS, S - s0)
            for n in range(task * BLOCKED_ROWS_PER_TASK, min(N, (task + 1) * BLOCKED_ROWS_PER_TASK)):
                row = packed[n]
                a0 = np.int32(0)
                a1 = np.int32(0)
                a2 = np.int32(0)
                a3 = np.int32(0)
                for c0 in range(0, n_chunks, WIDEN_CHUNKS):
                    p0, p1, p2, p3 = block_dot4(row, blocks, b, c0, min(WIDEN_CHUNKS, n_chunks - c0))
                    a0 += p0
                    a1 += p1
                    a2 += p2
                    a3 += p3
                for t in range(n_tok):
                    a = a0 if t == 0 else (a1 if t == 1 else (a2 if t == 2 else a3))
                    y = np.float32(np.float32(a - xsum[s0 + t]) / s_act[s0 + t])
                    out[s0 + t, n] = np.float32(y * row_scale[n])
