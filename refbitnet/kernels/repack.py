"""The load-time repack: packed ternary weights from the release (HF) layout to the kernel layout, compiled.

The released checkpoint packs four ROWS per byte (docs/SPEC.md §4: field i of packed[r, c] is the code of row
i*R + r, column c); the kernels read four consecutive COLUMNS of one row per byte (``layouts.pack_kernel``),
so that a row is one contiguous run of codes. The readable definition is
``layouts.pack_kernel(layouts.unpack_hf(packed))``; that goes through an int8 [N, K] copy of the codes per
projection, so the loader uses this single pass instead, which also writes fused projections (q/k/v,
gate/up) straight into one matrix.
"""

import numpy as np
from numba import njit

from ..checks import check_array
from ..errors import RefBitNetError


@njit(cache=True)
def repack_hf_to_kernel(packed, out):
    """HF release layout uint8 [R, K] (R = N/4) -> kernel layout uint8 [N, K/4], into out; one pass.

    Byte j of kernel row i*R + r holds field i of packed[r, 4j .. 4j+3] (lowest bits first). Values are
    moved, not checked (the loader checked them)."""
    R, K = packed.shape
    for r in range(R):
        for j in range(K // 4):
            b0 = packed[r, 4 * j]
            b1 = packed[r, 4 * j + 1]
            b2 = packed[r, 4 * j + 2]
            b3 = packed[r, 4 * j + 3]
            for i in range(4):
                sh = 2 * i
                out[i * R + r, j] = np.uint8(((b0 >> sh) & 3) | (((b1 >> sh) & 3) << 2)
                                             | (((b2 >> sh) & 3) << 4) | (((b3 >> sh) & 3) << 6))


def kernel_layout_rows(parts) -> np.ndarray:
    """HF-layout packed projections uint8 [N_i/4, K] (one K, K % 4 == 0) -> their rows concatenated in
    kernel layout, uint8 [sum N_i, K/4], written in place (no per-part copies)."""
    if isinstance(parts, np.ndarray) or not isinstance(parts, (list, tuple)) or not parts:
        raise RefBitNetError(f"parts: expected a non-empty list of uint8 [N/4, K] arrays, found "
                             f"{type(parts).__name__}")
    parts = [check_array(p, f"parts[{i}]", np.uint8, 2, nonempty=True) for i, p in enumerate(parts)]
    k = parts[0].shape[1]
    if k % 4 or any(p.shape[1] != k for p in parts):
        raise RefBitNetError(f"parts: expected uint8 [N/4, K] parts with one K divisible by 4, found shapes "
                             f"{[p.shape for p in parts]}")
    out = np.empty((sum(4 * p.shape[0] for p in parts), k // 4), np.uint8)
    r0 = 0
    for p in parts:
        repack_hf_to_kernel(np.ascontiguousarray(p), out[r0:r0 + 4 * p.shape[0]])
        r0 += 4 * p.shape[0]
    return out
