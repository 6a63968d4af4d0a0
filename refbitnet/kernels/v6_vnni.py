"""v6: the decode GEMV with AVX-512 VNNI ``vpdpbusd``, masked code fields and software prefetch.

Why: on one core v4 is bound by instructions, not memory (it reads rows from L3 no faster than from DRAM),
and a lone core keeps too few cache-line requests in flight to reach the memory's speed. v6 removes a
third of v4's instructions per chunk and asks for the rows ahead of time:

- ``vpdpbusd`` multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products into an int32 lane:
  one instruction does v4's ``vpmaddubsw`` + ``vpaddw``, with int32 accumulators that cannot overflow for
  any K <= MAX_K, so there is no periodic widening either.
- No shifts: field i of a byte is kept in place, ``W & (3 << 2i)`` = 4**i * c (c = w + 1 in {0, 1, 2},
  at most 2 * 64 = 128, still an unsigned byte). Its products sum to exactly 4**i * sum(c x), so each field
  has its own accumulator, and at the end ``acc_i >> 2i`` is exact (every lane is a multiple of 4**i).
  Per 32-byte chunk (128 weights): 1 load, 4 ``vpand``, 4 ``vpdpbusd`` (v4: 16 instructions).
- UNROLL = 4 chunks per iteration with their own accumulators (16 of them), so that the 4-5 cycle
  latency of ``vpdpbusd`` overlaps; each iteration prefetches the row bytes PREFETCH bytes ahead.

The integers are exact and the epilogue is v4's, fl(fl(float32(acc) / s) * row_scale): the same bits as
every other kernel (tests/test_kernels_door.py). Activations are v4's byte planes
(``act_quant.byte_planes``: planes[i, j] = xq[4j + i]), weights the kernel layout (``layouts.pack_kernel``).
Needs AVX512-VNNI with AVX512-VL (``available()``) and K % 128 == 0; ``TernaryLinear`` runs v4 otherwise.
"""

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from .avx2 import CHUNK, I8, I32, V8I32, V32I8, prefetch
from .sync import claim

__all__ = ["matmul_scaled_v6", "available"]

UNROLL = 4               # chunks per loop iteration, each with its own 4 field accumulators
PREFETCH = 4096          # bytes of the row stream requested ahead of the chunk being read
ROWS_PER_TASK = 32


def available() -> bool:
    """True if this CPU has AVX512-VNNI and AVX512-VL (``vpdpbusd`` on 256-bit registers), unless the
    environment sets REFBITNET_NO_VNNI=1 (to run and test the AVX2 paths on such a CPU; the switch is part of
    the compile cache's directory name, compile_cache, so each setting has its own compiled decode step;
    with NUMBA_CACHE_DIR set by hand, give each setting its own)."""
    if os.environ.get("REFBITNET_NO_VNNI", "") == "1":
        return False
    try:
        features = llvm.get_host_cpu_features()
        return bool(features.get("avx512vnni", False) and features.get("avx512vl", False))
    except Exception:       # noqa: BLE001  (no feature list on this platform: no VNNI kernel)
        return False


@intrinsic
def row_dot(typingctx, row, planes):
    """sum_k c x for one row: row uint8 [K/4] (kernel layout, K/4 % 32 == 0), planes int8 [4, K/4] (one
    token's byte planes) -> int32. No bounds checks: the caller guarantees the shapes."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(planes, types.Array)
            and planes.dtype == types.int8 and planes.ndim == 2):
        return None
    sig = types.int32(row, planes)

    def codegen(context, builder, signature, args):
        row_a = context.make_array(signature.args[0])(context, builder, args[0])
        pl_a = context.make_array(signature.args[1])(context, builder, args[1])
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V8I32] * 3),
                                                "llvm.x86.avx512.vpdpbusd.256")
        n_bytes = builder.extract_value(row_a.shape, 0)
        idx = n_bytes.type
        plane_stride = builder.extract_value(pl_a.strides, 0)                  # bytes between planes (= K/4)
        row_ptr = builder.bitcast(row_a.data, I8.as_pointer())
        pl_ptr = builder.bitcast(pl_a.data, I8.as_pointer())
        masks = [ir.Constant(V32I8, [3 << (2 * i)] * CHUNK) for i in range(4)]
        # accs[u][i]: field i of the chunks u, u + UNROLL, ... (int32 lanes, 4**i * sum c x)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(V8I32, None)) for _ in range(4)]
                for _ in range(UNROLL)]

        def chunk(offset, acc):                      # the 32 bytes at offset into the field accumulators acc
            w = builder.load(builder.bitcast(builder.gep(row_ptr, [offset]), V32I8.as_pointer()), align=1)
            for i in range(4):
                x_off = builder.add(builder.mul(plane_stride, ir.Constant(idx, i)), offset)
                x = builder.load(builder.bitcast(builder.gep(pl_ptr, [x_off]), V8I32.as_pointer()), align=1)
                field = builder.bitcast(builder.and_(w, masks[i]), V8I32)
                builder.store(builder.call(dpbusd, [builder.load(acc[i]), field, x]), acc[i])

        step = CHUNK * UNROLL
        n_steps = builder.udiv(n_bytes, ir.Constant(idx, step))
        with cgutils.for_range(builder, n_steps) as loop:
            base = builder.mul(loop.index, ir.Constant(idx, step))
            for line in range(0, step, 64):          # one prefetch per 64-byte cache line
                ahead = builder.gep(row_ptr, [builder.add(base, ir.Constant(idx, PREFETCH + line))])
                prefetch(builder, ahead)
            for u in range(UNROLL):
                chunk(builder.add(base, ir.Constant(idx, CHUNK * u)), accs[u])
        n_tail = builder.udiv(builder.urem(n_bytes, ir.Constant(idx, step)), ir.Constant(idx, CHUNK))
        tail0 = builder.mul(n_steps, ir.Constant(idx, step))
        with cgutils.for_range(builder, n_tail) as loop:             # the last < UNROLL chunks
            chunk(builder.add(tail0, builder.mul(loop.index, ir.Constant(idx, CHUNK))), accs[0])

        total = None
        for i in range(4):
            field_sum = builder.load(accs[0][i])
            for u in range(1, UNROLL):
                field_sum = builder.add(field_sum, builder.load(accs[u][i]))
            if i:                                    # exact: every lane is a multiple of 4**i
                field_sum = builder.ashr(field_sum, ir.Constant(V8I32, [2 * i] * 8))
            total = field_sum if total is None else builder.add(total, field_sum)
        result = builder.extract_element(total, ir.Constant(I32, 0))
        for lane in range(1, 8):
            result = builder.add(result, builder.extract_element(total, ir.Constant(I32, lane)))
        return result
    return sig, codegen


@njit(cache=True, parallel=True)
def matmul_scaled_v6(packed, planes, xsum, s_act, row_scale, out, sync, n_threads):
    """packed uint8 [N, K/4], planes int8 [S, 4, K/4], xsum int32 [S], s_act f32 [S], row_scale f32 [N]
    -> out f32 [S, N] = fl(fl(float32(acc) / s_act[s]) * row_scale[n]), acc = xq @ w.T exactly
    (``v4_maddubs.matmul_scaled_v4``'s contract and bits). The rows are claimed ROWS_PER_TASK at a time
    (``sync.claim``: its counter sync int64 [1], zeroed here) instead of split in halves in advance: a worker
    that wakes late, or is descheduled, claims less and the running thread does the rest, where a static
    split waits for it. Each row is computed by one thread in a fixed order: the same bits whoever claims
    it. n_threads: numba.get_num_threads() of the caller (one prange iteration per thread)."""
    N = packed.shape[0]
    S = planes.shape[0]
    n_tasks = (N + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    sync[:] = 0
    for t in prange(n_threads):
        while True:
            task = claim(sync, 0, n_tasks, np.int64(t))   # one compiled signature
            if task < 0:
                break
            for s in range(S):
                for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
                    acc = row_dot(packed[n], planes[s]) - xsum[s]
                    y = np.float32(np.float32(acc) / s_act[s])
                    out[s, n] = np.float32(y * row_scale[n])
