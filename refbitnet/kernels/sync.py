"""Row claiming for compiled kernels that share one matrix product between threads.

Why: a decode GEMV is one OpenMP region of ~0.1-0.4 ms. Split in fixed halves, the region lasts until the
later thread is done, and the worker thread often starts late (woken from its wait, or descheduled by a
neighbour on a busy machine). ``claim`` hands out chunks of rows from shared counters (``fetch_add``,
acq_rel) instead: a thread that is not running claims nothing, and the running ones do its share. Used by
the v6 GEMV (``v6_vnni.matmul_scaled_v6``) and the one-token LM head
(``lm_head_v2.bf16_matmul_claimed_v2``); every row is computed by one thread in a fixed order, so the
results do not depend on who claimed it.
"""

from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic


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
