"""Atomics and a polite wait for compiled code that shares work between threads inside one parallel region.

Why: a decode step through one OpenMP region per GEMV wakes and parks the worker threads a hundred times per
token, and on a busy machine a woken worker is often placed on the calling thread's CPU, so the halves of
a GEMV run one after the other and the region then waits for the join (benchmarks/results/decode_profile.md).
``runtime`` instead runs several GEMVs and the glue between them in one region: threads claim chunks of
rows from a shared counter (``fetch_add``), so a thread that is not running claims nothing and the ones
that run do all the work, and the thread that finishes a GEMV's last chunk runs the glue and publishes the
next GEMV's input (``store_release``); the others wait for that (``wait_nonzero``: spinning with ``pause``,
then giving the CPU back with ``sched_yield`` so a neighbour, or our own descheduled thread, can run).

All operate on one element of an int64 array. Orderings: fetch_add is acq_rel, so the last finisher of a
GEMV sees every other thread's rows; store_release / load_acquire publish a buffer with its flag.
"""

from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

SPINS_BEFORE_YIELD = 2000      # pause instructions (~30-60 ns each) before each sched_yield


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
    """One spin-wait hint (x86 ``pause``): lets the sibling hyperthread run and saves power while polling."""
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
    """Wait until arr[index] != 0 and return it: spin with pause, then yield the CPU between polls."""
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


@njit(cache=True)
def claim(sync, total, front, back, n, thread):
    """The next of n chunks for `thread`, or -1 when all are claimed. Even threads take chunks from the
    front (0, 1, ..) and odd ones from the back (n-1, n-2, ..), so with two threads each streams through one
    contiguous half of the rows, as a static split would, and whichever finishes first goes on into the
    other's half until they meet; a thread that never runs takes nothing. sync[total] counts the claims
    (at most n succeed, so the front and back never overlap); sync[front], sync[back] the chunks taken
    from each end."""
    if fetch_add(sync, total, 1) >= n:
        return -1
    if thread % 2 == 0:
        return fetch_add(sync, front, 1)
    return n - 1 - fetch_add(sync, back, 1)
