"""Numba kernels for BitNet b1.58: the packed ternary BitLinear behind one checked door, and the bf16 LM head.

Public API (shapes: S tokens, K inputs, N output rows, V vocabulary rows)::

    TernaryLinear(packed uint8 [N, K/4], weight_scale=1.0, kernel="auto")        (kernels.linear)
        (x f32 [S, K], out=None) -> y f32 [S, N]  absmax_int8 + kernel: BitLinear, numerics "int" (into out)
        .acc(xq int8 [S, K]) -> int32 [S, N]      .matmul(xq, s f32 [S]) -> f32 [S, N]
        .kernel_for(S) -> "v3" | "v4" | "v4_blocked" | "v5" (or the kernel forced by name, KERNELS)
    bf16_matmul(x f32 [S, K], table uint16 [V, K], kernel="auto") -> f32 [S, V]   the tied LM head over bf16
        bits (e.g. a read-only memory map); no float32 copy of the table
    set_num_threads(n), get_num_threads()
    ternary_matmul_acc(xq, packed), ternary_matmul(xq, s, packed, weight_scale): one TernaryLinear call each

Weights are in the kernel layout of ``refbitnet.layouts.pack_kernel`` (``repack.kernel_layout_rows`` makes
it from the release layout at load time); activations are ``refbitnet.quant.absmax_int8``'s, laid out for
each kernel by ``act_quant``. Results do not depend on the thread count.

The ladder, one module per step, each tested bit for bit against ``reference`` (tests/test_kernels*.py)
and timed by benchmarks/bench_kernels.py: ``reference`` (NumPy) -> ``v1_unpacked_int8`` (1 byte per
weight) -> ``v2_packed_scalar`` (2 bits per weight, decoded one by one) -> ``v3_word_planes`` (uint16 words,
vpmaddwd; any K % 8 == 0) -> ``v4_maddubs`` (AVX2 vpmaddubsw: the decode GEMV and a 4-token GEMM) ->
``v5_prefill`` (the prefill GEMM from unpacked code panels); ``lm_head`` (v1) and ``lm_head_v2`` for the bf16
head. ``avx2`` holds the LLVM building blocks of v4 and v5.

Threads: ``REFBITNET_THREADS`` (read at import) or set_num_threads(n); default Numba's (all cores).
Importing this package sets ``OMP_WAIT_POLICY=passive`` unless already set: with OpenMP's default
busy-waiting, idle worker threads spin between the hundred-odd parallel calls of a decode step, and on a
machine with any other work each call then waits for the scheduler. Fully passive threads, though, sleep
at once and must be woken for each call, which costs a small GEMV a good part of its time; so it also sets
``GOMP_SPINCOUNT=1000`` unless already set (libgomp honours it with the passive policy): an idle worker
polls briefly before it sleeps, long enough to catch the next call of a decode step, short enough not to
steal a core from a neighbour (the measurements behind both: benchmarks/results/kernels_history.md). Both
only take effect if Numba's OpenMP layer has not started yet in the process. It also points Numba's
on-disk cache at a directory named by a hash of refbitnet's source (``compile_cache`` says why), unless
NUMBA_CACHE_DIR is set. ``compiler_pages`` hands LLVM's pages back to the OS once kernels are loaded
(runtime.FastPath calls it after each forward that compiled or loaded any).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # read by libgomp when Numba first starts its threads
os.environ.setdefault("GOMP_SPINCOUNT", "1000")       # ... a short spin before sleeping (see above)

# Must run before the first kernel is compiled: without it LLVM picks 128-bit
# vectors for the int16 multiply-adds and the GEMV runs at about half speed. It is process-wide. Numba's
# on-disk cache does not record it; since this package always sets it before compiling, every cached
# kernel of ours was built with it (a change to it here changes this file, so compile_cache's hash too).
import llvmlite.binding as _llvm

if not getattr(_llvm, "_refbitnet_maximize_bandwidth", False):
    _llvm.set_option("", "-vectorizer-maximize-bandwidth")
    _llvm._refbitnet_maximize_bandwidth = True

import numba  # noqa: E402
import numpy as np  # noqa: E402

from . import compile_cache  # noqa: E402

compile_cache.use()     # before any kernel below is decorated: a cache directory per version of the source

from ..checks import check_array, check_choice, check_int  # noqa: E402
from ..errors import RefBitNetError  # noqa: E402
from .linear import KERNELS, TernaryLinear  # noqa: E402
from .lm_head import bf16_matmul_v1  # noqa: E402
from .lm_head_v2 import bf16_matmul_v2  # noqa: E402
from .reference import bf16_matmul_reference  # noqa: E402

__all__ = ["TernaryLinear", "KERNELS", "bf16_matmul", "set_num_threads", "get_num_threads",
           "ternary_matmul", "ternary_matmul_acc"]


# ---------------------------------------------------------------------------------------------- threads
def set_num_threads(n: int) -> None:
    """Use n threads (1 <= n <= numba.config.NUMBA_NUM_THREADS) in the kernels called from this thread."""
    numba.set_num_threads(check_int(n, "set_num_threads", lo=1, hi=numba.config.NUMBA_NUM_THREADS))


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


# ------------------------------------------------------------------------------------------- public API
def ternary_matmul_acc(xq: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """xq int8 [S, K], packed uint8 [N, K/4] -> acc int32 [S, N] = xq @ w.T exactly:
    ``TernaryLinear(packed).acc(xq)``."""
    return TernaryLinear(packed).acc(xq)


def ternary_matmul(xq: np.ndarray, s: np.ndarray, packed: np.ndarray, weight_scale) -> np.ndarray:
    """BitLinear on int8 activations: ``TernaryLinear(packed, weight_scale).matmul(xq, s)`` -> y float32
    [S, N] = fl(fl(float32(acc) / s[:, None]) * weight_scale)."""
    return TernaryLinear(packed, weight_scale).matmul(xq, s)


def bf16_matmul(x: np.ndarray, table: np.ndarray, kernel: str = "auto") -> np.ndarray:
    """x float32 [S, K], table uint16 [V, K] of bf16 bits -> float32 [S, V] = x @ bf16(table).T.

    The same bits from every kernel (the 16-lane summation order of ``reference.bf16_matmul_reference``);
    the table is only read. kernel: "auto" (lm_head_v2, widening in registers, where K % 16 == 0, else
    lm_head's v1), "v1", "v2" (K % 16 == 0) or "reference" (NumPy; widens the whole table: small tables only).
    """
    x = check_array(x, "x", np.float32, 2, contiguous=True, nonempty=True)
    table = check_array(table, "table", np.uint16, 2, contiguous=True, nonempty=True)
    if table.shape[1] != x.shape[1]:
        raise RefBitNetError(f"table: expected shape [V, K] = [V, {x.shape[1]}] to match x of shape {x.shape}, "
                             f"found {table.shape}")
    check_choice(kernel, "kernel", ("auto", "reference", "v1", "v2"))
    if kernel == "auto":
        kernel = "v2" if x.shape[1] % 16 == 0 else "v1"
    if kernel == "v2" and x.shape[1] % 16:
        raise RefBitNetError(f"kernel: 'v2' reads 16 bf16 values per step and needs K % 16 == 0, found K = "
                             f"{x.shape[1]}")
    return {"reference": bf16_matmul_reference, "v1": bf16_matmul_v1, "v2": bf16_matmul_v2}[kernel](x, table)
