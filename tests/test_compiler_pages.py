"""kernels.compiler_pages: LLVM's pages go back to the OS after a compile, and compiling still works."""

import sys

import numba
import numpy as np
import pytest

from refbitnet.kernels import compiler_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")


def resident_kib(ranges):
    """KiB of these address ranges resident in this process (the Rss lines of /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                inside = (start, end) in ranges
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@linux_only
def test_release_drops_llvm_pages_and_compiling_still_works():
    ranges = compiler_pages.llvm_mappings()
    assert any(end - start > 16 << 20 for start, end in ranges)     # the library's code, tens of MB

    @numba.njit(cache=False)
    def poly(x):
        return x * x + 3.0 * x - 1.0

    assert poly(2.0) == 9.0                 # a compile touches LLVM's code
    before = resident_kib(ranges)
    assert before > 8 << 10
    if not compiler_pages.release():
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    after = resident_kib(ranges)
    # pages another process maps too are left to it, and the pages written at load (relocations, LLVM's
    # globals) have no file to come back from and stay: alone in a process ~2 of ~68 MiB remain
    assert after < before / 2, (before, after)

    @numba.njit(cache=False)
    def cube(x):
        return x * x * x

    assert cube(np.float64(3.0)) == 27.0   # LLVM's pages come back from the file as it runs
    assert resident_kib(ranges) > after


def test_release_if_compiled_releases_once_per_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(compiler_pages, "release", lambda: calls.append(compiler_pages._USES.count))
    compiler_pages.release_if_compiled()                        # whatever this process compiled so far
    calls.clear()
    compiler_pages.release_if_compiled()
    assert calls == []                                          # nothing compiled since

    @numba.njit(cache=False)
    def add_one(x):
        return x + 1

    assert add_one(1) == 2
    compiler_pages.release_if_compiled()
    assert len(calls) == 1
    assert add_one(2) == 3                                      # compiled already: no compiler
    compiler_pages.release_if_compiled()
    assert len(calls) == 1
