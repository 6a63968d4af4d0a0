"""kernels.sync.claim: every chunk handed out exactly once, from the front to even threads and from the back to
odd ones, with one atomic add per claim (the front and back counts packed in one int64)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import get_num_threads, njit, prange

from refbitnet.kernels.sync import claim


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), order=st.lists(st.integers(0, 3), min_size=1, max_size=700))
def test_claims_in_any_order_hand_out_each_chunk_once(n, order):
    """Claims made one after another by threads in any order (what the atomic add serializes them into):
    the first n succeed and take every chunk once; even threads get 0, 1, 2, .. and odd ones n-1, n-2, ..;
    every later claim gets -1."""
    sync = np.zeros(1, np.int64)
    got = {0: [], 1: []}
    taken = []
    for k, thread in enumerate(order):
        task = claim(sync, 0, n, np.int64(thread))
        if k >= n:
            assert task == -1
            continue
        assert 0 <= task < n
        taken.append(task)
        got[thread % 2].append(task)
    assert len(set(taken)) == len(taken)
    assert got[0] == list(range(len(got[0])))
    assert got[1] == [n - 1 - i for i in range(len(got[1]))]
    if len(order) >= n:
        assert sorted(taken) == list(range(n))


@njit(parallel=True)
def _claim_everything(sync, n, n_threads, count):
    for t in prange(n_threads):
        while True:
            task = claim(sync, 0, n, np.int64(t))
            if task < 0:
                break
            count[task] += 1


@pytest.mark.parametrize("n", [1, 2, 7, 64, 5000])
def test_threads_claiming_at_once_take_each_chunk_once(n):
    for _ in range(20):
        sync, count = np.zeros(1, np.int64), np.zeros(n, np.int64)
        _claim_everything(sync, n, get_num_threads(), count)
        assert (count == 1).all()
