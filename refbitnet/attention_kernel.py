"""The fast path's attention over the KV cache, compiled: refbitnet.model.attention's bits, in Numba.

refbitnet.model.attention writes every sum in an order NumPy fixes: a score is a pairwise sum over HD of
rounded products q*k, the softmax takes e**x from model.exp_float32 (plain float32 operations) and its
denominator is a pairwise sum over T, and the output adds the rounded products weight*v in order
t = 0, 1, 2, ... This module performs the same float32 operations in the same order, so the two agree bit
for bit (tests/test_attention.py). The pairwise sums are glue.pairwise_dot's (NumPy's 8 partial sums as one
8-lane vector, 4 heads sharing each key row); the weighted sum keeps 4 heads x 16 elements in registers over
all T (_weighted_lanes). Neither reorders an addition: vectors only hold the independent partial sums.

It reads the cache as stored: a float16 cache's keys and values are widened exactly inside the vector
loops (fpext half -> float, equal to NumPy's cast, as KVCache.read widens), never into a float32 copy of
the layer. A block of queries (prefill) runs one query per thread task; one query over a long context
(decode) is split in three parallel loops; a short one runs on the calling thread. Used by
refbitnet.runtime.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .checks import check_array, check_int
from .errors import RefBitNetError, RefBitNetTypeError
from .glue import ROWS, _lane_sums_rows, block_dot_rows, float16_value, pairwise_dot
from .model import EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_LOWEST, EXP_POLY, EXP_ROUND

_C0, _C1, _C2, _C3, _C4, _C5 = EXP_POLY


@intrinsic
def _pow2_float64(typingctx, n):
    """2.0**n as float64 for an int32 n in -1022 .. 1023: the exponent bits (n + 1023) << 52 (a bitcast,
    no table: so the softmax's exp loop vectorizes)."""
    if n != types.int32:
        return None

    def codegen(context, builder, signature, args):
        biased = builder.add(builder.sext(args[0], ir.IntType(64)), ir.Constant(ir.IntType(64), 1023))
        return builder.bitcast(builder.shl(biased, ir.Constant(ir.IntType(64), 52)), ir.DoubleType())
    return types.float64(types.int32), codegen


@njit(cache=True, inline="always")
def exp_float32(x):
    """model.exp_float32 for one float32 x <= 0: the same operations, each rounded to float32; then 2**n
    applied in float64 (exact there, n in -150 .. 0) and rounded once to float32, as np.ldexp rounds once."""
    if x != x:
        return x
    if x < EXP_LOWEST:
        x = EXP_LOWEST
    n = np.float32(np.float32(np.float32(x * EXP_LOG2E) + EXP_ROUND) - EXP_ROUND)
    r = np.float32(np.float32(x - np.float32(n * EXP_LN2_HI)) - np.float32(n * EXP_LN2_LO))
    p = np.float32(np.float32(_C0 * r) + _C1)
    p = np.float32(np.float32(p * r) + _C2)
    p = np.float32(np.float32(p * r) + _C3)
    p = np.float32(np.float32(p * r) + _C4)
    p = np.float32(np.float32(p * r) + _C5)
    e_r = np.float32(np.float32(np.float32(p * np.float32(r * r)) + r) + np.float32(1.0))
    return np.float32(np.float64(e_r) * _pow2_float64(np.int32(n)))


@njit(cache=True, inline="always")
def _row(x32, x16, wide16, t, g, d0, d1, buf):
    """Elements d0 .. d1-1 of the row of position t, KV head g, as float32 [d1-d0]: a view of the float32
    cache x32, or the float16 cache's bits x16 widened exactly (glue.float16_value) into buf."""
    if wide16:
        for d in range(d1 - d0):
            buf[d] = float16_value(x16[t, g, d0 + d])
        return buf[:d1 - d0]
    return x32[t, g, d0:d1]


# The three steps of model.attention for one query (position i, keys 0 .. t_len-1), each over a part of the
# work so that decode can split it between threads: scores for a range of positions, the softmax of one
# head, the output of a range of the HD elements. Each performs model.attention's operations in its order.

@njit(cache=True)
def _scores(q_i, k32, k16, wide16, n_kv, t0, t1, scale, scores, buf):
    """scores[h, t] = np.sum(q * k, axis=-1) * scale (0.0 + pairwise sum over HD) for every head h and the
    positions t0 .. t1-1, position by position (the cache in memory order); q_i [H, HD], scores [H, >= t1].
    ROWS heads at a time share each key row."""
    n_heads, hd = q_i.shape
    groups = n_heads // n_kv
    dots = np.empty(ROWS, np.float32)
    split = groups - (groups % ROWS if hd <= 128 else groups)  # heads of a group by ROWS: the first split
    half_rows = wide16 and hd % 8 == 0                         # float16 rows widened inside the vector loop
    for t in range(t0, t1):
        for g in range(n_kv):
            h0, h1 = g * groups, (g + 1) * groups
            if half_rows and split == groups:
                k_row = buf                                        # (not read)
            else:
                k_row = _row(k32, k16, wide16, t, g, 0, hd, buf)
            for h in range(h0, h0 + split, ROWS):
                if half_rows:
                    _lane_sums_rows(q_i, h, k16[t, g], hd // 8, dots)  # = block_dot_rows of the widened row
                else:
                    block_dot_rows(q_i, h, k_row, hd, dots)
                for j in range(ROWS):
                    scores[h + j, t] = np.float32(np.float32(np.float32(0.0) + dots[j]) * scale)
            for h in range(h0 + split, h1):
                scores[h, t] = np.float32(np.float32(np.float32(0.0) + pairwise_dot(q_i[h], k_row, hd)) * scale)


@njit(cache=True)
def _softmax(row, t_len, ones):
    """row[:t_len] = e / np.sum(e) with e = exp_float32(row - row.max()), in place; ones: float32 [>= t_len]."""
    top = row[0]                            # row.max(): NaN if any element is NaN
    for t in range(1, t_len):
        if (row[t] > top or row[t] != row[t]) and top == top:
            top = row[t]
    for t in range(t_len):
        row[t] = exp_float32(np.float32(row[t] - top))
    total = np.float32(np.float32(0.0) + pairwise_dot(row, ones, t_len))     # (e * 1 = e: numpy's pairwise sum)
    for t in range(t_len):
        row[t] = np.float32(row[t] / total)


LANE_HEADS, LANE_ELEMS = 4, 16          # _weighted_lanes: 4 heads x 16 elements, 8 vectors held in registers
LANE_ROWS = 64                          # positions per _weighted_lanes call (their rows stay in L1 meanwhile)


@intrinsic
def _weighted_lanes(typingctx, scores, h0, v, g, d0, t0, t1, out):
    """out[h0 + j, d0:d0+16] += fl(w_jt v_t) for t = t0, t0+1, .. t1-1, one after another, for the LANE_HEADS
    heads j, w_jt = scores[h0 + j, t], v_t = v[t, g, d0:d0+16]: 8 accumulators of 8 lanes (loaded from out,
    stored back at the end) stay in registers over the positions, each value row is read once for the 4
    heads. v: float32 [T, KVH, HD], or float16 bits (uint16) widened exactly (fpext half -> float). scores
    [H, T], out [H, HD] float32; all C-contiguous; no bounds checks."""
    if not (isinstance(v, types.Array) and v.dtype in (types.float32, types.uint16) and v.ndim == 3
            and v.layout == "C" and all(isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2
                                        and x.layout == "C" for x in (scores, out))):
        return None
    half = v.dtype == types.uint16

    def codegen(context, builder, signature, args):
        sc = context.make_array(signature.args[0])(context, builder, args[0])
        va = context.make_array(signature.args[2])(context, builder, args[2])
        oa = context.make_array(signature.args[7])(context, builder, args[7])
        h0, g, d0, t0, t1 = args[1], args[3], args[4], args[5], args[6]
        i8p, f32 = ir.IntType(8).as_pointer(), ir.FloatType()
        v8f = ir.VectorType(f32, 8)
        size = ir.Constant(h0.type, 2 if half else 4)
        sc_row, v_row, o_row = (builder.extract_value(x.strides, 0) for x in (sc, va, oa))   # bytes
        v_head = builder.extract_value(va.strides, 1)
        sc_ptr, v_ptr, o_ptr = (builder.bitcast(x.data, i8p) for x in (sc, va, oa))
        def out_vector(j, k):               # float* of out[h0 + j, d0 + 8k : d0 + 8k + 8] as <8 x float>*
            d = builder.add(d0, ir.Constant(d0.type, 8 * k))
            off = builder.add(builder.mul(builder.add(h0, ir.Constant(h0.type, j)), o_row),
                              builder.mul(d, ir.Constant(d0.type, 4)))
            return builder.bitcast(builder.gep(o_ptr, [off]), v8f.as_pointer())
        acc = [[cgutils.alloca_once_value(builder, builder.load(out_vector(j, k), align=4)) for k in range(2)]
               for j in range(LANE_HEADS)]
        v_off0 = builder.add(builder.mul(g, v_head), builder.mul(d0, size))
        with cgutils.for_range(builder, builder.sub(t1, t0)) as loop:
            t = builder.add(loop.index, t0)
            v_off = builder.add(builder.mul(t, v_row), v_off0)
            xs = []
            for k in range(2):
                p = builder.gep(v_ptr, [builder.add(v_off, builder.mul(ir.Constant(t.type, 8 * k), size))])
                if half:
                    i16x8 = ir.VectorType(ir.IntType(16), 8)
                    raw = builder.load(builder.bitcast(p, i16x8.as_pointer()), align=2)
                    xs.append(builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 8)), v8f))
                else:
                    xs.append(builder.load(builder.bitcast(p, v8f.as_pointer()), align=4))
            for j in range(LANE_HEADS):
                w_off = builder.add(builder.mul(builder.add(h0, ir.Constant(t.type, j)), sc_row),
                                    builder.mul(t, ir.Constant(t.type, 4)))
                w = builder.load(builder.bitcast(builder.gep(sc_ptr, [w_off]), f32.as_pointer()), align=4)
                wv = builder.shuffle_vector(builder.insert_element(ir.Constant(v8f, None), w, ir.Constant(
                    ir.IntType(32), 0)), ir.Constant(v8f, None), ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                                             [0] * 8))
                for k in range(2):
                    builder.store(builder.fadd(builder.load(acc[j][k]), builder.fmul(wv, xs[k])), acc[j][k])
        for j in range(LANE_HEADS):
            for k in range(2):
                builder.store(builder.load(acc[j][k]), out_vector(j, k), align=4)
        return context.get_dummy_value()
    return types.none(scores, types.intp, v, types.intp, types.intp, types.intp, types.intp, out), codegen


@njit(cache=True)
def _weighted(scores, v32, v16, wide16, n_kv, t_len, d0, d1, out_i, acc, buf):
    """out_i[h, d0:d1] = np.sum(weights * v, axis=-2) for every head h: 0.0 + term_0 + term_1 + ... in order
    t = 0, 1, 2, ... (each term rounded); acc: float32 [>= H / n_kv, >= d1-d0] scratch. By _weighted_lanes
    where the heads of a group come in fours and the range in 16s (the 2B4T shape), a block of LANE_ROWS
    positions at a time (the cache in memory order, each row's elements d0 .. d1 used while it is in L1);
    else by loops."""
    n_heads = out_i.shape[0]
    groups = n_heads // n_kv
    n = d1 - d0
    if groups % LANE_HEADS == 0 and n % LANE_ELEMS == 0:
        for h in range(n_heads):
            for d in range(d0, d1):
                out_i[h, d] = np.float32(0.0)
        for t0 in range(0, t_len, LANE_ROWS):
            t1 = min(t_len, t0 + LANE_ROWS)
            for g in range(n_kv):
                for h in range(g * groups, (g + 1) * groups, LANE_HEADS):
                    for d in range(d0, d1, LANE_ELEMS):
                        if wide16:
                            _weighted_lanes(scores, h, v16, g, d, t0, t1, out_i)
                        else:
                            _weighted_lanes(scores, h, v32, g, d, t0, t1, out_i)
        return
    for g in range(n_kv):
        h0 = g * groups
        for j in range(groups):
            for d in range(n):
                acc[j, d] = np.float32(0.0)
        for t in range(t_len):
            v_row = _row(v32, v16, wide16, t, g, d0, d1, buf)
            for j in range(groups):
                w = scores[h0 + j, t]
                a = acc[j]
                for d in range(n):
                    a[d] = np.float32(a[d] + np.float32(w * v_row[d]))
        for j in range(groups):
            for d in range(n):
                out_i[h0 + j, d0 + d] = acc[j, d]


@njit(cache=True)
def _query(q_i, k32, k16, v32, v16, wide16, n_kv, t_len, scale, out_i):
    """model.attention for one query q_i [H, HD] over keys 0 .. t_len-1 -> out_i [H, HD], on one thread."""
    n_heads, hd = q_i.shape
    groups = n_heads // n_kv
    buf = np.empty(hd, np.float32)
    scores = np.empty((n_heads, t_len), np.float32)
    ones = np.ones(t_len, np.float32)
    acc = np.empty((groups, hd), np.float32)
    _scores(q_i, k32, k16, wide16, n_kv, 0, t_len, scale, scores, buf)
    for h in range(n_heads):
        _softmax(scores[h], t_len, ones)
    _weighted(scores, v32, v16, wide16, n_kv, t_len, 0, hd, out_i, acc, buf)


@njit(cache=True, parallel=True)
def _attention_rows(q, k32, k16, v32, v16, wide16, n_kv, start, scale, out):
    """A block of S queries (prefill): one query per task, each computed by _query."""
    for i in prange(q.shape[0]):
        _query(q[i], k32, k16, v32, v16, wide16, n_kv, start + i + 1, scale, out[i])


@njit(cache=True)
def _attention_serial(q, k32, k16, v32, v16, wide16, n_kv, start, scale, out):
    """The same on the calling thread (a short context: starting threads would cost more than the work)."""
    for i in range(q.shape[0]):
        _query(q[i], k32, k16, v32, v16, wide16, n_kv, start + i + 1, scale, out[i])


SCORE_CHUNK = 128       # positions per scores task of a decode step (all KV heads: one block of the cache)
OUT_CHUNK = 64          # HD elements per output task of a decode step (a multiple of LANE_ELEMS;
                        # 2 tasks for HD = 128: one per thread of this 2-core machine kind)


@njit(cache=True, parallel=True)
def _attention_one(q_i, k32, k16, v32, v16, wide16, n_kv, t_len, scale, out_i):
    """One query (a decode step over a long context) split between threads in three parallel loops: the
    scores by chunk of positions, the softmax by head, the output by chunk of HD elements (of every head)."""
    n_heads, hd = q_i.shape
    groups = n_heads // n_kv
    scores = np.empty((n_heads, t_len), np.float32)
    ones = np.ones(t_len, np.float32)
    n_chunks = (t_len + SCORE_CHUNK - 1) // SCORE_CHUNK
    for c in prange(n_chunks):
        buf = np.empty(hd, np.float32)
        t0, t1 = c * SCORE_CHUNK, min(t_len, (c + 1) * SCORE_CHUNK)
        _scores(q_i, k32, k16, wide16, n_kv, t0, t1, scale, scores, buf)
    for h in prange(n_heads):
        _softmax(scores[h], t_len, ones)
    n_parts = (hd + OUT_CHUNK - 1) // OUT_CHUNK
    for c in prange(n_parts):
        buf = np.empty(hd, np.float32)
        acc = np.empty((groups, OUT_CHUNK), np.float32)
        d0, d1 = c * OUT_CHUNK, min(hd, (c + 1) * OUT_CHUNK)
        _weighted(scores, v32, v16, wide16, n_kv, t_len, d0, d1, out_i, acc, buf)


SERIAL_WORK = 4096          # up to this many (query, head, position) triples a call runs on the calling thread


_NO_F32 = np.zeros((1, 1, 1), np.float32)      # the cache argument of the other element type (never read)
_NO_F16 = np.zeros((1, 1, 1), np.uint16)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, out: np.ndarray | None = None):
    """refbitnet.model.attention(q, k, v, start), compiled, bit for bit; k, v may also be float16 (a float16
    cache as stored): then the result is model.attention's over k, v widened to float32.

    q float32 [S, H, HD]; k, v [T, KVH, HD] float32 or float16, C-contiguous, T >= start + S, H % KVH == 0.
    Returns out (float32 [S, H, HD], made if None).
    """
    q = check_array(q, "attention q", np.float32, 3, contiguous=True, nonempty=True)
    if not isinstance(k, np.ndarray) or k.dtype not in (np.float32, np.float16):
        raise RefBitNetTypeError(f"attention k: expected a float32 or float16 array, found "
                                 f"{getattr(k, 'dtype', type(k).__name__)}")
    k = check_array(k, "attention k", k.dtype, 3, contiguous=True, nonempty=True)
    v = check_array(v, "attention v", k.dtype, 3, contiguous=True, nonempty=True)
    s_len, n_heads, hd = q.shape
    t_len, n_kv, k_hd = k.shape
    start = check_int(start, "attention start", 0, t_len - s_len)
    if v.shape != k.shape or k_hd != hd or n_heads % n_kv:
        raise RefBitNetError(f"attention: expected q [S, H, HD] and k, v [T, KVH, HD] with H % KVH == 0, "
                             f"found q {q.shape}, k {k.shape}, v {v.shape}")
    if out is None:
        out = np.empty_like(q)
    else:
        check_array(out, "attention out", np.float32, 3, contiguous=True)
        if out.shape != q.shape:
            raise RefBitNetError(f"attention out: expected shape {q.shape}, found {out.shape}")
    scale = np.float32(hd ** -0.5)
    if k.dtype == np.float16:
        args = (_NO_F32, k.view(np.uint16), _NO_F32, v.view(np.uint16), True)
    else:
        args = (k, _NO_F16, v, _NO_F16, False)
    if s_len * n_heads * (start + s_len) <= SERIAL_WORK:
        _attention_serial(q, *args, n_kv, start, scale, out)
    elif s_len == 1:
        _attention_one(q[0], *args, n_kv, start + 1, scale, out[0])
    else:
        _attention_rows(q, *args, n_kv, start, scale, out)
    return out


def attend(q: np.ndarray, cache, layer: int, start: int, out: np.ndarray | None = None) -> np.ndarray:
    """Attention of q [S, H, HD] (positions start .. start+S-1) over positions 0 .. start+S-1 of one layer
    of a KVCache, read as stored (float32, or float16 widened exactly): equals model.attention(q,
    *cache.read(layer, start + S), start) bit for bit."""
    end = start + q.shape[0]
    return attention(q, cache.k[layer, :end], cache.v[layer, :end], start, out)
