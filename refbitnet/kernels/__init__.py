"""Numba kernels for BitNet b1.58: packed ternary matmul (int8 x ternary -> int32) and the bf16 LM head.

Public API (shapes: S tokens, K inputs, N output rows, V vocabulary rows)::

    ternary_matmul_acc(xq int8 [S, K], packed uint8 [N, K/4])                     -> acc int32 [S, N]
    ternary_matmul(xq int8 [S, K], s f32 [S], packed uint8 [N, K/4], weight_scale) -> y f32 [S, N]
        y = (acc.astype(float32) / s[:, None]) * weight_scale, bit-identical to
        refbitnet.bitlinear.bitlinear_epilogue; weight_scale a float32 scalar or float32 [N] (per row,
        so q/k/v or gate/up can be fused into one matrix with concatenated rows)
    bf16_matmul(x f32 [S, K], table uint16 [V, K])                                 -> f32 [S, V]
        the tied LM head over bf16 bits (e.g. a read-only memory map); no float32 copy of the table
    set_num_threads(n), get_num_threads()

Weights are in the kernel layout of ``refbitnet.layouts.pack_kernel``; activations come from
``refbitnet.quant.absmax_int8``. Results do not depend on the thread count: each output element is
computed by one thread in a fixed order.

Versions (each validated in tests/test_kernels.py against ``reference``; speeds in
benchmarks/bench_kernels.py): ``reference`` (NumPy) -> ``v1_unpacked_int8`` (1 byte per weight)
-> ``v2_packed_scalar`` (2 bits per weight, decoded one by one) -> ``v3_word_planes`` (the fast path used
here) ; ``lm_head`` (v1, widening through a scratch row) and ``lm_head_v2`` (widening in registers, used
by bf16_matmul when K % 16 == 0) for the bf16 head. ``v4_maddubs`` (AVX2 vpmaddubsw through an LLVM
intrinsic; GEMV, and a 4-token register-blocked GEMM for prefill) is what refbitnet.runtime runs.
``v5_prefill`` is the prefill GEMM from unpacked code panels (1 row x 8 tokens per register tile, about
1.3x v4's blocked GEMM at 128 tokens; tests/test_kernels_v5.py), with its own checked wrappers
``ternary_matmul_v5`` and ``prefill_matmul``. ``act_quant`` holds absmax_int8's arithmetic compiled, shared by
the fused quantize-and-lay-out passes (``runtime.quantize_*``, ``act_quant.quantize_token_blocks``).

Numba does no bounds checks, so every wrapper below validates shapes, dtypes, contiguity and sizes and
raises a refbitnet.errors exception before any kernel runs. Byte values are not validated per call (that
would be a second pass over the weights): a field value 3, which pack_kernel never writes, is read as
code 3 (w = +2) by the kernel; validate untrusted weights once with layouts.unpack_kernel.

Threads: ``REFBITNET_THREADS`` (read at import) or set_num_threads(n); default Numba's (all cores).
Importing this package sets ``OMP_WAIT_POLICY=passive`` unless the variable is already set: with OpenMP's
default busy-waiting, idle worker threads spin between the hundred-odd parallel calls of a decode step
and, on a machine with any other work, each call then waits for the scheduler (measured here under load:
2-thread decode 2.0 s per token busy-waiting, 0.32 s passive; a single GEMV 11.7 ms vs 0.2 ms). Fully
passive threads, though, sleep at once and must be woken for each call: that wake-up cost a small GEMV a
third of its time. So it also sets ``GOMP_SPINCOUNT=1000`` unless already set (libgomp honours it even
with the passive policy): an idle worker polls 1000 times before it sleeps, long enough to
catch the next call of a decode step. Measured (2B4T shape, 2 threads, 48 decode steps, 2 runs each):
idle machine 11.7-11.9 -> 13.4-13.9 tokens/s, prefill 65-66 -> 73-79 tokens/s; with a CPU hog on one
core 8.2 -> 7.9-8.7 tokens/s (a spin count of 10000 gave 13.5-15.4 idle but 5.7-6.1 under the hog;
100000: 1.9-2.2). Both only take effect if Numba's OpenMP layer has not started yet in the process.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # read by libgomp when Numba first starts its threads
os.environ.setdefault("GOMP_SPINCOUNT", "1000")       # ... a short spin before sleeping (see above)

# Must run before the first kernel is compiled: without it LLVM picks 128-bit
# vectors for the int16 multiply-adds and the GEMV is about 2x slower. It is process-wide. Numba's
# on-disk cache does not record it; since this package always sets it before compiling, every cached
# kernel of ours was built with it (clear __pycache__/*.nbi|*.nbc if you ever change it).
import llvmlite.binding as _llvm

if not getattr(_llvm, "_refbitnet_maximize_bandwidth", False):
    _llvm.set_option("", "-vectorizer-maximize-bandwidth")
    _llvm._refbitnet_maximize_bandwidth = True

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import RefBitNetError, RefBitNetTypeError  # noqa: E402
from .lm_head import bf16_matmul_v1  # noqa: E402
from .lm_head_v2 import bf16_matmul_v2  # noqa: E402
from .v3_word_planes import MAX_K, ternary_matmul_acc_v3, ternary_matmul_v3  # noqa: E402

__all__ = ["ternary_matmul", "ternary_matmul_acc", "bf16_matmul", "set_num_threads", "get_num_threads"]


# ---------------------------------------------------------------------------------------------- threads
def set_num_threads(n: int) -> None:
    """Use n threads (1 <= n <= numba.config.NUMBA_NUM_THREADS) in the kernels called from this thread."""
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= limit:
        raise RefBitNetError(f"set_num_threads: expected an int in 1..{limit}, found {n!r}")
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the kernels use (numba.get_num_threads())."""
    return numba.get_num_threads()


def _threads_from_env() -> None:
    value = os.environ.get("REFBITNET_THREADS")
    if value is None or value.strip() == "":
        return
    try:
        n = int(value)
    except ValueError:
        raise RefBitNetError(f"REFBITNET_THREADS: expected a positive integer, found {value!r}") from None
    try:
        set_num_threads(n)
    except RefBitNetError as e:
        raise RefBitNetError(f"REFBITNET_THREADS={value!r}: {e}") from None


_threads_from_env()


# ------------------------------------------------------------------------------------------- validation
def _array(a, name, dtype, ndim):
    if not isinstance(a, np.ndarray):
        raise RefBitNetTypeError(f"{name}: expected a numpy {np.dtype(dtype)} array, found {type(a).__name__}")
    if a.dtype != dtype:
        raise RefBitNetTypeError(f"{name}: expected dtype {np.dtype(dtype)}, found {a.dtype}")
    if a.ndim != ndim:
        raise RefBitNetError(f"{name}: expected {ndim} dimension(s), found shape {a.shape}")
    if not a.flags.c_contiguous:
        raise RefBitNetError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray), "
                             f"found strides {a.strides} for shape {a.shape}")
    if a.size == 0:
        raise RefBitNetError(f"{name}: expected a non-empty array, found shape {a.shape}")
    return np.asarray(a)   # a plain ndarray view (np.memmap -> ndarray), never a copy


def _check_ternary_operands(xq, packed):
    xq = _array(xq, "xq", np.int8, 2)                      # [S, K]
    packed = _array(packed, "packed", np.uint8, 2)         # [N, K/4]
    S, K = xq.shape
    if packed.shape[1] * 4 != K:
        raise RefBitNetError(f"packed: expected shape [N, K/4] = [N, {K / 4:g}] for xq of shape {xq.shape} "
                             f"(kernel layout, 4 codes per byte), found {packed.shape}")
    if K % 8 != 0:
        raise RefBitNetError(f"xq: the kernels read 8 codes per uint16 word and need K % 8 == 0, found K = {K}")
    if K > MAX_K:
        raise RefBitNetError(f"xq: K = {K} exceeds {MAX_K}, beyond which the int32 accumulator could overflow")
    return xq, packed


def _check_scales(s, weight_scale, S, N):
    s = _array(s, "s", np.float32, 1)
    if s.shape[0] != S:
        raise RefBitNetError(f"s: expected shape [{S}] (one scale per token of xq), found {s.shape}")
    if isinstance(weight_scale, np.generic):              # a NumPy scalar must already be float32 ...
        if not isinstance(weight_scale, np.float32):
            raise RefBitNetTypeError(f"weight_scale: expected a float32 scalar, found {type(weight_scale).__name__}")
        row_scale = np.full(N, weight_scale, np.float32)
    elif isinstance(weight_scale, (float, int)) and not isinstance(weight_scale, bool):
        row_scale = np.full(N, weight_scale, np.float32)    # ... a Python number is converted to float32 ...
    elif isinstance(weight_scale, np.ndarray):
        if weight_scale.dtype != np.float32:
            raise RefBitNetTypeError(f"weight_scale: expected float32, found dtype {weight_scale.dtype}")
        if weight_scale.shape in ((), (1,)):                  # ... and a 0-d or [1] array broadcasts
            row_scale = np.full(N, weight_scale.reshape(()), np.float32)
        elif weight_scale.shape == (N,):
            row_scale = np.ascontiguousarray(weight_scale)
        else:
            raise RefBitNetError(f"weight_scale: expected a scalar, shape [1] or shape [N] = [{N}], "
                                 f"found {weight_scale.shape}")
    else:
        raise RefBitNetTypeError(f"weight_scale: expected a float32 scalar or float32 array, found "
                                 f"{type(weight_scale).__name__}")
    return s, row_scale


# ------------------------------------------------------------------------------------------- public API
def ternary_matmul_acc(xq: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """xq int8 [S, K], packed uint8 [N, K/4] (layouts.pack_kernel) -> acc int32 [S, N] = xq @ codes.T exactly."""
    xq, packed = _check_ternary_operands(xq, packed)
    return ternary_matmul_acc_v3(xq, packed)


def ternary_matmul(xq: np.ndarray, s: np.ndarray, packed: np.ndarray, weight_scale) -> np.ndarray:
    """BitLinear on packed weights: xq int8 [S, K], s float32 [S], packed uint8 [N, K/4],
    weight_scale float32 scalar / [1] / [N] -> y float32 [S, N] = (float32(acc) / s[:, None]) * weight_scale."""
    xq, packed = _check_ternary_operands(xq, packed)
    s, row_scale = _check_scales(s, weight_scale, xq.shape[0], packed.shape[0])
    return ternary_matmul_v3(xq, s, packed, row_scale)


def bf16_matmul(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """x float32 [S, K], table uint16 [V, K] of bf16 bits -> float32 [S, V] = x @ bf16(table).T.

    Summation order: 16 lanes, see refbitnet.kernels.lm_head; the table is only read. K % 16 == 0 runs
    lm_head_v2 (widening in registers, ~1.3x faster), other K lm_head's v1: the same bits either way.
    """
    x = _array(x, "x", np.float32, 2)
    table = _array(table, "table", np.uint16, 2)
    if table.shape[1] != x.shape[1]:
        raise RefBitNetError(f"table: expected shape [V, K] = [V, {x.shape[1]}] to match x of shape {x.shape}, "
                             f"found {table.shape}")
    if x.shape[1] % 16 == 0:
        return bf16_matmul_v2(x, table)
    return bf16_matmul_v1(x, table)
