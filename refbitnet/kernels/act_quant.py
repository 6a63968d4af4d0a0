"""Activations for the ternary kernels: absmax_int8 compiled, and every layout a kernel reads, in one place.

``quant.absmax_int8`` (NumPy) is the definition of the int8 codes and scales. A kernel does not read the
codes in k order, though: each reads them rearranged so that its inner loop loads what it multiplies at a
fixed offset. Each layout is written twice here, once readably in NumPy from the int8 codes (what the
oracle entry ``TernaryLinear.matmul(xq, s)`` uses, and what the tests take as the definition), and once
fused with the quantization in a single compiled pass from float32 x (what runs: during decoding the
eight NumPy passes of absmax_int8 cost more than the GEMV they feed):

    kernel             layout                                   readable (NumPy)  fused (compiled)
    v3                 word planes int16 [S, 8, K/8]            word_planes       quantize_word_planes
                         planes[r, t, w] = xq[r, 8w + t] * 4**(3 - t % 4)
    v4                 byte planes int8 [S, 4, K/4]             byte_planes       quantize_byte_planes
                         planes[r, i, j] = xq[r, 4j + i]
    v4_blocked (T=4)   token blocks int8                        token_blocks      quantize_token_blocks
    v5 (T=8)             [ceil(S/T), K/128, T, 4, 32]
                         blocks[b, c, t, i, j] = xq[T b + t, 4 (32 c + j) + i]   (tokens past S: zeros)

Every layout comes with xsum int32 [S] = sum_k xq[r, k] (the kernels compute sum c x with the stored codes
c = w + 1, then subtract sum x) and the fused passes also write s float32 [S]. The fused passes share one
row quantizer, ``quantize_row``, which repeats absmax_int8's float32 operations one value at a time, so
scales and codes are bit-identical to it; each then only rearranges that row's codes.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from ..quant import ACT_ABSMAX_MIN
from .avx2 import CHUNK, CHUNK_WEIGHTS

PLANE_FACTOR = np.array([64, 16, 4, 1, 64, 16, 4, 1], np.int16)   # v3: 4**(3 - t % 4) for field t of a word
ALIGN = 64                 # token blocks start on a cache line: a 32-byte load never straddles two lines


# ------------------------------------------------------------------------------------ one row, compiled
@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is uint32 bits (a bitcast, which Numba has no scalar form of)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True)
def row_scale_int8(row):
    """absmax_int8's scale of one row float32 [K] (C-contiguous): 127 * fl(1 / max(max|x|, 1e-5)) in float32
    (torch's ``127 / t``), or -1 if the row holds a NaN/inf.

    max|x| is taken over the bit patterns with the sign cleared: for finite floats their order as unsigned
    integers is the order of the values, and every inf or NaN pattern lies above every finite one, so one
    integer max finds both the largest |x| (exactly; it is one of the values) and whether anything is not
    finite. Unlike a float max with an early exit at the first NaN, LLVM vectorizes that loop (a decode step
    quantizes four activation rows per layer; the float loop was most of that time)."""
    bits = row.view(np.uint32)
    top = np.uint32(0)
    for k in range(bits.shape[0]):
        top = max(top, bits[k] & np.uint32(0x7FFFFFFF))
    if top >= np.uint32(0x7F800000):                       # an inf (0x7F800000) or a NaN (above it)
        return np.float32(-1.0)
    absmax = _float32_from_bits(np.uint32(top))
    inv = np.float32(np.float32(1.0) / max(absmax, np.float32(ACT_ABSMAX_MIN)))
    return np.float32(np.float32(127.0) * inv)


@njit(cache=True)
def code_int8(v, scale):
    """clip(round_half_even(fl(v * scale)), -128, 127), as a float32 holding an integer (np.rint rounds half
    to even, as np.round does)."""
    q = np.rint(np.float32(v * scale))
    return min(max(q, np.float32(-128.0)), np.float32(127.0))


@njit(cache=True)
def quantize_row(row, q):
    """absmax_int8 of one token: row float32 [K] -> its codes in q int8 [K]; returns (scale, sum of the codes
    as int32, |sum| <= 128 K < 2**31), or (-1, 0) if the row holds a NaN/inf (q is then not written).
    Each fused quantizer calls this, then lays q out the way its kernel reads activations."""
    scale = row_scale_int8(row)
    total = np.int32(0)
    if scale < 0:
        return scale, total
    for k in range(row.shape[0]):
        qi = np.int8(code_int8(row[k], scale))                     # round half to even, clip
        q[k] = qi
        total += np.int32(qi)
    return scale, total


# ------------------------------------------------------------------------------- readable, from int8 codes
def code_sums(xq: np.ndarray) -> np.ndarray:
    """xq int8 [S, K] -> xsum int32 [S] = sum_k xq (|sum| <= 128 K < 2**31)."""
    return xq.sum(axis=1, dtype=np.int64).astype(np.int32)


def word_planes(xq: np.ndarray):
    """v3's layout: xq int8 [S, K] (K % 8 == 0) -> (planes int16 [S, 8, K/8], xsum int32 [S]),
    planes[r, t, w] = xq[r, 8w + t] * PLANE_FACTOR[t] (field t of word w meets the factor that undoes its
    place value 4**(t % 4), see v3_word_planes)."""
    S, K = xq.shape
    planes = xq.reshape(S, K // 8, 8).transpose(0, 2, 1).astype(np.int16)          # [S, 8, K/8]
    return np.ascontiguousarray(planes * PLANE_FACTOR[None, :, None]), code_sums(xq)


def byte_planes(xq: np.ndarray):
    """v4's layout: xq int8 [S, K] (K % 4 == 0) -> (planes int8 [S, 4, K/4], xsum int32 [S]),
    planes[r, i, j] = xq[r, 4j + i] (plane i meets field i of each packed byte)."""
    S, K = xq.shape
    return np.ascontiguousarray(xq.reshape(S, K // 4, 4).transpose(0, 2, 1)), code_sums(xq)


def empty_token_blocks(S: int, K: int, tokens: int) -> np.ndarray:
    """An uninitialized int8 [ceil(S/T), K/128, T, 4, 32] buffer (T = tokens) starting on a 64-byte boundary
    (np.empty of a large array is typically only 16-byte aligned)."""
    shape = (-(-S // tokens), K // CHUNK_WEIGHTS, tokens, 4, CHUNK)
    n = int(np.prod(shape))
    raw = np.empty(n + ALIGN, np.int8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].reshape(shape)


def token_blocks(xq: np.ndarray, tokens: int):
    """v4_blocked's (tokens = 4) and v5's (tokens = 8) layout: xq int8 [S, K] (K % 128 == 0) ->
    (blocks int8 [B, K/128, T, 4, 32], xsum int32 [S]), B = ceil(S/T),
    blocks[b, c, t, i, j] = xq[T b + t, 4 (32 c + j) + i]; the tokens of the last block past S are zeros.
    The T tokens' activations for one 128-weight chunk are adjacent, so a kernel reads them all at fixed
    offsets from one pointer."""
    S, K = xq.shape
    padded = np.zeros((-(-S // tokens) * tokens, K), np.int8)                       # [T B, K]
    padded[:S] = xq
    blocks = empty_token_blocks(S, K, tokens)
    # [T B, K] -> [B, T (t), C, 32 (j), 4 (i)] -> [B, C, t, i, j]
    blocks[...] = padded.reshape(-1, tokens, K // CHUNK_WEIGHTS, CHUNK, 4).transpose(0, 2, 1, 4, 3)
    return blocks, code_sums(xq)


# -------------------------------------------------------------------- fused, from float32 x (compiled)
# Each: x f32 [S, K] -> s f32 [S], its layout, xsum int32 [S], written into the caller's buffers (reused
# between decode steps). Returns -1, or the first row holding a NaN/inf (then nothing is valid: the caller
# reports it through absmax_int8's own error).

@njit(cache=True)
def quantize_word_planes(x, s, planes, xsum):
    """absmax_int8 + word_planes in one pass: planes int16 [S, 8, K/8]."""
    S, K = x.shape
    q = np.empty(K, np.int8)                                         # one token's codes, in k order
    for r in range(S):
        scale, total = quantize_row(x[r], q)
        if scale < 0:
            return r
        s[r] = scale
        xsum[r] = total
        for w in range(K // 8):
            for t in range(8):
                planes[r, t, w] = np.int16(np.int16(q[8 * w + t]) * PLANE_FACTOR[t])
    return -1


@njit(cache=True)
def quantize_byte_planes(x, s, planes, xsum):
    """absmax_int8 + byte_planes in one pass: planes int8 [S, 4, K/4]."""
    S, K = x.shape
    q = np.empty(K, np.int8)
    for r in range(S):
        scale, total = quantize_row(x[r], q)
        if scale < 0:
            return r
        s[r] = scale
        xsum[r] = total
        for j in range(K // 4):
            for i in range(4):
                planes[r, i, j] = q[4 * j + i]
    return -1


@njit(cache=True, parallel=True)
def quantize_token_blocks(x, s, blocks, xsum):
    """absmax_int8 + token_blocks in one pass: blocks int8 [ceil(S/T), K/128, T, 4, 32], T = blocks.shape[2]
    (padding tokens of the last block zeroed). One token per parallel task (prefill: S > 1)."""
    S, K = x.shape
    T = blocks.shape[2]
    bad = np.zeros(S, np.bool_)
    for r in prange(S):
        q = np.empty(K, np.int8)                                   # this token's codes, in k order
        scale, total = quantize_row(x[r], q)
        if scale < 0:
            bad[r] = True
            continue
        s[r] = scale
        xsum[r] = total
        b, t = r // T, r % T
        for c in range(K // 128):
            for i in range(4):
                for j in range(32):
                    blocks[b, c, t, i, j] = q[128 * c + 4 * j + i]
    for r in range(S, blocks.shape[0] * T):                        # padding tokens of the last block
        blocks[r // T, :, r % T, :, :] = 0
    for r in range(S):
        if bad[r]:
            return r
    return -1
