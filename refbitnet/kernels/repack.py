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


def kernel_layout_rows(parts, arena=None) -> np.ndarray:
    """HF-layout packed projections uint8 [N_i/4, K] (one K, K % 4 == 0) -> their rows concatenated in
    kernel layout, uint8 [sum N_i, K/4], written in place (no per-part copies); into the next slice of
    arena (a ``WeightArena``) if one is given, else into a new array."""
    if isinstance(parts, np.ndarray) or not isinstance(parts, (list, tuple)) or not parts:
        raise RefBitNetError(f"parts: expected a non-empty list of uint8 [N/4, K] arrays, found "
                             f"{type(parts).__name__}")
    parts = [check_array(p, f"parts[{i}]", np.uint8, 2, nonempty=True) for i, p in enumerate(parts)]
    k = parts[0].shape[1]
    if k % 4 or any(p.shape[1] != k for p in parts):
        raise RefBitNetError(f"parts: expected uint8 [N/4, K] parts with one K divisible by 4, found shapes "
                             f"{[p.shape for p in parts]}")
    shape = (sum(4 * p.shape[0] for p in parts), k // 4)
    out = np.empty(shape, np.uint8) if arena is None else arena.take(shape)
    r0 = 0
    for p in parts:
        repack_hf_to_kernel(np.ascontiguousarray(p), out[r0:r0 + 4 * p.shape[0]])
        r0 += 4 * p.shape[0]
    return out


class WeightArena:
    """One allocation holding every packed matrix of a model, in the order a decode step reads them.

    Why: a decode step streams each matrix once from memory. As one large NumPy allocation the weights get
    transparent huge pages (NumPy asks for them on allocations of 4 MiB and more; most of the per-layer
    matrices are smaller), so the stream crosses fewer page boundaries, where the hardware prefetcher stops
    and the TLB misses; and consecutive matrices are adjacent, so the GEMV's prefetch past the end of one
    matrix fetches the start of the next. take() hands out C-contiguous views aligned to 64 bytes."""

    ALIGN = 64

    def __init__(self, shapes):
        """shapes: the [rows, bytes per row] of every matrix that take() will be asked for."""
        self.buffer = np.empty(sum(self._padded(r * c) for r, c in shapes), np.uint8)
        self.used = 0

    def _padded(self, n):
        return -(-n // self.ALIGN) * self.ALIGN

    def take(self, shape):
        """The next uint8 [rows, bytes] view (shape as given to the constructor)."""
        n = shape[0] * shape[1]
        if self.used + n > self.buffer.size:
            raise RefBitNetError(f"WeightArena: a matrix of shape {shape} does not fit in the {self.buffer.size - self.used} "
                                 f"bytes left (the arena was sized for other shapes)")
        view = self.buffer[self.used:self.used + n].reshape(shape)
        self.used += self._padded(n)
        return view
