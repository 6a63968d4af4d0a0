"""absmax_int8's arithmetic, compiled, for the fused quantize-and-lay-out passes of the Numba kernels.

``quant.absmax_int8`` (NumPy) is the definition; these two scalar functions repeat its float32 operations
one value at a time, so that a single compiled pass can quantize a token and write its codes straight into
whatever activation layout a kernel reads (``runtime.quantize_*``, ``v5_prefill.quantize_token_blocks``),
with bit-identical scales and codes.
"""

import numpy as np
from numba import njit

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
