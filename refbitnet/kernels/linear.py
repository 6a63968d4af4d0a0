"""TernaryLinear: the one checked door to the packed ternary BitLinear kernels.

Everything that multiplies by packed ternary weights goes through here: the fast model path (float32
activations in, one compiled quantize-and-lay-out pass and one kernel call), the oracle and the tests
(int8 activations in, integer or float results out), the notebooks and the benchmarks (a kernel forced by
name). The weights are checked once, when the object is made; each call checks only its activations; the
compiled kernels behind it check nothing (Numba does no bounds checks).

Which kernel runs (``kernel_for(S)``, S tokens; shown for kernel="auto"):

    AVX2 and K % 128 == 0:  S = 1 "v6" (GEMV, vpdpbusd) where the CPU has AVX512-VNNI, else "v4" (GEMV,
                            vpmaddubsw)  |  2 <= S <= 4 "v4_blocked" (one 4-token block costs about one
                            GEMV)  |  S > 4 "v5" (each tile of codes unpacked once, 8 tokens per pass)
    otherwise:              "v3" (plain Numba, any K % 8 == 0)

kernel= forces one of KERNELS for every S, e.g. to compare them or to teach the ladder: "reference"
(NumPy, int64), "v1" (unpacked int8 codes, unpacked here once), "v2" (scalar decode), "v3", "v4",
"v4_blocked", "v5", "v6". Every kernel gives the same bits: the integers are exact, and the epilogue is the same
float32 expression fl(fl(float32(acc) / s) * row_scale) in every one (``reference.epilogue_reference``).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads

from ..checks import check_array, check_choice, check_int
from ..errors import RefBitNetError, RefBitNetTypeError
from ..layouts import unpack_kernel
from ..quant import absmax_int8
from . import act_quant, v3_word_planes, v4_maddubs, v5_prefill, v6_vnni
from .avx2 import CHUNK_WEIGHTS, available
from .reference import epilogue_reference, ternary_matmul_acc_reference
from .v1_unpacked_int8 import ternary_matmul_acc_v1
from .v2_packed_scalar import ternary_matmul_acc_v2
from .v3_word_planes import MAX_K

KERNELS = ("reference", "v1", "v2", "v3", "v4", "v4_blocked", "v5", "v6")
AVX2_KERNELS = ("v4", "v4_blocked", "v5", "v6")    # 32-byte chunks: AVX2 (v6: AVX512-VNNI), K % 128 == 0
INTEGER_KERNELS = ("reference", "v1", "v2")        # integer accumulators only: the epilogue runs in NumPy


def _row_scale(weight_scale, n: int) -> np.ndarray:
    """weight_scale as float32 [n]: a float32 scalar, a Python number (converted to float32), or a float32
    array of shape (), [1] (broadcast) or [n] (one scale per row: fused projections keep their own)."""
    if isinstance(weight_scale, np.generic):
        if not isinstance(weight_scale, np.float32):
            raise RefBitNetTypeError(f"weight_scale: expected a float32 scalar, found "
                                     f"{type(weight_scale).__name__}")
        return np.full(n, weight_scale, np.float32)
    if isinstance(weight_scale, (float, int)) and not isinstance(weight_scale, bool):
        return np.full(n, weight_scale, np.float32)
    if isinstance(weight_scale, np.ndarray):
        if weight_scale.dtype != np.float32:
            raise RefBitNetTypeError(f"weight_scale: expected float32, found dtype {weight_scale.dtype}")
        if weight_scale.shape in ((), (1,)):
            return np.full(n, weight_scale.reshape(()), np.float32)
        if weight_scale.shape == (n,):
            return np.ascontiguousarray(weight_scale)
        raise RefBitNetError(f"weight_scale: expected a scalar, shape [1] or one scale per row, shape [N] = "
                             f"[{n}], found {weight_scale.shape}")
    raise RefBitNetTypeError(f"weight_scale: expected a float32 scalar or float32 array, found "
                             f"{type(weight_scale).__name__}")


class TernaryLinear:
    """Ternary weights in the kernel layout with one float32 scale per output row, behind a checked door.

    packed:       uint8 [N, K/4], ``layouts.pack_kernel`` (byte j of row n: codes + 1 of k = 4j .. 4j+3),
                  C-contiguous, K % 8 == 0, K <= MAX_K (the int32 bound). Kept by reference, not copied.
                  Byte values are not checked (that would be a pass over the weights): a field 3, which
                  pack_kernel never writes, is read in bounds as code 3 (w = +2), but v4/v5's int16 bound
                  assumes codes <= 2, so many such fields can wrap their sums. Check untrusted weights once
                  with layouts.unpack_kernel (kernel="reference" and "v1" do, as they unpack).
    weight_scale: float32 scalar / [1] / [N], or a Python number; stored as ``row_scale`` float32 [N].
    kernel:       "auto" (the fastest for each S, see the module docstring) or one of KERNELS.

    Entry points (S tokens):
        __call__(x f32 [S, K]) -> y f32 [S, N]       absmax_int8(x), then the kernel: BitLinear, numerics "int"
        acc(xq int8 [S, K]) -> int32 [S, N]          xq @ w.T, exact
        matmul(xq int8 [S, K], s f32 [S]) -> f32 [S, N]   fl(fl(float32(acc) / s) * row_scale)
        kernel_for(S) -> the name of the kernel these run for S tokens

    __call__ with S = 1 (decoding) reuses this matrix's buffers: its result is valid until the next call
    with S = 1 (copy it to keep it). One matrix per thread: the buffers are not shared safely. Results do
    not depend on the thread count (each output is computed by one thread in a fixed order).
    """

    def __init__(self, packed, weight_scale=1.0, kernel: str = "auto"):
        packed = check_array(packed, "packed", np.uint8, 2, contiguous=True, nonempty=True)   # [N, K/4]
        n, k = packed.shape[0], 4 * packed.shape[1]
        if k % 8:
            raise RefBitNetError(f"packed: expected K = 4 * {packed.shape[1]} = {k} to be a multiple of 8 "
                                 f"(the kernels read 8 codes per uint16 word: K % 8 == 0), found shape "
                                 f"{packed.shape}")
        if k > MAX_K:
            raise RefBitNetError(f"packed: K = {k} exceeds {MAX_K}, beyond which the int32 accumulator could "
                                 f"overflow")
        self.kernel = check_choice(kernel, "kernel", ("auto",) + KERNELS)
        self._avx2 = k % CHUNK_WEIGHTS == 0 and available()
        if kernel in AVX2_KERNELS and not self._avx2:
            raise RefBitNetError(f"kernel: {kernel!r} needs AVX2 and K % {CHUNK_WEIGHTS} == 0, found K = {k} "
                                 f"on a CPU {'with' if available() else 'without'} AVX2 (kernel='v3' runs "
                                 f"anywhere)")
        self._vnni = self._avx2 and v6_vnni.available()
        if kernel == "v6" and not self._vnni:
            raise RefBitNetError("kernel: 'v6' needs AVX512-VNNI with AVX512-VL (vpdpbusd), which this CPU "
                                 "lacks (kernel='v4' is the AVX2 GEMV)")
        self.packed = packed                                         # uint8 [N, K/4]
        self.row_scale = _row_scale(weight_scale, n)                 # float32 [N]
        self.shape = (n, k)
        self._words = packed.view(np.uint16)                         # uint16 [N, K/8], v3's view of the rows
        self._codes = unpack_kernel(packed) if kernel == "v1" else None   # int8 [N, K], v1 reads bytes
        self._decode = None                                          # (s, act, xsum, y) for S = 1
        self._sync = np.zeros(1, np.int64)                           # v6's row-claim counter

    def __repr__(self):
        return f"TernaryLinear(N={self.shape[0]}, K={self.shape[1]}, kernel={self.kernel!r})"

    def kernel_for(self, S: int) -> str:
        """The kernel that runs S tokens: the forced one, or "auto"'s choice (see the module docstring)."""
        return self._choose(check_int(S, "S", lo=1))

    def _choose(self, S):
        if self.kernel != "auto":
            return self.kernel
        if not self._avx2:
            return "v3"
        if S == 1:
            return "v6" if self._vnni else "v4"
        return "v4_blocked" if S <= v4_maddubs.TOKENS_PER_PASS else "v5"

    # ---------------------------------------------------------------------------------- float32 x in
    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 [S, K] -> y float32 [S, N] = BitLinear(x), numerics "int" (bitlinear.bitlinear_int
        bit for bit), written into out (float32 [S, N], C-contiguous) when given, which is returned; a
        caller that runs many matrices one after another can so reuse one buffer. A NaN/inf in x raises
        absmax_int8's error."""
        x = check_array(x, "x", np.float32, 2, contiguous=True, nonempty=True)         # [S, K]
        if x.shape[1] != self.shape[1]:
            raise RefBitNetError(f"x: expected float32 [S, K] = [S, {self.shape[1]}] to match packed of shape "
                                 f"{self.packed.shape}, found shape {x.shape}")
        S = x.shape[0]
        if out is not None:
            out = check_array(out, "out", np.float32, 2, contiguous=True)
            if out.shape != (S, self.shape[0]):
                raise RefBitNetError(f"out: expected float32 [S, N] = [{S}, {self.shape[0]}], found shape "
                                     f"{out.shape}")
        kernel = self._choose(S)
        if kernel in INTEGER_KERNELS:
            xq, s = absmax_int8(x)                                   # [S, K] int8, [S] float32
            y = epilogue_reference(self._acc(kernel, xq), s, self.row_scale)
            if out is None:
                return y
            out[...] = y
            return out
        s, act, xsum, y = self._buffers(S, kernel)
        if out is not None:
            y = out
        elif y is None:
            y = np.empty((S, self.shape[0]), np.float32)
        if _QUANTIZE[kernel](x, s, act, xsum) >= 0:
            absmax_int8(x)                      # raises the quantizer's own error naming the NaN/inf
            raise RefBitNetError("x: expected finite values")    # (not reached)
        self._run(kernel, act, xsum, s, self.row_scale, y)
        return y

    def _buffers(self, S, kernel):
        if S == 1 and self._decode is not None:
            return self._decode
        n, k = self.shape
        if kernel in ("v4_blocked", "v5"):      # int8 [ceil(S/T), K/128, T, 4, 32], 64-byte aligned
            act = act_quant.empty_token_blocks(S, k, _TOKENS[kernel])
        elif kernel in ("v4", "v6"):
            act = np.empty((S, 4, k // 4), np.int8)
        else:
            act = np.empty((S, 8, k // 8), np.int16)
        y = np.empty((S, n), np.float32) if S == 1 else None      # S > 1: __call__'s out or a fresh array
        bufs = (np.empty(S, np.float32), act, np.empty(S, np.int32), y)
        if S == 1:
            self._decode = bufs
        return bufs

    def _run(self, kernel, act, xsum, s, row_scale, out):
        """One scaled kernel call: act in `kernel`'s layout (act_quant), xsum int32 [S], s f32 [S],
        row_scale f32 [N] -> out f32 [S, N]."""
        if kernel == "v5":
            v5_prefill.matmul_scaled_v5(self.packed, act, xsum, s, row_scale, out)
        elif kernel == "v4_blocked":
            v4_maddubs.matmul_scaled_v4_blocked(self.packed, act, xsum, s, row_scale, out)
        elif kernel == "v4":
            v4_maddubs.matmul_scaled_v4(self.packed, act, xsum, s, row_scale, out)
        elif kernel == "v6":
            v6_vnni.matmul_scaled_v6(self.packed, act, xsum, s, row_scale, out, self._sync, get_num_threads())
        else:
            v3_word_planes.matmul_scaled(self._words, act, xsum, s, row_scale, out)

    # ------------------------------------------------------------------------------------ int8 xq in
    def _check_xq(self, xq):
        xq = check_array(xq, "xq", np.int8, 2, contiguous=True, nonempty=True)     # [S, K]
        if xq.shape[1] != self.shape[1]:
            raise RefBitNetError(f"xq: expected shape [S, K] = [S, {self.shape[1]}] to match packed of shape "
                                 f"{self.packed.shape} (kernel layout, 4 codes per byte), found {xq.shape}")
        return xq

    def acc(self, xq: np.ndarray) -> np.ndarray:
        """xq int8 [S, K] -> acc int32 [S, N] = xq @ w.T, exact."""
        xq = self._check_xq(xq)
        return self._acc(self._choose(xq.shape[0]), xq)

    def _acc(self, kernel, xq):
        if kernel == "reference":
            return ternary_matmul_acc_reference(xq, self.packed)
        if kernel == "v1":
            return ternary_matmul_acc_v1(xq, self._codes)
        if kernel == "v2":
            return ternary_matmul_acc_v2(xq, self.packed)
        act, xsum = _LAYOUT[kernel](xq)
        out = np.empty((xq.shape[0], self.shape[0]), np.int32)
        if kernel == "v3":
            v3_word_planes.matmul_acc(self._words, act, xsum, out)
            return out
        # v4, v4_blocked, v5, v6 have only the scaled epilogue: with unit scales it returns float32(acc), which
        # is exact because |acc| <= 128 K <= 2**24 (K <= MAX_K), so the integers come back unchanged.
        y = np.empty(out.shape, np.float32)
        self._run(kernel, act, xsum, np.ones(xq.shape[0], np.float32), np.ones(self.shape[0], np.float32), y)
        out[...] = y
        return out

    def matmul(self, xq: np.ndarray, s: np.ndarray) -> np.ndarray:
        """xq int8 [S, K], s float32 [S] (absmax_int8's scales) -> y float32 [S, N] =
        fl(fl(float32(acc) / s[:, None]) * row_scale), bit-identical to bitlinear.bitlinear_epilogue."""
        xq = self._check_xq(xq)
        s = check_array(s, "s", np.float32, 1, contiguous=True)
        if s.shape[0] != xq.shape[0]:
            raise RefBitNetError(f"s: expected shape [{xq.shape[0]}] (one scale per token of xq), found "
                                 f"{s.shape}")
        kernel = self._choose(xq.shape[0])
        if kernel in INTEGER_KERNELS:
            return epilogue_reference(self._acc(kernel, xq), s, self.row_scale)
        act, xsum = _LAYOUT[kernel](xq)
        y = np.empty((xq.shape[0], self.shape[0]), np.float32)
        self._run(kernel, act, xsum, s, self.row_scale, y)
        return y


_TOKENS = {"v4_blocked": v4_maddubs.TOKENS_PER_PASS, "v5": v5_prefill.TOKENS}
_QUANTIZE = {  # kernel -> the fused quantize-and-lay-out pass that writes its activations (act_quant)
    "v3": act_quant.quantize_word_planes,
    "v4": act_quant.quantize_byte_planes,
    "v6": act_quant.quantize_byte_planes,
    "v4_blocked": act_quant.quantize_token_blocks,
    "v5": act_quant.quantize_token_blocks,
}
_LAYOUT = {  # kernel -> the readable layout of int8 codes it reads (act_quant), for the xq entry points
    "v3": act_quant.word_planes,
    "v4": act_quant.byte_planes,
    "v6": act_quant.byte_planes,
    "v4_blocked": lambda xq: act_quant.token_blocks(xq, _TOKENS["v4_blocked"]),
    "v5": lambda xq: act_quant.token_blocks(xq, _TOKENS["v5"]),
}
