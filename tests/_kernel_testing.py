"""What the kernel test files share: bit-pattern comparison and the thread count put back after each test."""

import numpy as np
import pytest

from refbitnet import kernels

MAX_THREADS = kernels.get_num_threads()


def bits(a):
    """float32 array -> its uint32 bit patterns, so equality means bit-identical (and NaN == NaN)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(autouse=True)
def restore_threads():
    """Tests set the thread count; put the previous one back (autouse in every module that imports it)."""
    n = kernels.get_num_threads()
    yield
    kernels.set_num_threads(n)
