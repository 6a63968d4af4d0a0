"""v4: ternary GEMV/GEMM with AVX2 ``vpmaddubsw`` (32 byte products per instruction), via an LLVM intrinsic.

Why: on a shared 2-core machine the v3 kernel is bound by instructions, not memory: with the weights
resident in L3 it still moves only ~10 GB/s of packed codes (0.22 instructions per weight). LLVM's loop
vectorizer does not produce ``vpmaddubsw`` from a Numba loop, so ``block_dot`` below emits it directly.

Layout: weights in the kernel layout (``layouts.pack_kernel``): byte j of a row holds c = w + 1 in {0,1,2}
of k = 4j + i at bits 2i. Activations per token as 4 int8 planes: planes[i, j] = xq[4j + i].
For a 32-byte chunk W of a row (128 weights) and field i:
    f_i = (W >> 2i) & 3                      # u8 codes of k = 4j + i   (vpsrlw + vpand)
    p_i = maddubs(f_i, planes[i, chunk])     # i16: c[2m] x[2m] + c[2m+1] x[2m+1], |.| <= 2*2*128 = 512
    acc16 += p_0 + p_1 + p_2 + p_3           # |.| <= 2048 per chunk
After at most CHUNKS_PER_BLOCK = 15 chunks (|acc16| <= 30720 < 2**15) acc16 is widened with vpmaddwd by
ones and summed: sum_k c x exactly, so acc = sum_k c x - sum_k x = sum_k w x (int32, exact).
About 15 instructions per 128 weights (0.12 per weight, v3: 0.22). For a block of tokens (prefill)
``matmul_scaled_v4_pairs`` runs two tokens per pass over a row, so the field extraction (load, 3 shifts,
4 ands) is shared: 1.47x faster than matmul_scaled_v4 on gate/up with 128 tokens; and
``matmul_scaled_v4_blocked`` (what the runtime uses) four tokens per pass, with their activations
chunk-interleaved so all 16 plane loads of a chunk come from one pointer: another 1.15-1.4x. The floor
is then the 4 vpmaddubsw + 4 loads of 32 activation bytes per token and chunk (2 per cycle each), which
is why a 128-token GEMM reaches about 2.5x, not 4x, the throughput of the memory-bound GEMV. AVX2 only: ``available()`` says
whether this CPU has it; the runtime falls back to v3 otherwise.
"""

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

CHUNK = 32                  # bytes of packed codes per vpmaddubsw group (128 weights)
CHUNKS_PER_BLOCK = 15       # int16 accumulation bound: 15 * 2048 < 32768
ROWS_PER_TASK = 32


def available() -> bool:
    """True if this CPU has AVX2 (vpmaddubsw / vpmaddwd on 256-bit registers)."""
    try:
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:       # noqa: BLE001  (no feature list on this platform: use v3)
        return False


def _avx2_madd_intrinsics(module):
    """Declare (vpmaddubsw: u8 x i8 pairs -> i16 [16], vpmaddwd: i16 x i16 pairs -> i32 [8]) in module."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    v32i8, v16i16, v8i32 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
    maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                            "llvm.x86.avx2.pmadd.wd")
    return maddubs, maddwd


def _sum_i16_lanes(builder, maddwd, acc16):
    """int32 sum of the 16 int16 lanes of acc16: widened pairwise by vpmaddwd (x 1), then 8 lanes added."""
    i32, v16i16 = ir.IntType(32), ir.VectorType(ir.IntType(16), 16)
    wide = builder.call(maddwd, [acc16, ir.Constant(v16i16, [1] * 16)])                       # [8] i32
    total = builder.extract_element(wide, ir.Constant(i32, 0))
    for lane in range(1, 8):
        total = builder.add(total, builder.extract_element(wide, ir.Constant(i32, lane)))
    return total


def _code_fields(builder, w):
    """The 4 code fields of a 32-byte chunk w (v32i8) as u8 vectors: field i = (w >> 2i) & 3, the codes c of
    k = 4j + i (the shift runs on 16-bit lanes; the & 3 drops what crosses in from the neighbouring byte)."""
    v32i8, v16i16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
    mask = ir.Constant(v32i8, [3] * 32)
    w16 = builder.bitcast(w, v16i16)
    return [builder.and_(w if i == 0 else builder.bitcast(builder.lshr(w16, ir.Constant(v16i16, [2 * i] * 16)), v32i8),
                         mask) for i in range(4)]


@intrinsic
def block_dot(typingctx, row, planes, chunk0, nchunks):
    """sum over chunks chunk0 .. chunk0+nchunks-1 (nchunks <= 15) of sum c x: row uint8 [K/4] (one row),
    planes int8 [4, K/4] (one token) -> int32. No bounds checks: the caller keeps chunks inside the row."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(planes, types.Array)
            and planes.dtype == types.int8 and planes.ndim == 2):
        return None
    sig = types.int32(row, planes, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_a = context.make_array(signature.args[0])(context, builder, args[0])
        pl_a = context.make_array(signature.args[1])(context, builder, args[1])
        chunk0, nchunks = args[2], args[3]
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
        module = builder.module
        maddubs, maddwd = _avx2_madd_intrinsics(module)
        plane_stride = builder.extract_value(pl_a.strides, 0)            # bytes between planes (= K/4)
        row_ptr = builder.bitcast(row_a.data, i8.as_pointer())
        pl_ptr = builder.bitcast(pl_a.data, i8.as_pointer())
        acc_ptr = cgutils.alloca_once_value(builder, ir.Constant(v16i16, None))
        with cgutils.for_range(builder, nchunks) as loop:
            offset = builder.mul(builder.add(chunk0, loop.index), ir.Constant(chunk0.type, CHUNK))
            w = builder.load(builder.bitcast(builder.gep(row_ptr, [offset]), v32i8.as_pointer()), align=1)
            fields = _code_fields(builder, w)
            total = None
            for i in range(4):
                poff = builder.add(builder.mul(plane_stride, ir.Constant(plane_stride.type, i)), offset)
                x = builder.load(builder.bitcast(builder.gep(pl_ptr, [poff]), v32i8.as_pointer()), align=1)
                p = builder.call(maddubs, [fields[i], x])
                total = p if total is None else builder.add(total, p)
            builder.store(builder.add(builder.load(acc_ptr), total), acc_ptr)
        return _sum_i16_lanes(builder, maddwd, builder.load(acc_ptr))
    return sig, codegen


@njit(cache=True, inline="always")
def dot_row(row, pl):
    """row uint8 [K/4], pl int8 [4, K/4] (K/4 % 32 == 0) -> sum_k c x, int32."""
    n_chunks = row.shape[0] // CHUNK
    acc = np.int32(0)
    for c0 in range(0, n_chunks, CHUNKS_PER_BLOCK):
        acc += block_dot(row, pl, c0, min(CHUNKS_PER_BLOCK, n_chunks - c0))
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


@intrinsic
def block_dot2(typingctx, row, planes_a, planes_b, chunk0, nchunks):
    """block_dot for two tokens at once: each field of the weight chunk is extracted once and multiplied
    with both tokens' planes -> (sum c x_a, sum c x_b), int32 each."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(planes_a, types.Array)
            and planes_a.dtype == types.int8 and planes_a.ndim == 2 and planes_b == planes_a):
        return None
    ret = types.UniTuple(types.int32, 2)
    sig = ret(row, planes_a, planes_b, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_a = context.make_array(signature.args[0])(context, builder, args[0])
        pa = context.make_array(signature.args[1])(context, builder, args[1])
        pb = context.make_array(signature.args[2])(context, builder, args[2])
        chunk0, nchunks = args[3], args[4]
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
        module = builder.module
        maddubs, maddwd = _avx2_madd_intrinsics(module)
        row_ptr = builder.bitcast(row_a.data, i8.as_pointer())
        ptrs = [(builder.bitcast(p.data, i8.as_pointer()), builder.extract_value(p.strides, 0)) for p in (pa, pb)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16i16, None)) for _ in range(2)]
        with cgutils.for_range(builder, nchunks) as loop:
            offset = builder.mul(builder.add(chunk0, loop.index), ir.Constant(chunk0.type, CHUNK))
            w = builder.load(builder.bitcast(builder.gep(row_ptr, [offset]), v32i8.as_pointer()), align=1)
            fields = _code_fields(builder, w)
            for (ptr, stride), acc_ptr in zip(ptrs, accs):
                total = None
                for i in range(4):
                    poff = builder.add(builder.mul(stride, ir.Constant(stride.type, i)), offset)
                    x = builder.load(builder.bitcast(builder.gep(ptr, [poff]), v32i8.as_pointer()), align=1)
                    p = builder.call(maddubs, [fields[i], x])
                    total = p if total is None else builder.add(total, p)
                builder.store(builder.add(builder.load(acc_ptr), total), acc_ptr)
        results = [_sum_i16_lanes(builder, maddwd, builder.load(acc_ptr)) for acc_ptr in accs]
        return context.make_tuple(builder, signature.return_type, results)
    return sig, codegen


@njit(cache=True, inline="always")
def dot_row2(row, pa, pb):
    """dot_row for two tokens' planes pa, pb -> (sum c x_a, sum c x_b)."""
    n_chunks = row.shape[0] // CHUNK
    acc_a = np.int32(0)
    acc_b = np.int32(0)
    for c0 in range(0, n_chunks, CHUNKS_PER_BLOCK):
        a, b = block_dot2(row, pa, pb, c0, min(CHUNKS_PER_BLOCK, n_chunks - c0))
        acc_a += a
        acc_b += b
    return acc_a, acc_b


@njit(cache=True, parallel=True)
def matmul_scaled_v4_pairs(packed, planes, xsum, s_act, row_scale, out):
    """matmul_scaled_v4 for S >= 2 (prefill): tokens in pairs share each weight chunk's field extraction."""
    N = packed.shape[0]
    S = planes.shape[0]
    for task in prange((N + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for s in range(0, S - 1, 2):
            for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
                a, b = dot_row2(packed[n], planes[s], planes[s + 1])
                ya = np.float32(np.float32(a - xsum[s]) / s_act[s])
                yb = np.float32(np.float32(b - xsum[s + 1]) / s_act[s + 1])
                out[s, n] = np.float32(ya * row_scale[n])
                out[s + 1, n] = np.float32(yb * row_scale[n])
        if S % 2 == 1:
            s = S - 1
            for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
                acc = dot_row(packed[n], planes[s]) - xsum[s]
                y = np.float32(np.float32(acc) / s_act[s])
                out[s, n] = np.float32(y * row_scale[n])


# ----------------------------------------------------------------------------- prefill: 4 tokens per pass
# The pair kernel above still spends, per token and chunk, 4 plane loads + 4 vpmaddubsw + 4 adds next to
# the shared 8-instruction field extraction, and its plane loads come from 8 separate pointers that LLVM
# keeps shuffling between registers. Here TOKENS_PER_PASS = 4 tokens are register-blocked (one int16
# accumulator register each; 4 field registers, the mask: <= 16 ymm registers), and their activations
# are stored chunk-interleaved, so that all 16 plane loads of one chunk sit at constant offsets from one
# pointer:
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
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
        module = builder.module
        maddubs, maddwd = _avx2_madd_intrinsics(module)
        block_stride = builder.extract_value(bl_a.strides, 0)
        chunk_stride = builder.extract_value(bl_a.strides, 1)           # = 4 * 4 * 32 bytes
        row_ptr = builder.bitcast(row_a.data, i8.as_pointer())
        base = builder.gep(builder.bitcast(bl_a.data, i8.as_pointer()), [builder.mul(b, block_stride)])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16i16, None)) for _ in range(TOKENS_PER_PASS)]
        with cgutils.for_range(builder, nchunks) as loop:
            chunk = builder.add(chunk0, loop.index)
            w_ptr = builder.gep(row_ptr, [builder.mul(chunk, ir.Constant(chunk.type, CHUNK))])
            w = builder.load(builder.bitcast(w_ptr, v32i8.as_pointer()), align=1)
            fields = _code_fields(builder, w)
            x_ptr = builder.bitcast(builder.gep(base, [builder.mul(chunk, chunk_stride)]), v32i8.as_pointer())
            for t, acc_ptr in enumerate(accs):
                total = None
                for i in range(4):
                    x = builder.load(builder.gep(x_ptr, [ir.Constant(i32, 4 * t + i)]), align=1)
                    p = builder.call(maddubs, [fields[i], x])
                    total = p if total is None else builder.add(total, p)
                builder.store(builder.add(builder.load(acc_ptr), total), acc_ptr)
        results = [_sum_i16_lanes(builder, maddwd, builder.load(acc_ptr)) for acc_ptr in accs]
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
                for c0 in range(0, n_chunks, CHUNKS_PER_BLOCK):
                    p0, p1, p2, p3 = block_dot4(row, blocks, b, c0, min(CHUNKS_PER_BLOCK, n_chunks - c0))
                    a0 += p0
                    a1 += p1
                    a2 += p2
                    a3 += p3
                for t in range(n_tok):
                    a = a0 if t == 0 else (a1 if t == 1 else (a2 if t == 2 else a3))
                    y = np.float32(np.float32(a - xsum[s0 + t]) / s_act[s0 + t])
                    out[s0 + t, n] = np.float32(y * row_scale[n])
