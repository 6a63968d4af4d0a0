"""v5: the prefill GEMM (S tokens at once) near the vpmaddubsw peak: unpacked code panels, 1 row x 8 tokens.

Why: prefill multiplies the same weights by S (e.g. 128) tokens, so it is compute-bound, not memory-bound.
A 128-weight chunk (32 packed bytes) of one row times one token is 4 vpmaddubsw whatever the kernel, each
followed by one vpaddw into an int16 accumulator; the floor is those pairs at the core's issue rate
(benchmarks/bench_kernels.py measures it with a probe of independent pairs). v4's 4-token blocked GEMM
spends well above it, on three things this kernel removes:
  - per chunk it re-extracts the 4 code fields (1 load, 3 shifts, 4 ands), shared by only 4 tokens;
  - every 15 chunks (the int16 bound) it reduces each token's accumulator to a scalar (~16 instructions);
  - 16 activation loads, 16 vpmaddubsw, 16 vpaddw and 8 extraction ops per 4 (token, chunk) pairs.

What v5 does:
1. Unpacked panels. For a tile of TILE_ROWS = 64 rows and a panel of PANEL_CHUNKS = 20 chunks (2560
   weights), the packed codes are unpacked ONCE into a uint8 scratch of codes c = w + 1 in {0, 1, 2}:
   codes[r, 128 ch + 32 i + j] = field i of byte 32 ch + j of the row (``unpack_panel``, the same field
   extraction as v4). The scratch (64 x 2560 bytes = 160 KB, in L2) is reused by every token of the
   prefill, so unpacking costs 1/S of what v4 pays per token.
2. Register tile of ROWS = 1 row x TOKENS = 8 tokens (``panel_dot``): per chunk and field, the row's code
   vector is loaded into a register (the unsigned operand of vpmaddubsw must be one) and multiplied with
   the 8 tokens' activation vectors, which vpmaddubsw reads straight from memory, into 8 int16
   accumulators: per (token, chunk) 4 vpmaddubsw (each with its load) + 4 vpaddw + 0.5 loads of codes,
   10 of the 16 ymm registers, no spills (2 rows x 4 tokens needs 14 and LLVM spills). Activations are the
   8-token blocks of ``act_quant.token_blocks`` (``quantize_token_blocks``), so the 32 activation vectors
   of a chunk sit at constant offsets from one pointer; a panel of a token block (8 x 2560 bytes = 20 KB)
   stays in L1 while the 64 rows of the tile pass over it.
3. No scalar reduction every 15 chunks: there the 8 int16 accumulators are widened exactly with
   vpmaddwd(acc, 1) into 8 int32 vectors (16 instructions per 15 chunks), and once per panel the 8 int32
   vectors are summed horizontally all at once (``avx2.hsum8``) and added to the tile's int32 accumulator
   acc[token, row] in memory.
4. Loop order per tile: panel -> unpack -> token block -> row; the packed rows of the thread's next tile
   are prefetched; one task per thread over a contiguous range of tiles, with its scratch allocated once
   per call. The epilogue converts 8 rows at a time (vcvtdq2ps, vdivps, vmulps).
Few tokens: a call pays the unpacking and a whole 8-token block however many tokens it has, so
``TernaryLinear`` runs it for S > 4 only (v4 blocked below). The tile sizes, the crossover and the cycles
per vpmaddubsw against the probe are recorded in benchmarks/results/kernels_history.md.

Exactness: integers only. Each vpmaddubsw pair sum is |c[2m] x[2m] + c[2m+1] x[2m+1]| <= 2*2*128 = 512
(no saturation); 4 fields per chunk add <= 2048 to an int16 lane, WIDEN_CHUNKS = 15 chunks <= 30720 < 32768,
so the int16 accumulators never wrap before they are widened. vpmaddwd by ones and the int32 sums are
exact (|sum c x| <= 256 K < 2**31 for K <= 131072). acc = sum c x - sum x = sum w x, then the float32
epilogue fl(fl(float32(acc) / s_act) * row_scale): the same integers and operations as matmul_scaled_v4
and refbitnet.kernels.reference, so bit-identical outputs, for any thread count (each output is computed
by one thread in a fixed order). AVX2 and K % 128 == 0 only.

With AVX512-VNNI (``VNNI``) the inner sums use ``vpdpbusd`` instead (``_vnni_sums``): one instruction per
32 code bytes x 32 activation bytes into int32 lanes, no int16 accumulators and no widening; the same
integers, so the same outputs.
"""

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .act_quant import ALIGN
from .avx2 import (CHUNK, CHUNK_WEIGHTS, V8I32, V16I16, V32I8, WIDEN_CHUNKS, code_fields, hsum8, load32,
                   madd_intrinsics, prefetch, widen)
from .v6_vnni import available as vnni_available

FIELDS = 4                 # 2-bit codes per packed byte
ROWS = 1                   # register tile: rows ...
TOKENS = 8                 # ... x tokens (8 int16 accumulators; ROWS * TOKENS == 8)
TILE_ROWS = 64             # rows per tile: more rows reuse the 8-token activation panel in L1 longer
PANEL_CHUNKS = 20          # chunks per unpacked panel: 64 x 2560 bytes of codes (160 KB, in L2)
VNNI = vnni_available()    # sum with vpdpbusd (fixed when the kernel is compiled; Numba's cache is per CPU)


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
        i8 = ir.IntType(8)
        intp = n0.type
        pk_stride = builder.extract_value(pk.strides, 0)
        cd_stride = builder.extract_value(cd.strides, 0)
        pk_ptr = builder.bitcast(pk.data, i8.as_pointer())
        cd_ptr = builder.bitcast(cd.data, i8.as_pointer())
        with cgutils.for_range(builder, rows) as rl:
            src_row = builder.gep(pk_ptr, [builder.mul(builder.add(n0, rl.index), pk_stride)])
            dst_row = builder.gep(cd_ptr, [builder.mul(rl.index, cd_stride)])
            with cgutils.for_range(builder, nch) as cl:
                w = load32(builder, src_row, builder.mul(builder.add(c0, cl.index), ir.Constant(intp, CHUNK)))
                dst = builder.gep(dst_row, [builder.mul(cl.index, ir.Constant(intp, CHUNK_WEIGHTS))])
                for i, f in enumerate(code_fields(builder, w)):
                    out = builder.gep(dst, [ir.Constant(intp, CHUNK * i)])
                    builder.store(f, builder.bitcast(out, V32I8.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def panel_dot(typingctx, codes, r0, blocks, b, c0, nch, acc):
    """acc[T b + t, r0 + r] += sum of c x over chunks c0 .. c0+nch-1, for the rows r0 + r (r < ROWS) of the
    unpacked codes uint8 [tile rows, >= 128 nch] (chunk c0 + ch at column 128 ch) and the tokens T b + t
    (t < T = TOKENS) of blocks int8 [B, C, T, 4, 32]; acc int32 [T B, tile rows]. The products are summed
    by ``_vnni_sums`` where the CPU has AVX512-VNNI (VNNI), else ``_maddubs_sums``. No bounds checks."""
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
        i8, i32 = ir.IntType(8), ir.IntType(32)
        intp = r0.type
        cd_stride = builder.extract_value(cd.strides, 0)
        code_rows = [builder.gep(builder.bitcast(cd.data, i8.as_pointer()),
                                 [builder.mul(builder.add(r0, ir.Constant(intp, r)), cd_stride)]) for r in range(ROWS)]
        block_stride = builder.extract_value(bl.strides, 0)
        chunk_stride = builder.extract_value(bl.strides, 1)          # = T tokens * 4 fields * 32 bytes
        x_base = builder.gep(builder.bitcast(bl.data, i8.as_pointer()),
                             [builder.add(builder.mul(b, block_stride), builder.mul(c0, chunk_stride))])
        chunk_sums = _vnni_sums if VNNI else _maddubs_sums
        sums = chunk_sums(builder, code_rows, x_base, chunk_stride, nch)          # [8] i32, lane ROWS * t + r
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


def _maddubs_sums(builder, code_rows, x_base, chunk_stride, nch):
    """sum c x over nch chunks for the 8 (token, row) pairs of panel_dot, with vpmaddubsw into int16
    accumulators widened exactly every WIDEN_CHUNKS chunks: <8 x i32>, lane ROWS * t + r."""
    i32 = ir.IntType(32)
    intp = nch.type
    maddubs, maddwd = madd_intrinsics(builder.module)
    # accs[ROWS * t + r]: int16 lanes of (token t, row r), 8 registers; wides: their int32 widening
    assert ROWS * TOKENS == 8                                     # one register per (row, token), hsum8
    accs = [cgutils.alloca_once_value(builder, ir.Constant(V16I16, None)) for _ in range(ROWS * TOKENS)]
    wides = [cgutils.alloca_once_value(builder, ir.Constant(V8I32, None)) for _ in range(ROWS * TOKENS)]
    panel = ir.Constant(intp, WIDEN_CHUNKS)
    n_panels = builder.udiv(builder.add(nch, ir.Constant(intp, WIDEN_CHUNKS - 1)), panel)
    with cgutils.for_range(builder, n_panels) as pl:
        p0 = builder.mul(pl.index, panel)
        left = builder.sub(nch, p0)
        count = builder.select(builder.icmp_signed("<", left, panel), left, panel)
        for a in accs:
            builder.store(ir.Constant(V16I16, None), a)
        with cgutils.for_range(builder, count) as loop:
            ch = builder.add(p0, loop.index)
            w_off = builder.mul(ch, ir.Constant(intp, CHUNK_WEIGHTS))
            x_chunk = builder.bitcast(builder.gep(x_base, [builder.mul(ch, chunk_stride)]), V32I8.as_pointer())
            for i in range(FIELDS):
                off = builder.add(w_off, ir.Constant(intp, CHUNK * i))
                w = [load32(builder, row, off) for row in code_rows]     # field i of the chunk, ROWS rows
                for t in range(TOKENS):
                    x = builder.load(builder.gep(x_chunk, [ir.Constant(i32, FIELDS * t + i)]), align=1)
                    for r in range(ROWS):
                        a = accs[ROWS * t + r]
                        builder.store(builder.add(builder.load(a), builder.call(maddubs, [w[r], x])), a)
        for a, wd in zip(accs, wides):                                    # int16 -> int32, exact
            builder.store(builder.add(builder.load(wd), widen(builder, maddwd, builder.load(a))), wd)
    return hsum8(builder, [builder.load(wd) for wd in wides])


def _vnni_sums(builder, code_rows, x_base, chunk_stride, nch):
    """_maddubs_sums with vpdpbusd (AVX512-VNNI): each instruction multiplies 32 code bytes by 32 activation
    bytes and adds groups of 4 products into int32 lanes, so one instruction replaces vpmaddubsw + vpaddw
    and the int32 accumulators need no widening (|sum c x| <= 256 K < 2**31). Two sets of accumulators
    (even and odd fields) overlap its latency. The same integers, so the same bits."""
    i32 = ir.IntType(32)
    intp = nch.type
    dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V8I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
    assert ROWS * TOKENS == 8
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(V8I32, None)) for _ in range(ROWS * TOKENS)]
            for _ in range(2)]
    with cgutils.for_range(builder, nch) as loop:
        w_off = builder.mul(loop.index, ir.Constant(intp, CHUNK_WEIGHTS))
        x_chunk = builder.bitcast(builder.gep(x_base, [builder.mul(loop.index, chunk_stride)]), V8I32.as_pointer())
        for i in range(FIELDS):
            off = builder.add(w_off, ir.Constant(intp, CHUNK * i))
            w = [builder.bitcast(load32(builder, row, off), V8I32) for row in code_rows]
            for t in range(TOKENS):
                x = builder.load(builder.gep(x_chunk, [ir.Constant(i32, FIELDS * t + i)]), align=1)
                for r in range(ROWS):
                    a = accs[i % 2][ROWS * t + r]
                    builder.store(builder.call(dpbusd, [builder.load(a), w[r], x]), a)
    return hsum8(builder, [builder.add(builder.load(a), builder.load(b)) for a, b in zip(*accs)])


@intrinsic
def prefetch_rows(typingctx, packed, n0, rows):
    """Prefetch rows n0 .. n0+rows-1 of packed uint8 [N, K/4] into the caches (no fault if out of range)."""
    if not (isinstance(packed, types.Array) and packed.dtype == types.uint8):
        return None
    sig = types.void(packed, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        pk = context.make_array(signature.args[0])(context, builder, args[0])
        n0, rows = args[1], args[2]
        i8 = ir.IntType(8)
        intp = n0.type
        stride = builder.extract_value(pk.strides, 0)
        start = builder.gep(builder.bitcast(pk.data, i8.as_pointer()), [builder.mul(n0, stride)])
        lines = builder.udiv(builder.add(builder.mul(rows, stride), ir.Constant(intp, 63)), ir.Constant(intp, 64))
        with cgutils.for_range(builder, lines) as loop:
            prefetch(builder, builder.gep(start, [builder.mul(loop.index, ir.Constant(intp, 64))]), locality=2)
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
    panels of panel_chunks >= 1 chunks (the defaults were the fastest tried, see
    benchmarks/results/kernels_history.md). No checks: call
    ``refbitnet.kernels.TernaryLinear`` unless the operands are known good."""
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
    # once per call (an allocation per tile costs, depending on the allocator's state, page faults that
    # can double the time).
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
