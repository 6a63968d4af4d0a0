"""v5: the prefill GEMM (S tokens at once) near the vpmaddubsw peak: unpacked code panels, 1 row x 8 tokens.

Why: prefill multiplies the same weights by S (e.g. 128) tokens, so it can be compute-bound instead of
memory-bound. On the development machine (AMD Zen 3, ~3.2 GHz, AVX2, no VNNI) vpmaddubsw on ymm has a
throughput of 2 per cycle, i.e. 64 int8 products per cycle per core. A 128-weight chunk (32 packed bytes)
of one row times one token is 4 vpmaddubsw, so the floor is 2 cycles per (token, chunk); each product also
needs one vpaddw into an int16 accumulator, and with those on the same 4 vector pipes a probe of independent
vpmaddubsw + vpaddw chains runs at 0.63 cycles per vpmaddubsw, i.e. ~2.5 cycles per (token, chunk).
v4's 4-token blocked GEMM (``v4_maddubs.matmul_scaled_v4_blocked``) spends ~4 cycles there (0.95-1.0 cycles
per vpmaddubsw):
  - per chunk it re-extracts the 4 code fields (1 load, 3 shifts, 4 ands) for only 4 tokens;
  - every 15 chunks (the int16 bound) each token's accumulator is reduced to a scalar (~16 instructions);
  - each vpmaddubsw reads its activation operand from memory; 16 loads + 16 vpmaddubsw + 16 vpaddw + 8
    extraction ops per 4 (token, chunk) pairs.
The target of a 128-token GEMM at >= 4x the tokens/s of the memory-bound GEMV (2 threads) needs
about 3.1 cycles per (token, chunk) per core (0.77 per vpmaddubsw) if the GEMV takes 0.27 ms (gate/up).

What v5 does:
1. Unpacked panels. For a tile of TILE_ROWS = 64 rows and a panel of PANEL_CHUNKS = 20 chunks (2560
   weights), the packed codes are unpacked ONCE into a uint8 scratch of codes c = w + 1 in {0, 1, 2}:
   codes[r, 128 ch + 32 i + j] = field i of byte 32 ch + j of the row (what v4 extracts with shift + and;
   ``unpack_panel``). The scratch (64 x 2560 bytes = 160 KB, in L2) is reused by every token of the
   prefill, so unpacking costs 1/S of what v4 pays per token.
2. Register tile of ROWS = 1 row x TOKENS = 8 tokens (``panel_dot``): per chunk and field, the row's code
   vector is loaded into a register (the unsigned operand of vpmaddubsw must be one) and multiplied with
   the 8 tokens' activation vectors, which vpmaddubsw reads straight from memory, into 8 int16
   accumulators: per (token, chunk) 4 vpmaddubsw (each with its load) + 4 vpaddw + 0.5 loads of codes,
   10 of the 16 ymm registers, no spills. (2 rows x 4 tokens, loading the 4 activation vectors once for
   both rows, needs 14 registers, LLVM spills 3 of them, and measured ~3% slower; 4 x 2 ~10% slower.)
   Activations are chunk-interleaved per 8-token block, so the 32 activation vectors of a chunk sit at
   constant offsets from one pointer:
       blocks int8 [B, C, 8, 4, 32], B = ceil(S/8), C = K/128: blocks[b, c, t, i, j] = xq[8b + t, 4(32c + j) + i]
   (tokens past S are zeros; their outputs are not written); a panel of a token block (8 x 2560 bytes =
   20 KB) stays in L1 while the 64 rows of the tile pass over it (more rows per tile = fewer reloads of
   it from L2: 16 rows 0.79, 64 rows 0.74 cycles per vpmaddubsw on gate/up).
3. No scalar reduction every 15 chunks: there the 8 int16 accumulators are widened exactly with
   vpmaddwd(acc, 1) into 8 int32 vectors (16 instructions per 15 chunks), and once per panel the 8 int32
   vectors are summed horizontally all at once (a vphaddd tree + one cross-lane add, ~20 instructions) and
   added to the tile's int32 accumulator acc[token, row] in memory.
4. Loop order per tile: panel -> unpack -> token block -> row; the packed rows of the thread's next tile
   are prefetched; one task per thread over a contiguous range of tiles, with its scratch allocated once
   per call. The epilogue converts 8 rows at a time (vcvtdq2ps, vdivps, vmulps).
Measured (128 tokens, 1 thread, best of 10 interleaved rounds, cycles per vpmaddubsw at 3.18 GHz): v4
blocked 0.95-1.07; this kernel 0.73-0.77 (k/v, gate/up, q/o 0.73-0.74, down 0.77); the 2 x 4 register
loop alone, everything in L1, 0.70-0.74; a probe of independent vpmaddubsw + vpaddw pairs 0.63 (the adds
share the 4 vector pipes with the multiplies, which only 2 of them execute). Few tokens: a call costs the
unpacking plus a whole 8-token block, so for S <= 4 v4 blocked is ~2x faster, S = 6-12 about even, S = 16
and more v5 ~1.25-1.45x faster (gate/up, 1 thread). runtime.PackedLinear runs v5 for S > 4 (through
PackedLinear at 2 threads, gate/up: S = 2-4 v4 blocked 0.35 ms vs v5 0.75 ms; S = 8 0.81 vs 0.70 ms).

Exactness: integers only. Each vpmaddubsw pair sum is |c[2m] x[2m] + c[2m+1] x[2m+1]| <= 2*2*128 = 512
(no saturation); 4 fields per chunk add <= 2048 to an int16 lane, WIDEN_CHUNKS = 15 chunks <= 30720 < 32768,
so the int16 accumulators never wrap before they are widened. vpmaddwd by ones and the int32 sums are
exact (|sum c x| <= 256 K < 2**31 for K <= 131072). acc = sum c x - sum x = sum w x, then the float32
epilogue fl(fl(float32(acc) / s_act) * row_scale): the same integers and operations as matmul_scaled_v4
and refbitnet.kernels.reference, so bit-identical outputs, for any thread count (each output is computed
by one thread in a fixed order).
"""

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..errors import RefBitNetError
from ..quant import absmax_int8
from . import _array, _check_scales, _check_ternary_operands
from .act_quant import quantize_token_blocks         # writes the 8-token blocks this GEMM reads
from .v4_maddubs import CHUNK, _avx2_madd_intrinsics, available

FIELDS = 4                 # 2-bit codes per packed byte
CHUNK_WEIGHTS = FIELDS * CHUNK   # 128 weights (one chunk: 32 packed bytes, 4 field vectors)
WIDEN_CHUNKS = 15          # int16 bound: 15 chunks * 4 fields * 512 = 30720 < 32768, then widen to int32
ROWS = 1                   # register tile: rows ...
TOKENS = 8                 # ... x tokens (8 int16 accumulators; ROWS * TOKENS == 8)
TILE_ROWS = 64             # rows per tile (measured 16-96 rows x 15/20/30-chunk panels: 48-96 x 20 best)
PANEL_CHUNKS = 20          # chunks per unpacked panel: 64 x 2560 bytes of codes (160 KB, in L2)
ALIGN = 64                 # bytes: a 32-byte load never straddles two cache lines (a misaligned blocks
                           # buffer measured 5-7% slower)


# ------------------------------------------------------------------------------------------ intrinsics
@intrinsic
def unpack_panel(typingctx, packed, n0, rows, c0, nch, codes):
    """codes[r, 128 ch + 32 i + j] = (packed[n0 + r, 32 (c0 + ch) + j] >> 2i) & 3 for r < rows, ch < nch:
    packed uint8 [N, K/4], codes uint8 [>= rows, >= 128 nch]. No bounds checks."""
    if not (isinstance(packed, types.Array) and packed.dtype == types.uint8 and isinstance(codes, types.Array)
            and codes.dtype == types.uint8):
        return None
    sig = types.void(packed, types.intp, types.intp, types.intp, types.intp, codes)

    def codegen(context, builder, signature, args):
        pk = context.make_array(signature.args[0])(context, builder, args[0])
        cd = context.make_array(signature.args[5])(context, builder, args[5])
        n0, rows, c0, nch = args[1], args[2], args[3], args[4]
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
        intp = n0.type
        pk_stride = builder.extract_value(pk.strides, 0)
        cd_stride = builder.extract_value(cd.strides, 0)
        pk_ptr = builder.bitcast(pk.data, i8.as_pointer())
        cd_ptr = builder.bitcast(cd.data, i8.as_pointer())
        mask = ir.Constant(v32i8, [3] * 32)
        with cgutils.for_range(builder, rows) as rl:
            src_row = builder.gep(pk_ptr, [builder.mul(builder.add(n0, rl.index), pk_stride)])
            dst_row = builder.gep(cd_ptr, [builder.mul(rl.index, cd_stride)])
            with cgutils.for_range(builder, nch) as cl:
                src = builder.gep(src_row, [builder.mul(builder.add(c0, cl.index), ir.Constant(intp, CHUNK))])
                w = builder.load(builder.bitcast(src, v32i8.as_pointer()), align=1)
                w16 = builder.bitcast(w, v16i16)
                dst = builder.gep(dst_row, [builder.mul(cl.index, ir.Constant(intp, CHUNK_WEIGHTS))])
                for i in range(FIELDS):
                    f = w if i == 0 else builder.bitcast(builder.lshr(w16, ir.Constant(v16i16, [2 * i] * 16)), v32i8)
                    f = builder.and_(f, mask)
                    out = builder.gep(dst, [ir.Constant(intp, CHUNK * i)])
                    builder.store(f, builder.bitcast(out, v32i8.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


def _hsum8(builder, vectors):
    """8 vectors <8 x i32> -> one <8 x i32> whose lane k is the sum of the 8 lanes of vectors[k]."""
    i32 = ir.IntType(32)
    v8i32 = ir.VectorType(i32, 8)
    phadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [v8i32, v8i32]),
                                           "llvm.x86.avx2.phadd.d")
    # phadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7] (per 128-bit half)
    h = [builder.call(phadd, [vectors[2 * k], vectors[2 * k + 1]]) for k in range(4)]
    g = [builder.call(phadd, [h[0], h[1]]), builder.call(phadd, [h[2], h[3]])]
    # g[0] = [lo(v0), lo(v1), lo(v2), lo(v3) | hi(v0), .., hi(v3)], lo/hi = sum of lanes 0-3 / 4-7
    lo = builder.shuffle_vector(g[0], g[1], ir.Constant(v8i32, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(g[0], g[1], ir.Constant(v8i32, [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.add(lo, hi)


@intrinsic
def panel_dot(typingctx, codes, r0, blocks, b, c0, nch, acc):
    """acc[T b + t, r0 + r] += sum of c x over chunks c0 .. c0+nch-1, for the rows r0 + r (r < ROWS) of the
    unpacked codes uint8 [tile rows, >= 128 nch] (chunk c0 + ch at column 128 ch) and the tokens T b + t
    (t < T = TOKENS) of blocks int8 [B, C, T, 4, 32]; acc int32 [T B, tile rows]. The int16 accumulators
    are widened into int32 ones every WIDEN_CHUNKS chunks. No bounds checks."""
    if not (isinstance(codes, types.Array) and codes.dtype == types.uint8 and isinstance(blocks, types.Array)
            and blocks.dtype == types.int8 and blocks.ndim == 5 and isinstance(acc, types.Array)
            and acc.dtype == types.int32 and acc.ndim == 2):
        return None
    sig = types.void(codes, types.intp, blocks, types.intp, types.intp, types.intp, acc)

    def codegen(context, builder, signature, args):
        cd = context.make_array(signature.args[0])(context, builder, args[0])
        bl = context.make_array(signature.args[2])(context, builder, args[2])
        ac = context.make_array(signature.args[6])(context, builder, args[6])
        r0, b, c0, nch = args[1], args[3], args[4], args[5]
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        v32i8, v16i16, v8i32 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
        intp = r0.type
        maddubs, maddwd = _avx2_madd_intrinsics(builder.module)
        cd_stride = builder.extract_value(cd.strides, 0)
        code_rows = [builder.gep(builder.bitcast(cd.data, i8.as_pointer()),
                                 [builder.mul(builder.add(r0, ir.Constant(intp, r)), cd_stride)]) for r in range(ROWS)]
        block_stride = builder.extract_value(bl.strides, 0)
        chunk_stride = builder.extract_value(bl.strides, 1)          # = T tokens * 4 fields * 32 bytes
        x_base = builder.gep(builder.bitcast(bl.data, i8.as_pointer()),
                             [builder.add(builder.mul(b, block_stride), builder.mul(c0, chunk_stride))])
        # accs[ROWS * t + r]: int16 lanes of (token t, row r), 8 registers; wides: their int32 widening
        assert ROWS * TOKENS == 8                                     # one register per (row, token), _hsum8
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16i16, None)) for _ in range(ROWS * TOKENS)]
        wides = [cgutils.alloca_once_value(builder, ir.Constant(v8i32, None)) for _ in range(ROWS * TOKENS)]
        ones = ir.Constant(v16i16, [1] * 16)
        panel = ir.Constant(intp, WIDEN_CHUNKS)
        n_panels = builder.udiv(builder.add(nch, ir.Constant(intp, WIDEN_CHUNKS - 1)), panel)
        with cgutils.for_range(builder, n_panels) as pl:
            p0 = builder.mul(pl.index, panel)
            left = builder.sub(nch, p0)
            count = builder.select(builder.icmp_signed("<", left, panel), left, panel)
            for a in accs:
                builder.store(ir.Constant(v16i16, None), a)
            with cgutils.for_range(builder, count) as loop:
                ch = builder.add(p0, loop.index)
                w_off = builder.mul(ch, ir.Constant(intp, CHUNK_WEIGHTS))
                x_chunk = builder.bitcast(builder.gep(x_base, [builder.mul(ch, chunk_stride)]), v32i8.as_pointer())
                for i in range(FIELDS):
                    off = builder.add(w_off, ir.Constant(intp, CHUNK * i))
                    w = [builder.load(builder.bitcast(builder.gep(row, [off]), v32i8.as_pointer()), align=1)
                         for row in code_rows]                                # field i of the chunk, ROWS rows
                    for t in range(TOKENS):
                        x = builder.load(builder.gep(x_chunk, [ir.Constant(i32, FIELDS * t + i)]), align=1)
                        for r in range(ROWS):
                            a = accs[ROWS * t + r]
                            builder.store(builder.add(builder.load(a), builder.call(maddubs, [w[r], x])), a)
            for a, wd in zip(accs, wides):                                    # int16 -> int32, exact
                builder.store(builder.add(builder.load(wd), builder.call(maddwd, [builder.load(a), ones])), wd)
        sums = _hsum8(builder, [builder.load(wd) for wd in wides])           # [8] i32, lane ROWS * t + r
        acc_row_stride = builder.extract_value(ac.strides, 0)
        acc_ptr = builder.bitcast(ac.data, i8.as_pointer())
        for t in range(TOKENS):
            for r in range(ROWS):                                              # acc[T b + t, r0 + r] += lane
                row = builder.add(builder.mul(b, ir.Constant(intp, TOKENS)), ir.Constant(intp, t))
                col = builder.add(r0, ir.Constant(intp, r))
                off = builder.add(builder.mul(row, acc_row_stride), builder.mul(col, ir.Constant(intp, 4)))
                dst = builder.bitcast(builder.gep(acc_ptr, [off]), i32.as_pointer())
                lane = builder.extract_element(sums, ir.Constant(i32, ROWS * t + r))
                builder.store(builder.add(builder.load(dst), lane), dst)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def prefetch_rows(typingctx, packed, n0, rows):
    """Prefetch rows n0 .. n0+rows-1 of packed uint8 [N, K/4] into the caches (no fault if out of range)."""
    if not (isinstance(packed, types.Array) and packed.dtype == types.uint8):
        return None
    sig = types.void(packed, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        pk = context.make_array(signature.args[0])(context, builder, args[0])
        n0, rows = args[1], args[2]
        i8, i32 = ir.IntType(8), ir.IntType(32)
        intp = n0.type
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch")
        stride = builder.extract_value(pk.strides, 0)
        start = builder.gep(builder.bitcast(pk.data, i8.as_pointer()), [builder.mul(n0, stride)])
        lines = builder.udiv(builder.add(builder.mul(rows, stride), ir.Constant(intp, 63)), ir.Constant(intp, 64))
        with cgutils.for_range(builder, lines) as loop:
            builder.call(prefetch, [builder.gep(start, [builder.mul(loop.index, ir.Constant(intp, 64))]),
                                    ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def epilogue8(typingctx, acc, s, r, xs, sa, row_scale, n, out):
    """out[s, n + j] = fl(fl(float32(acc[s, r + j] - xs) / sa) * row_scale[n + j]) for j < 8, in 8 float32
    lanes (vcvtdq2ps, vdivps, vmulps: the same IEEE operations as the scalar expression, so the same bits).
    acc int32 [.., ..], row_scale f32 [N], out f32 [S, N]. No bounds checks."""
    if not (isinstance(acc, types.Array) and acc.dtype == types.int32 and acc.ndim == 2
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.ndim == 2
            and isinstance(row_scale, types.Array) and row_scale.dtype == types.float32):
        return None
    sig = types.void(acc, types.intp, types.intp, types.int32, types.float32, row_scale, types.intp, out)

    def codegen(context, builder, signature, args):
        ac = context.make_array(signature.args[0])(context, builder, args[0])
        rs = context.make_array(signature.args[5])(context, builder, args[5])
        ot = context.make_array(signature.args[7])(context, builder, args[7])
        s_, r, xs, sa, n = args[1], args[2], args[3], args[4], args[6]
        i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
        v8i32, v8f32 = ir.VectorType(i32, 8), ir.VectorType(f32, 8)
        intp = r.type
        four = ir.Constant(intp, 4)

        def at(arr, row, col):          # byte address of arr[row, col] for a 4-byte dtype
            off = builder.add(builder.mul(row, builder.extract_value(arr.strides, 0)), builder.mul(col, four))
            return builder.gep(builder.bitcast(arr.data, i8.as_pointer()), [off])

        def splat(value, vtype):
            v = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, v, ir.Constant(v8i32, [0] * 8))

        a = builder.load(builder.bitcast(at(ac, s_, r), v8i32.as_pointer()), align=4)
        y = builder.fdiv(builder.sitofp(builder.sub(a, splat(xs, v8i32)), v8f32), splat(sa, v8f32))
        scale_ptr = builder.gep(builder.bitcast(rs.data, f32.as_pointer()), [n])
        y = builder.fmul(y, builder.load(builder.bitcast(scale_ptr, v8f32.as_pointer()), align=4))
        builder.store(y, builder.bitcast(at(ot, s_, n), v8f32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


# ---------------------------------------------------------------------------------------------- kernel
def matmul_scaled_v5(packed, blocks, xsum, s_act, row_scale, out, tile_rows=TILE_ROWS, panel_chunks=PANEL_CHUNKS):
    """packed uint8 [N, K/4] (kernel layout), blocks int8 [ceil(S/8), K/128, 8, 4, 32] (see above), xsum
    int32 [S], s_act f32 [S], row_scale f32 [N] -> out f32 [S, N] = fl(fl(float32(acc) / s_act[s]) *
    row_scale[n]), acc = xq @ w.T exactly, on get_num_threads() threads. tile_rows >= 1 rows per tile,
    panels of panel_chunks >= 1 chunks (the defaults are the measured best). No checks: call
    ``ternary_matmul_v5`` / ``prefill_matmul`` unless the operands are known good."""
    _matmul_v5(packed, blocks, xsum, s_act, row_scale, out, tile_rows, panel_chunks, get_num_threads())


@njit(cache=True, parallel=True)
def _matmul_v5(packed, blocks, xsum, s_act, row_scale, out, tile_rows, panel_chunks, threads):
    """matmul_scaled_v5 on `threads` parallel tasks (the thread count is passed in: calling
    get_num_threads() here would keep Numba from caching the compiled code)."""
    N = packed.shape[0]
    n_chunks = packed.shape[1] // CHUNK
    B = blocks.shape[0]
    width = min(panel_chunks, n_chunks) * CHUNK_WEIGHTS
    pad_rows = -(-tile_rows // ROWS) * ROWS                     # whole register tiles (zero rows pad the last)
    n_tiles = (N + tile_rows - 1) // tile_rows
    workers = max(1, min(threads, n_tiles))
    # One parallel task per thread, each over a contiguous range of tiles with its own scratch, allocated
    # once per call (a 120 KB allocation per tile costs its zeroing, and, depending on the allocator's
    # state, page faults: measured up to 2x slower).
    for w in prange(workers):
        buf = np.empty(pad_rows * width + ALIGN, np.uint8)
        a0 = (ALIGN - buf.ctypes.data % ALIGN) % ALIGN                          # 64-byte aligned codes
        codes = buf[a0:a0 + pad_rows * width].reshape(pad_rows, width)          # [tile rows, panel weights]
        acc = np.empty((TOKENS * B, pad_rows), np.int32)                        # [tokens, tile rows]
        for tile in range(w * n_tiles // workers, (w + 1) * n_tiles // workers):
            _tile(packed, blocks, xsum, s_act, row_scale, out, tile * tile_rows, tile_rows, panel_chunks, codes, acc)


@njit(cache=True)
def _tile(packed, blocks, xsum, s_act, row_scale, out, n0, tile_rows, panel_chunks, codes, acc):
    """Rows n0 .. n0+tile_rows-1 (clipped to N) of matmul_scaled_v5, with the caller's scratch codes uint8
    [pad rows, panel weights] and acc int32 [T B, pad rows]."""
    N = packed.shape[0]
    S = out.shape[0]
    n_chunks = packed.shape[1] // CHUNK
    B = blocks.shape[0]
    rows = min(tile_rows, N - n0)
    codes[rows:] = 0                                                            # padding rows of a tile
    acc[:] = 0
    if n0 + tile_rows < N:                                                      # this thread's next tile
        prefetch_rows(packed, n0 + tile_rows, min(tile_rows, N - n0 - tile_rows))
    for c0 in range(0, n_chunks, panel_chunks):
        nch = min(panel_chunks, n_chunks - c0)
        unpack_panel(packed, n0, rows, c0, nch, codes)
        for b in range(B):
            for r0 in range(0, rows, ROWS):
                panel_dot(codes, r0, blocks, b, c0, nch, acc)
    for s in range(S):
        xs = xsum[s]
        sa = s_act[s]
        for r8 in range(0, rows - 7, 8):
            epilogue8(acc, s, r8, xs, sa, row_scale, n0 + r8, out)        # 8 rows in one vdivps
        for r in range(rows - rows % 8, rows):
            y = np.float32(np.float32(np.int32(acc[s, r] - xs)) / sa)
            out[s, n0 + r] = np.float32(y * row_scale[n0 + r])


# ------------------------------------------------------------------------------------------ activations
def empty_token_blocks(S: int, K: int) -> np.ndarray:
    """An uninitialized, 64-byte aligned int8 [ceil(S/8), K/128, 8, 4, 32] buffer for ``quantize_token_blocks``
    (np.empty of a large array is typically only 16-byte aligned)."""
    shape = ((S + TOKENS - 1) // TOKENS, K // CHUNK_WEIGHTS, TOKENS, FIELDS, CHUNK)
    n = int(np.prod(shape))
    raw = np.empty(n + ALIGN, np.int8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].reshape(shape)


def pack_token_blocks(xq: np.ndarray) -> np.ndarray:
    """The readable layout: xq int8 [S, K] (K % 128 == 0) -> blocks int8 [B, K/128, 8, 4, 32], B = ceil(S/8),
    blocks[b, c, t, i, j] = xq[8b + t, 4(32c + j) + i]; the tokens of the last block past S are zeros."""
    S, K = xq.shape
    padded = np.zeros((-(-S // TOKENS) * TOKENS, K), np.int8)           # [8B, K]
    padded[:S] = xq
    blocks = empty_token_blocks(S, K)
    # [8B, K] -> [B, 8 (t), C, 32 (j), 4 (i)] -> [B, C, t, i, j]
    blocks[...] = padded.reshape(-1, TOKENS, K // CHUNK_WEIGHTS, CHUNK, FIELDS).transpose(0, 2, 1, 4, 3)
    return blocks


# --------------------------------------------------------------------------------------------- wrappers
def _check_v5_k(K):
    if K % CHUNK_WEIGHTS != 0:
        raise RefBitNetError(f"xq: v5 reads 128-weight chunks (32 packed bytes) and needs K % 128 == 0, found K = {K}")
    if not available():
        raise RefBitNetError("v5_prefill needs AVX2 (vpmaddubsw), which this CPU does not report")


def ternary_matmul_v5(xq: np.ndarray, s: np.ndarray, packed: np.ndarray, weight_scale) -> np.ndarray:
    """BitLinear on int8 activations with the v5 GEMM: xq int8 [S, K] (K % 128 == 0), s float32 [S], packed
    uint8 [N, K/4] (layouts.pack_kernel), weight_scale float32 scalar / [1] / [N] -> y float32 [S, N] =
    fl(fl(float32(acc) / s) * weight_scale), bit-identical to kernels.ternary_matmul."""
    xq, packed = _check_ternary_operands(xq, packed)
    S, K = xq.shape
    _check_v5_k(K)
    s, row_scale = _check_scales(s, weight_scale, S, packed.shape[0])
    xsum = xq.astype(np.int64).sum(axis=1).astype(np.int32)        # |sum| <= 128 K < 2**31
    out = np.empty((S, packed.shape[0]), np.float32)
    matmul_scaled_v5(packed, pack_token_blocks(xq), xsum, s, row_scale, out, TILE_ROWS, PANEL_CHUNKS)
    return out


def prefill_matmul(x: np.ndarray, packed: np.ndarray, weight_scale) -> np.ndarray:
    """BitLinear from float activations (numerics "int"): x float32 [S, K] (K % 128 == 0), packed uint8
    [N, K/4], weight_scale float32 scalar / [1] / [N] -> y float32 [S, N]; quantize_token_blocks (absmax_int8's
    codes and scales) then matmul_scaled_v5. Equals bitlinear.bitlinear_int bit for bit."""
    x = _array(x, "x", np.float32, 2)
    packed = _array(packed, "packed", np.uint8, 2)
    S, K = x.shape
    _check_ternary_operands(np.empty((1, K), np.int8), packed)     # K/4 columns, K % 8, K <= MAX_K
    _check_v5_k(K)
    s = np.empty(S, np.float32)
    s, row_scale = _check_scales(s, weight_scale, S, packed.shape[0])
    blocks = empty_token_blocks(S, K)
    xsum = np.empty(S, np.int32)
    if quantize_token_blocks(x, s, blocks, xsum) >= 0:
        absmax_int8(x)                              # raises the quantizer's own error naming the NaN/inf
        raise RefBitNetError("x: expected finite values")              # (not reached)
    out = np.empty((S, packed.shape[0]), np.float32)
    matmul_scaled_v5(packed, blocks, xsum, s, row_scale, out, TILE_ROWS, PANEL_CHUNKS)
    return out
