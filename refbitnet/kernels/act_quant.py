"""absmax_int8's arithmetic, compiled, for the fused quantize-and-lay-out passes of the Numba kernels.

``quant.absmax_int8`` (NumPy) is the definition; these two scalar functions repeat its float32 operations
one value at a time, so that a single compiled pass can quantize a token and write its codes straight into
whatever activation layout a kernel reads (``runtime.quantize_*``, ``v5_prefill.quantize_token_blocks``),
with bit-identical scales and codes: ``quantize_row`` quantizes one token into a code buffer, and the
layouts are rearrangements of that buffer (``quantize_token_blocks`` here, the plane layouts in
``runtime``).
"""

import numpy as np
from numba import njit, prange

from ..quant import ACT_ABSMAX_MIN


@njit(cache=True)
def row_scale_int8(row):
    """absmax_int8's scale of one row [K]: 127 * fl(1 / max(max|x|, 1e-5)) in float32 (torch's ``127 / t``),
    or -1 if the row holds a NaN/inf."""
    absmax = np.float32(0.0)
    for v in row:
        if not np.isfinite(v):
            return np.float32(-1.0)
        absmax = max(absmax, abs(v))
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


@njit(cache=True, parallel=True)
def quantize_token_blocks(x, s, blocks, xsum):
    """absmax_int8 laid out in token blocks: x f32 [S, K] (K % 128 == 0) -> s f32 [S], xsum int32 [S] and
    blocks int8 [ceil(S/T), K/128, T, 4, 32] with T = blocks.shape[2] tokens per block:
        blocks[b, c, t, i, j] = xq[T b + t, 4 (32 c + j) + i]      (tokens past S are zeros)
    T = 4 is what v4_maddubs.matmul_scaled_v4_blocked reads, T = 8 what v5_prefill.matmul_scaled_v5 reads.
    One token per parallel task. Returns -1, or the first row holding a NaN/inf (then nothing is valid)."""
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
