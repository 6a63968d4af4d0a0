"""Give LLVM's pages back to the OS once the kernels are loaded.

Why: Numba needs LLVM (llvmlite's ``libllvmlite.so``, about 150 MB of code and tables) to compile a kernel
and to link one it loads from its on-disk cache, never to run one. Importing llvmlite and loading the fast
path's kernels touches about 68 MiB of that file, and those pages would stay in the process's resident set
for as long as it runs: more than a C++ engine holds besides its weights and KV cache
(benchmarks/results/rss.md). ``release()`` asks Linux to reclaim them with ``madvise(MADV_PAGEOUT)`` (Linux
5.4 and later), a hint that never changes what memory holds: a clean page of the file is dropped and read
from the file again if LLVM runs later (a new compile), and a page that was written (relocations, LLVM's
globals) stays, since there is no file to read it back from. LLVM's own heap (the loaded kernels'
machine code among it) is anonymous memory and is not touched.

``release_if_compiled()`` does it only when Numba's compiler ran since the last release: a listener on
Numba's global compiler lock, which every compile and every load from the cache takes, counts its uses.
``runtime.FastPath`` calls it after building and after each forward, where it costs one integer compare.
Elsewhere than Linux both are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import sys

import llvmlite.binding
from numba.core import event

MADV_PAGEOUT = 21                  # <linux/mman.h>
LIBRARY_DIR = os.path.dirname(os.path.abspath(llvmlite.binding.__file__))   # where libllvmlite.so lives


class _CompilerUses(event.Listener):
    """Counts how often Numba's global compiler lock was released (one compile or cache load each)."""

    def __init__(self):
        self.count = 0

    def on_start(self, ev):
        pass

    def on_end(self, ev):
        self.count += 1


_USES = _CompilerUses()
event.register("numba:compiler_lock", _USES)
_released_at = -1                  # _USES.count when release_if_compiled() last released


def llvm_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of libllvmlite, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)          # address perms offset dev inode [path]
            if len(fields) == 6:
                path = fields[5].rstrip("\n")
                if os.path.dirname(path) == LIBRARY_DIR and os.path.basename(path).startswith("libllvmlite"):
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    ranges.append((start, end))
    return ranges


def _madvise():
    """libc's madvise on Linux (looked up once, at import), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _madvise()


def release() -> bool:
    """madvise(MADV_PAGEOUT) over every mapping of libllvmlite; False where the OS does not support it."""
    if _MADVISE is None:
        return False
    ranges = llvm_mappings()
    return bool(ranges) and all(_MADVISE(start, end - start, MADV_PAGEOUT) == 0 for start, end in ranges)


def release_if_compiled() -> None:
    """release() if Numba compiled or loaded anything since this last released."""
    global _released_at
    if _USES.count != _released_at:
        _released_at = _USES.count
        release()
