"""The fast path's elementwise glue, compiled: what runs between the projections of a decoder layer.

Each op reproduces the NumPy expression of refbitnet.model bit for bit (the same float32 operations in the
same order; for the mean in rms_norm, NumPy's own pairwise summation), so the integer codes the next
quantizer makes are the same on both paths. Fused where the fast path needs it: the residual add with the
next rms_norm, relu2(gate) * up with ffn_sub_norm. Also the float16 KV cache's exact widening. Used by
refbitnet.runtime only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import kernels  # noqa: F401  (sets the LLVM options before anything below compiles)
from .errors import RefBitNetTypeError


# ----------------------------------------------------------------------------- the glue between projections
# The elementwise ops between the projections of one token, compiled. Each reproduces the NumPy
# expression of refbitnet.model bit for bit: the same float32 operations in the same order, and, for the
# mean in rms_norm, numpy's own pairwise summation (8 interleaved partial sums in blocks of up to 128,
# halves above that), so the integer codes the next quantizer makes are the same.

@njit(cache=True)
def _block_sum_sq(x, lo, n):
    """numpy's float32 pairwise sum of x[lo:lo+n]**2 for a block of n <= 128 (each square rounded first)."""
    if n < 8:
        res = np.float32(-0.0)
        for i in range(lo, lo + n):
            res = np.float32(res + np.float32(x[i] * x[i]))
        return res
    r = np.empty(8, np.float32)
    for j in range(8):
        r[j] = np.float32(x[lo + j] * x[lo + j])
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] = np.float32(r[j] + np.float32(x[lo + i + j] * x[lo + i + j]))
        i += 8
    res = np.float32(np.float32(np.float32(r[0] + r[1]) + np.float32(r[2] + r[3]))
                     + np.float32(np.float32(r[4] + r[5]) + np.float32(r[6] + r[7])))
    while i < n:
        res = np.float32(res + np.float32(x[lo + i] * x[lo + i]))
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum_sq(x, n):
    """numpy's float32 pairwise sum of x[:n]**2: blocks of <= 128 as above; a longer range is split at
    half (rounded down to a multiple of 8) and the halves' sums added. Written with an explicit stack
    (a recursive function in Numba's on-disk cache crashed on reload)."""
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
            values[nv] = _block_sum_sq(x, lo, m)
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
    variance = np.float32(np.float32(np.float32(0.0) + _pairwise_sum_sq(x, n)) / np.float32(n))
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


WIDEN_BLOCK = 16384                 # float16 values widened per task (three passes over it stay in L1/L2)


@njit(cache=True)
def _widen_float16_block(bits, out_bits, out):
    """float16 bits uint16 [n] -> float32 [n] (out, with out_bits its uint32 view), exactly: the exponent and
    mantissa bits shifted into place form a float32 2**-112 times the value (a subnormal float16 becomes a
    subnormal float32), one multiply by 2**112 restores it exactly, then inf/NaN get the all-ones exponent
    (payload kept) and the sign is put back. Equals NumPy's float16 -> float32 cast for every bit pattern."""
    n = bits.shape[0]
    for i in range(n):
        out_bits[i] = (np.uint32(bits[i]) & np.uint32(0x7FFF)) << np.uint32(13)
    for i in range(n):
        out[i] = out[i] * np.float32(2.0 ** 112)
    for i in range(n):
        b = np.uint32(bits[i])
        r = out_bits[i]
        if (b & np.uint32(0x7C00)) == np.uint32(0x7C00):                 # inf or NaN
            r = r | np.uint32(0x7F800000)
        out_bits[i] = r | ((b & np.uint32(0x8000)) << np.uint32(16))


@njit(cache=True, parallel=True)
def _widen_float16(bits, out_bits, out):
    n = bits.shape[0]
    for task in prange((n + WIDEN_BLOCK - 1) // WIDEN_BLOCK):
        lo, hi = task * WIDEN_BLOCK, min((task + 1) * WIDEN_BLOCK, n)
        _widen_float16_block(bits[lo:hi], out_bits[lo:hi], out[lo:hi])


def widen_float16(src: np.ndarray, out: np.ndarray) -> None:
    """out[...] = src as float32 (bit-identical to np.copyto(out, src)), compiled and split between threads;
    NumPy's own cast runs one element at a time (here ~5x slower). src float16, out float32, both
    C-contiguous of one shape."""
    if src.dtype != np.float16 or out.dtype != np.float32 or src.shape != out.shape \
            or not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise RefBitNetTypeError(f"widen_float16: expected contiguous float16 and float32 arrays of one shape, "
                                 f"found {src.dtype} {src.shape} and {out.dtype} {out.shape}")
    flat = out.reshape(-1)
    _widen_float16(src.reshape(-1).view(np.uint16), flat.view(np.uint32), flat)


def read_kv(cache, layer, end):
    """cache.read(layer, end) (float32 keys and values [T, KVH, HD]) with a float16 cache's widening compiled."""
    if cache.k.dtype != np.float16:
        return cache.read(layer, end)
    k32, v32 = cache.widened_buffers(end)
    widen_float16(cache.k[layer, :end], k32)
    widen_float16(cache.v[layer, :end], v32)
    return k32, v32
