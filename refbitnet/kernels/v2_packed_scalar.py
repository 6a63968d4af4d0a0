"""v2: the packed kernel layout (2 bits per weight), each code decoded on its own.

Reads uint8 [N, K/4] (``layouts.pack_kernel``): byte j of row n holds c = w + 1 for k = 4j + i at bits 2i.
Per weight: a shift, a mask, a subtract and a multiply-add. The bytes read drop four-fold from v1, but the
decode costs several instructions per weight and LLVM does not turn the per-field shifts into wide vector
code, so this version is bound by instructions, not memory, at about v1's speed or below. The lesson: packing
alone does not make a kernel fast; the arithmetic has to be rearranged so the vector unit does the decode
(v3).
"""

import numpy as np
from numba import njit, prange

i32 = np.int32


@njit(cache=True, parallel=True)
def matmul_acc_packed_scalar(xq, packed, out):
    """xq int8 [S, K], packed uint8 [N, K/4] -> out int32 [S, N] = xq @ codes.T."""
    S = xq.shape[0]
    N, KB = packed.shape
    for n in prange(N):
        row = packed[n]
        for s in range(S):
            xs = xq[s]
            acc = i32(0)
            for j in range(KB):
                byte = i32(row[j])
                for i in range(4):
                    w = i32(((byte >> (2 * i)) & 3) - 1)          # code c in {0,1,2} -> w in {-1,0,1}
                    acc = i32(acc + i32(w * i32(xs[4 * j + i])))
            out[s, n] = acc


def ternary_matmul_acc_v2(xq: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Unchecked: xq int8 [S, K], packed uint8 [N, K/4], both C-contiguous -> int32 [S, N]."""
    out = np.empty((xq.shape[0], packed.shape[0]), np.int32)
    matmul_acc_packed_scalar(xq, packed, out)
    return out
