"""The fast path's elementwise glue, compiled: what runs between the projections of a decoder layer.

Each op reproduces the NumPy expression of refbitnet.model bit for bit (the same float32 operations in the
same order; for the mean in rms_norm, NumPy's own pairwise summation), so the integer codes the next
quantizer makes are the same on both paths. Fused where the fast path needs it: the residual add with the
next rms_norm, relu2(gate) * up with ffn_sub_norm. Also the float16 KV cache's exact widening, and NumPy's
pairwise sum of products (pairwise_dot, block_dot_rows) that refbitnet.attention_kernel's scores and softmax
sum use as well. Used by refbitnet.runtime and refbitnet.attention_kernel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import kernels  # noqa: F401  (sets the LLVM options before anything below compiles)
from .errors import RefBitNetTypeError


# ----------------------------------------------------------------------------- the glue between projections
# The elementwise ops between the projections of one token, compiled. Each reproduces the NumPy
# expression of refbitnet.model bit for bit: the same float32 operations in the same order, and, for the
# mean in rms_norm, numpy's own pairwise summation (8 interleaved partial sums in blocks of up to 128,
# halves above that), so the integer codes the next quantizer makes are the same. The same pairwise sum
# of rounded products serves refbitnet.attention_kernel (np.sum(q * k, axis=-1) and the softmax's sum).

def _lane_sums_ir(builder, rows_a, ptr_b, n8, half_b=False):
    """IR: for each pointer in rows_a (float*), numpy's 8 partial sums of its products with ptr_b (float*, or
    float16 bits i16* widened exactly by fpext if half_b) as one 8-lane vector: r_j = a[j]*b[j] + a[8+j]*b[8+j]
    + ... over n8 >= 1 groups of 8 (each product rounded, then added in that order: vmulps, vaddps, no fused
    multiply-add), then ((r0+r1)+(r2+r3)) + ((r4+r5)+(r6+r7)) -> one float per row. Several rows share each
    load of b and run independent chains."""
    v8 = ir.VectorType(ir.FloatType(), 8)
    v8b = ir.VectorType(ir.IntType(16), 8) if half_b else v8
    vb = builder.bitcast(ptr_b, v8b.as_pointer())
    va = [builder.bitcast(p, v8.as_pointer()) for p in rows_a]

    def products(k):                                       # the 8 rounded products of group k, per row
        b = builder.load(builder.gep(vb, [k]), align=2 if half_b else 4)
        if half_b:
            b = builder.fpext(builder.bitcast(b, ir.VectorType(ir.HalfType(), 8)), v8)
        return [builder.fmul(builder.load(builder.gep(a, [k]), align=4), b) for a in va]
    accs = [cgutils.alloca_once_value(builder, p) for p in products(ir.Constant(n8.type, 0))]
    with cgutils.for_range(builder, builder.sub(n8, ir.Constant(n8.type, 1))) as loop:
        k = builder.add(loop.index, ir.Constant(n8.type, 1))
        for acc, p in zip(accs, products(k)):
            builder.store(builder.fadd(builder.load(acc), p), acc)
    if len(accs) == 4:                      # 4 trees at once: (even + odd) lanes three times, all in vectors
        def pair_sums(x, y, n):             # [x0+x1, x2+x3, ..., y0+y1, ...] of two n-lane vectors
            idx = ir.VectorType(ir.IntType(32), n)
            even = builder.shuffle_vector(x, y, ir.Constant(idx, list(range(0, 2 * n, 2))))
            odd = builder.shuffle_vector(x, y, ir.Constant(idx, list(range(1, 2 * n, 2))))
            return builder.fadd(even, odd)
        a, b, c, d = (builder.load(acc) for acc in accs)
        quads = pair_sums(pair_sums(a, b, 8), pair_sums(c, d, 8), 8)    # [a0123, a4567, b0123, b4567, c.., d..]
        sums = pair_sums(quads, quads, 4)                               # [a0123+a4567, b.., c.., d..]
        return [builder.extract_element(sums, ir.Constant(ir.IntType(32), j)) for j in range(4)]
    trees = []
    for acc in accs:
        r = [builder.extract_element(builder.load(acc), ir.Constant(ir.IntType(32), j)) for j in range(8)]
        trees.append(builder.fadd(builder.fadd(builder.fadd(r[0], r[1]), builder.fadd(r[2], r[3])),
                                  builder.fadd(builder.fadd(r[4], r[5]), builder.fadd(r[6], r[7]))))
    return trees


def _c_float32(x, ndim):
    return isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == ndim and x.layout == "C"


@intrinsic
def _lane_sums(typingctx, a, b, lo, n8):
    """_lane_sums_ir of a[lo:] and b[lo:] -> float32. a, b: C-contiguous float32 [>= lo + 8*n8]; no bounds
    checks. (LLVM does not vectorize numpy's 8 scalar partial sums by itself.)"""
    if not (_c_float32(a, 1) and _c_float32(b, 1)):
        return None

    def codegen(context, builder, signature, args):
        arr_a = context.make_array(signature.args[0])(context, builder, args[0])
        arr_b = context.make_array(signature.args[1])(context, builder, args[1])
        lo = args[2]
        row_a, row_b = builder.gep(arr_a.data, [lo]), builder.gep(arr_b.data, [lo])
        return _lane_sums_ir(builder, [row_a], row_b, args[3])[0]
    return types.float32(a, b, types.intp, types.intp), codegen


ROWS = 4                                                 # rows of a per _lane_sums_rows call


@intrinsic
def _lane_sums_rows(typingctx, a, r0, b, n8, out):
    """out[j] = _lane_sums_ir of a[r0 + j] and b (from element 0), j < ROWS: a C-contiguous float32 [R, N]
    with r0 + ROWS <= R and N >= 8*n8, b float32 (or float16 bits, uint16) [>= 8*n8], out float32 [>= ROWS];
    no bounds checks."""
    half_b = isinstance(b, types.Array) and b.dtype == types.uint16 and b.ndim == 1 and b.layout == "C"
    if not (_c_float32(a, 2) and (half_b or _c_float32(b, 1)) and _c_float32(out, 1)):
        return None

    def codegen(context, builder, signature, args):
        arr_a = context.make_array(signature.args[0])(context, builder, args[0])
        arr_b = context.make_array(signature.args[2])(context, builder, args[2])
        arr_out = context.make_array(signature.args[4])(context, builder, args[4])
        row_len = builder.extract_value(arr_a.shape, 1)
        first = builder.mul(args[1], row_len)
        steps = [builder.mul(row_len, ir.Constant(row_len.type, j)) for j in range(ROWS)]    # elements
        rows = [builder.gep(arr_a.data, [builder.add(first, step)]) for step in steps]
        for j, tree in enumerate(_lane_sums_ir(builder, rows, arr_b.data, args[3], half_b)):
            builder.store(tree, builder.gep(arr_out.data, [ir.Constant(ir.IntType(64), j)]))
        return context.get_dummy_value()
    return types.none(a, types.intp, b, types.intp, out), codegen


@njit(cache=True)
def _block_dot(a, b, lo, n):
    """numpy's float32 pairwise sum of a[i] * b[i], i = lo .. lo+n-1, for a block of n <= 128 (each product
    rounded first): 8 partial sums r_j of the elements j, j+8, j+16, ... added as ((r0+r1)+(r2+r3)) +
    ((r4+r5)+(r6+r7)) (_lane_sums), then the last n % 8 one by one; fewer than 8 one by one from -0.0."""
    if n < 8:
        res = np.float32(-0.0)
        for i in range(lo, lo + n):
            res = np.float32(res + np.float32(a[i] * b[i]))
        return res
    res = _lane_sums(a, b, lo, n // 8)
    for i in range(lo + n - n % 8, lo + n):
        res = np.float32(res + np.float32(a[i] * b[i]))
    return res


@njit(cache=True)
def block_dot_rows(a, r0, b, n, out):
    """out[j] = _block_dot(a[r0 + j], b, 0, n) for j < ROWS, n <= 128, the rows' chains interleaved (a: C
    float32 [R, >= n], b: C float32 [>= n], out: float32 [>= ROWS]): the bits of ROWS calls of _block_dot."""
    if n < 8:
        for j in range(ROWS):
            out[j] = _block_dot(a[r0 + j], b, np.int64(0), n)   # int64 lo: one compiled signature
        return
    _lane_sums_rows(a, r0, b, n // 8, out)
    for j in range(ROWS):
        res = out[j]
        for i in range(n - n % 8, n):
            res = np.float32(res + np.float32(a[r0 + j, i] * b[i]))
        out[j] = res


@njit(cache=True)
def pairwise_dot(a, b, n):
    """numpy's float32 pairwise sum of a[i] * b[i], i < n (np.sum(a[:n] * b[:n], dtype=np.float32) less its
    initial 0.0): blocks of <= 128 as _block_dot; a longer range is split at half (rounded down to a
    multiple of 8) and the halves' sums added. Written with an explicit stack (a recursive function in
    Numba's on-disk cache crashed on reload)."""
    if n <= 128:
        return _block_dot(a, b, np.int64(0), n)
    seg_lo = np.empty(64, np.int64)
    seg_n = np.empty(64, np.int64)
    seg_combine = np.empty(64, np.bool_)
    values = np.empty(64, np.float32)
    sp, nv = 1, 0
    seg_lo[0], seg_n[0], seg_combine[0] = 0, n, False
    while sp > 0:
        sp -= 1
        lo, m, combine = seg_lo[sp], seg_n[sp], seg_combine[sp]
        if combine:                                           # both halves done: left + right
            values[nv - 2] = np.float32(values[nv - 2] + values[nv - 1])
            nv -= 1
        elif m <= 128:
            values[nv] = _block_dot(a, b, lo, m)
            nv += 1
        else:
            half = m // 2
            half -= half % 8
            seg_lo[sp], seg_n[sp], seg_combine[sp] = lo, m, True
            seg_lo[sp + 1], seg_n[sp + 1], seg_combine[sp + 1] = lo + half, m - half, False
            seg_lo[sp + 2], seg_n[sp + 2], seg_combine[sp + 2] = lo, half, False      # left half first
            sp += 3
    return values[0]


@njit(cache=True)
def rms_norm_row(x, weight, eps, out):
    """model.rms_norm for one row: out = weight * (x * (1 / sqrt(mean(x*x) + eps))), float32 [N]."""
    n = x.shape[0]
    variance = np.float32(np.float32(np.float32(0.0) + pairwise_dot(x, x, n)) / np.float32(n))
    inv_rms = np.float32(np.float32(1.0) / np.float32(np.sqrt(np.float32(variance + eps))))
    for i in range(n):
        out[i] = np.float32(weight[i] * np.float32(x[i] * inv_rms))


@njit(cache=True)
def add_rms_norm_row(h, delta, weight, eps, h_out, x_out):
    """h_out = h + delta (the residual), x_out = rms_norm(h_out, weight), float32 [D]."""
    for i in range(h.shape[0]):
        h_out[i] = np.float32(h[i] + delta[i])
    rms_norm_row(h_out, weight, eps, x_out)


@njit(cache=True)
def relu2_mul_rms_norm_row(gate, up, weight, eps, m, out):
    """m = relu(gate)**2 * up (model.relu2(gate) * up), out = rms_norm(m, weight), float32 [F]."""
    for i in range(gate.shape[0]):
        r = gate[i] if gate[i] > np.float32(0.0) else np.float32(0.0)
        if gate[i] != gate[i]:                      # np.maximum keeps a NaN (the quantizer then reports it)
            r = gate[i]
        m[i] = np.float32(np.float32(r * r) * up[i])
    rms_norm_row(m, weight, eps, out)


@njit(cache=True)
def rope_heads(x, cos, sin, out):
    """model.rope for one position: x [heads, HD], cos/sin [HD] -> out [heads, HD] (x*cos + rotate_half(x)*sin)."""
    heads, hd = x.shape
    half = hd // 2
    for h in range(heads):
        for j in range(hd):
            rot = -x[h, j + half] if j < half else x[h, j - half]
            out[h, j] = np.float32(np.float32(x[h, j] * cos[j]) + np.float32(rot * sin[j]))


# The same ops for a block of S > 1 tokens (prefill): each row is computed exactly as above, on its own,
# so the rows are independent and split between the threads (prange); bit-identical to the S = 1 versions.

@njit(cache=True, parallel=True)
def rms_norm_rows(x, weight, eps, out):
    """rms_norm_row on each row: x [S, N] -> out [S, N]."""
    for r in prange(x.shape[0]):
        rms_norm_row(x[r], weight, eps, out[r])


@njit(cache=True, parallel=True)
def add_rms_norm_rows(h, delta, weight, eps, h_out, x_out):
    """add_rms_norm_row on each row: h, delta [S, D] -> h_out = h + delta, x_out = rms_norm(h_out) [S, D]."""
    for r in prange(h.shape[0]):
        add_rms_norm_row(h[r], delta[r], weight, eps, h_out[r], x_out[r])


@njit(cache=True, parallel=True)
def relu2_mul_rms_norm_rows(gate, up, weight, eps, m, out):
    """relu2_mul_rms_norm_row on each row: gate, up [S, F] -> m, out [S, F]."""
    for r in prange(gate.shape[0]):
        relu2_mul_rms_norm_row(gate[r], up[r], weight, eps, m[r], out[r])


@njit(cache=True, parallel=True)
def rope_rows(x, cos, sin, out):
    """rope_heads at each position: x [S, heads, HD], cos/sin [S, HD] -> out [S, heads, HD]."""
    for r in prange(x.shape[0]):
        rope_heads(x[r], cos[r], sin[r], out[r])


def rms_norm_into(x, weight, eps, out):
    if x.shape[0] == 1:                              # decode: no thread start-up for one row
        rms_norm_row(x[0], weight, eps, out[0])
    else:
        rms_norm_rows(x, weight, eps, out)


def add_rms_norm_into(h, delta, weight, eps, h_out, x_out):
    if h.shape[0] == 1:
        add_rms_norm_row(h[0], delta[0], weight, eps, h_out[0], x_out[0])
    else:
        add_rms_norm_rows(h, delta, weight, eps, h_out, x_out)


def relu2_mul_rms_norm_into(gate, up, weight, eps, m, out):
    if gate.shape[0] == 1:
        relu2_mul_rms_norm_row(gate[0], up[0], weight, eps, m[0], out[0])
    else:
        relu2_mul_rms_norm_rows(gate, up, weight, eps, m, out)


def rope_into(x, cos, sin, out):
    if x.shape[0] == 1:
        rope_heads(x[0], cos[0], sin[0], out[0])
    else:
        rope_rows(x, cos, sin, out)


WIDEN_BLOCK = 16384                 # float16 values widened per task


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the unsigned integer bits (a bitcast, which Numba
    has no scalar form of)."""
    if not (isinstance(bits, types.Integer) and not bits.signed):
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def float16_value(bits):
    """The float16 with bit pattern bits (uint16) as float32, exactly: its exponent and mantissa bits shifted
    into place (and its sign on top) form a float32 2**-112 times the value (a subnormal float16 becomes a
    subnormal float32), which one multiply by 2**112 restores exactly; inf/NaN get the all-ones exponent
    (payload kept). Equals NumPy's float16 -> float32 cast for every bit pattern (up to a NaN's payload)."""
    b = np.uint32(bits)
    shifted = ((b & np.uint32(0x7FFF)) << np.uint32(13)) | ((b & np.uint32(0x8000)) << np.uint32(16))
    if (b & np.uint32(0x7C00)) == np.uint32(0x7C00):                     # inf or NaN
        return _float32_from_bits(shifted | np.uint32(0x7F800000))
    return np.float32(_float32_from_bits(shifted) * np.float32(2.0 ** 112))


@njit(cache=True)
def widen_float16_row(bits, out):
    """out[i] = float16_value(bits[i]): float16 bits uint16 [n] -> float32 [n]."""
    for i in range(bits.shape[0]):
        out[i] = float16_value(bits[i])


@njit(cache=True, parallel=True)
def _widen_float16(bits, out):
    n = bits.shape[0]
    for task in prange((n + WIDEN_BLOCK - 1) // WIDEN_BLOCK):
        lo, hi = task * WIDEN_BLOCK, min((task + 1) * WIDEN_BLOCK, n)
        widen_float16_row(bits[lo:hi], out[lo:hi])


def widen_float16(src: np.ndarray, out: np.ndarray) -> None:
    """out[...] = src as float32 (bit-identical to np.copyto(out, src)), compiled and split between threads;
    NumPy's own cast runs one element at a time (here ~5x slower). src float16, out float32, both
    C-contiguous of one shape."""
    if src.dtype != np.float16 or out.dtype != np.float32 or src.shape != out.shape \
            or not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise RefBitNetTypeError(f"widen_float16: expected contiguous float16 and float32 arrays of one shape, "
                                 f"found {src.dtype} {src.shape} and {out.dtype} {out.shape}")
    _widen_float16(src.reshape(-1).view(np.uint16), out.reshape(-1))
