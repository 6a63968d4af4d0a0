"""Atomics for compiled code that shares work between threads: row claiming, and publishing a phase.

Why: a decode GEMV is one OpenMP region of ~0.1-0.4 ms. Split in fixed halves, the region lasts until the
later thread is done, and the worker thread often starts late (woken from its wait, or descheduled by a
neighbour on a busy machine). ``claim`` hands out chunks of rows from a shared counter (one ``fetch_add``,
acq_rel, per chunk) instead: a thread that is not running claims nothing, and the running ones do its
share. Used by the v6 GEMV (``v6_vnni.matmul_scaled_v6``), the one-token LM head
(``lm_head_v2.bf16_matmul_claimed_v2``) and the one-region decode step (``refbitnet.decode_step``); every
row is computed by one thread in a fixed order, so the results do not depend on who claimed it.

The decode step also passes work from phase to phase inside one region: each thread adds the number of
chunks it ran to a count once nothing is left to claim (``fetch_add``), the thread whose add completes the
count computes the next phase's input and publishes it (``store_release``); the others wait for that
(``wait_nonzero``: spinning with ``pause``, then giving the CPU back with ``sched_yield`` between polls, so
that on a busy machine a neighbour, or our own descheduled thread, can run). All operate on one element of
an int64 array; fetch_add is acq_rel, so the thread that completes the count sees every other thread's
results, and store_release / load_acquire publish a buffer together with its flag.
"""

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

SPINS_BEFORE_YIELD = 2000      # pause instructions before the wait starts yielding the CPU between polls


def _element_pointer(context, builder, signature, args):
    arr_t = signature.args[0]
    arr = context.make_array(arr_t)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, arr_t, arr, [args[1]])


def _is_int64_array(a):
    return isinstance(a, types.Array) and a.dtype == types.int64 and a.ndim == 1


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """arr[index] += value atomically (acq_rel); returns the value before. arr int64 [n]; no bounds check."""
    if not _is_int64_array(arr):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], signature.args[2], types.int64),
                                  "acq_rel")
    return types.int64(arr, types.intp, types.int64), codegen


@intrinsic
def load_acquire(typingctx, arr, index):
    """arr[index], an atomic load with acquire ordering."""
    if not _is_int64_array(arr):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args), "acquire", 8)
    return types.int64(arr, types.intp), codegen


@intrinsic
def store_release(typingctx, arr, index, value):
    """arr[index] = value, an atomic store with release ordering."""
    if not _is_int64_array(arr):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature, args)
        builder.store_atomic(context.cast(builder, args[2], signature.args[2], types.int64), ptr, "release", 8)
        return context.get_dummy_value()
    return types.none(arr, types.intp, types.int64), codegen


@intrinsic
def cpu_relax(typingctx):
    """One spin-wait hint (x86 ``pause``): tells the core this is a polling loop."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc sched_yield(): give this CPU to another runnable thread (resolved from the process by name)."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@njit(cache=True)
def wait_nonzero(arr, index):
    """Wait until arr[index] != 0 and return it: spin with pause, then yield the CPU between polls. A thread
    that waits here never sleeps in the kernel, so the core stays awake for the next phase (waking a parked
    thread costs tens of microseconds on a virtual machine); yielding lets any other runnable thread go first."""
    spins = 0
    while True:
        v = load_acquire(arr, index)
        if v != 0:
            return v
        spins += 1
        if spins < SPINS_BEFORE_YIELD:
            cpu_relax()
        else:
            sched_yield()


BACK_ONE = np.int64(1) << np.int64(32)   # one claim from the back, in claim's counter word


@njit(cache=True)
def claim(sync, counter, n, thread):
    """The next of n chunks for `thread`, or -1 when all are claimed. Even threads take chunks from the
    front (0, 1, ..) and odd ones from the back (n-1, n-2, ..), so with two threads each streams through one
    contiguous half of the rows, as a static split would, and whichever finishes first goes on into the
    other's half until they meet; a thread that never runs takes nothing.

    One atomic add per claim: sync[counter] holds the chunks taken from the front in its low 32 bits and
    from the back in its high 32 bits (n < 2**31). The claim that finds front + back = k before its own
    add is the k-th; it succeeds if k < n, so at most n succeed. A front claim that took chunk f and a back
    claim that took chunk n-1-b never meet: had f + b = n-1, whichever came second saw the other's chunk
    counted and a sum of at least n, and failed. (A failed claim still adds; its count is never read again.)"""
    if thread % 2 == 0:
        before = fetch_add(sync, counter, 1)
    else:
        before = fetch_add(sync, counter, BACK_ONE)
    front, back = before & np.int64(0xFFFFFFFF), before >> np.int64(32)
    if front + back >= n:
        return -1
    if thread % 2 == 0:
        return front
    return n - 1 - back


@intrinsic
def cycle_counter(typingctx):
    """The CPU's time-stamp counter (llvm.readcyclecounter: rdtsc on x86), int64: for counting where the
    threads of a region spend their time (refbitnet.decode_step's stats)."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen
