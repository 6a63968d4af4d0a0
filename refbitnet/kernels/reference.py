"""The NumPy reference every Numba kernel in this package must reproduce exactly.

Three products (S tokens, K inputs, N output rows, V vocabulary rows):

- ``ternary_matmul_acc_reference``: int8 activations xq [S, K] times ternary weights stored in the kernel
  layout (``refbitnet.layouts.pack_kernel``: uint8 [N, K/4]) -> int32 accumulators [S, N]. Integer
  arithmetic, so "exact" has one meaning: every accumulator equal.
- ``epilogue_reference``: acc -> float32 y = (acc / s) * weight_scale, the BitLinear epilogue
  (docs/SPEC.md §3), float32 ops in exactly this order, so a kernel that fuses it must round identically.
- ``bf16_matmul_reference``: the tied LM head, float32 activations x [S, K] times bf16 rows of the
  embedding table (uint16 bits [V, K]) -> float32 [S, V]. A float sum depends on its order, so this
  reference fixes one ("16 lanes", below) that a vectorized kernel can follow without fastmath.
"""

import numpy as np

from ..bf16 import bf16_to_f32
from ..layouts import unpack_kernel

LANES = 16   # bf16_matmul: number of interleaved partial sums (two 8-float AVX2 registers)


def ternary_matmul_acc_reference(xq: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """xq int8 [S, K], packed uint8 [N, K/4] (kernel layout) -> acc int32 [S, N], acc = xq @ codes.T exactly."""
    codes = unpack_kernel(packed)                                   # [N, K] int8 in {-1, 0, 1}
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T            # [S, N] exact in int64
    return acc.astype(np.int32)                                      # |acc| <= 128 K < 2**31


def epilogue_reference(acc: np.ndarray, s: np.ndarray, weight_scale) -> np.ndarray:
    """acc int32 [S, N], s float32 [S], weight_scale float32 scalar or [N] -> y float32 [S, N].

    y = (acc.astype(float32) / s[:, None]) * weight_scale, two float32 roundings in this order
    (the same expression as refbitnet.bitlinear.bitlinear_epilogue).
    """
    return (acc.astype(np.float32) / s[:, None]) * weight_scale


def ternary_matmul_reference(xq, s, packed, weight_scale) -> np.ndarray:
    """The whole integer BitLinear on packed weights: epilogue(acc(xq, packed), s, weight_scale) -> f32 [S, N]."""
    return epilogue_reference(ternary_matmul_acc_reference(xq, packed), s, weight_scale)


def bf16_matmul_reference(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """x float32 [S, K], table uint16 bf16 bits [V, K] -> float32 [S, V] in the kernels' summation order.

    For each output (t, v), products p[k] = x[t, k] * w[v, k] are rounded to float32 and summed into
    LANES partial sums, lane l taking k = l, l + 16, l + 32, ... in increasing k; then the lanes are
    added left to right: ((lane0 + lane1) + lane2) + ... + lane15. No fused multiply-add anywhere.
    This widens the whole table to float32, so it is for tests on small tables only.
    """
    w = bf16_to_f32(table)                                           # [V, K] float32
    S, K = x.shape
    lanes = np.zeros((S, w.shape[0], LANES), np.float32)             # [S, V, 16]
    for k0 in range(0, K, LANES):
        k1 = min(K, k0 + LANES)
        prod = x[:, None, k0:k1] * w[None, :, k0:k1]                 # [S, V, k1-k0] float32
        lanes[:, :, : k1 - k0] += prod
    out = lanes[:, :, 0].copy()                                      # [S, V]
    for lane in range(1, LANES):
        out += lanes[:, :, lane]
    return out
