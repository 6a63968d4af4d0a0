"""The AVX2 building blocks that v4_maddubs and v5_prefill emit through LLVM intrinsics, in one place.

Why intrinsics: LLVM's loop vectorizer does not produce ``vpmaddubsw`` (32 byte products per instruction,
u8 x i8 -> pairwise sums in int16 lanes) from a Numba loop, so the v4 and v5 kernels write their inner
loops as LLVM IR inside ``numba.extending.intrinsic`` code generators. These helpers are called from those
code generators (they take an ``llvmlite.ir.IRBuilder``, not arrays); each kernel module keeps only its
own loop structure.

The arithmetic they share, for a 32-byte chunk W of packed codes (kernel layout, 128 weights: byte j
holds the code c = w + 1 in {0, 1, 2} of k = 4j + i at bits 2i) and int8 activations x:
    field i = (W >> 2i) & 3                          code_fields: u8 codes of k = 4j + i
    maddubs(field i, x_i)                            int16 lanes, each |c0 x0 + c1 x1| <= 2 * 2 * 128 = 512
    4 fields per chunk add <= 2048 to a lane, so WIDEN_CHUNKS = 15 chunks stay below 2**15 (30720);
    then the int16 lanes are widened exactly with vpmaddwd by ones (sum_i16_lanes, or a vector of them).
"""

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils

CHUNK = 32               # bytes of packed codes per ymm register: 128 weights, one chunk
CHUNK_WEIGHTS = 4 * CHUNK
WIDEN_CHUNKS = 15        # int16 bound: 15 chunks * 4 fields * 512 = 30720 < 32768, then widen to int32

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)


def available() -> bool:
    """True if this CPU has AVX2 (vpmaddubsw / vpmaddwd on 256-bit registers); v4 and v5 need it."""
    try:
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:       # noqa: BLE001  (no feature list on this platform: no AVX2 kernels)
        return False


def madd_intrinsics(module):
    """Declare (vpmaddubsw: u8 x i8 pairs -> i16 [16], vpmaddwd: i16 x i16 pairs -> i32 [8]) in module."""
    maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(V16I16, [V32I8, V32I8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(V8I32, [V16I16, V16I16]),
                                            "llvm.x86.avx2.pmadd.wd")
    return maddubs, maddwd


def prefetch(builder, ptr, locality=3):
    """Ask for the cache line at ptr (an i8*) ahead of its use: llvm.prefetch, a read, into every cache level
    (locality 3) or into L2 and beyond (2). A hint: it changes no value and never faults, so ptr may point
    past the data. Used by the GEMVs (v4, v6), v5's panel loads and the LM head."""
    i8p, i32 = I8.as_pointer(), I32
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


def load32(builder, ptr, offset):
    """The 32 bytes at ptr + offset (ptr an i8*, offset in bytes) as a <32 x i8> vector, unaligned load."""
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), V32I8.as_pointer()), align=1)


def code_fields(builder, w):
    """The 4 code fields of a 32-byte chunk w (<32 x i8>) as u8 vectors: field i = (w >> 2i) & 3, the codes c
    of k = 4j + i (the shift runs on 16-bit lanes; the & 3 drops what crosses in from the neighbouring byte)."""
    mask = ir.Constant(V32I8, [3] * 32)
    w16 = builder.bitcast(w, V16I16)
    return [builder.and_(w if i == 0 else builder.bitcast(builder.lshr(w16, ir.Constant(V16I16, [2 * i] * 16)),
                                                          V32I8), mask) for i in range(4)]


def widen(builder, maddwd, acc16):
    """<16 x i16> -> <8 x i32>, lane pairs added: vpmaddwd(acc16, 1), exact."""
    return builder.call(maddwd, [acc16, ir.Constant(V16I16, [1] * 16)])


def sum_i32_lanes(builder, wide):
    """int32 sum of the 8 int32 lanes of wide, in lane order."""
    total = builder.extract_element(wide, ir.Constant(I32, 0))
    for lane in range(1, 8):
        total = builder.add(total, builder.extract_element(wide, ir.Constant(I32, lane)))
    return total


def sum_i16_lanes(builder, maddwd, acc16):
    """int32 sum of the 16 int16 lanes of acc16: widened pairwise (``widen``), then the 8 lanes added."""
    return sum_i32_lanes(builder, widen(builder, maddwd, acc16))


def hsum8(builder, vectors):
    """8 vectors <8 x i32> -> one <8 x i32> whose lane k is the sum of the 8 lanes of vectors[k] (a vphaddd
    tree and one cross-lane add: ~20 instructions for 8 sums, instead of 8 scalar reductions)."""
    phadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V8I32, V8I32]),
                                           "llvm.x86.avx2.phadd.d")
    # phadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7] (per 128-bit half)
    h = [builder.call(phadd, [vectors[2 * k], vectors[2 * k + 1]]) for k in range(4)]
    g = [builder.call(phadd, [h[0], h[1]]), builder.call(phadd, [h[2], h[3]])]
    # g[0] = [lo(v0), lo(v1), lo(v2), lo(v3) | hi(v0), .., hi(v3)], lo/hi = sum of lanes 0-3 / 4-7
    lo = builder.shuffle_vector(g[0], g[1], ir.Constant(V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = builder.shuffle_vector(g[0], g[1], ir.Constant(V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.add(lo, hi)
