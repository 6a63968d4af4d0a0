"""Hypothesis strategies for the inputs that break BitNet code (needs ``pip install hypothesis``).

Random gaussians almost never hit the cases where implementations differ or crash. These draw them on
purpose:

- ``activations``: rows whose x * s lands exactly on .5 ties (the rounding rule decides the code), rows
  with an outlier channel (every other code collapses to 0 or +-1), all-zero rows (the 1e-5 clamp),
  rows of tiny values near the clamp, and ordinary rows of any magnitude.
- ``weights``: latent weights with entries exactly at +-0.5 * gamma, where gamma is refbitnet's
  absmean_scale of the returned tensor itself (the ternary threshold: ties to even gives 0, half-up
  gives +1 and 0), and all-zero rows.
- ``ternary_codes``: codes with all-zero rows and all-zero blocks of the layout (TQ blocks get d = 0,
  I2_S blocks are all code 1), and all +1 or all -1 rows (the largest |acc|).
- ``layout_shapes`` / ``bitlinear_cases``: (N, K) every layout accepts, with the shape multiples of
  ``refbitnet.testing.dump.LAYOUT_MULTIPLES``; a whole BitLinear case (x, codes, weight_scale) for a layout.

Every strategy returns NumPy arrays; use them with ``@given`` in your own tests::

    from hypothesis import given
    from refbitnet.testing import strategies as bst

    @given(bst.bitlinear_cases("i2_s"))
    def test_my_kernel(case):
        x, codes, scale = case
        ...
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ..quant import absmean_scale
from .dump import LAYOUT_MULTIPLES

ROW_KINDS = ("normal", "ties", "outlier", "zero", "tiny")


def layout_shapes(layout: str, max_n: int = 64, max_k: int = 1024) -> st.SearchStrategy:
    """(N, K) with N % n_multiple == 0 and K % k_multiple == 0 for layout (at least one multiple each)."""
    nm, km = LAYOUT_MULTIPLES[layout]
    return st.tuples(st.integers(1, max(1, max_n // nm)).map(lambda i: i * nm),
                     st.integers(1, max(1, max_k // km)).map(lambda i: i * km))


def _row(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "zero":
        return np.zeros(k, np.float32)
    if kind == "tiny":                                     # max|x| near or under the 1e-5 clamp
        return (rng.standard_normal(k) * 10.0 ** rng.uniform(-8, -4)).astype(np.float32)
    if kind == "ties":                                     # max 127 * 2**-j: s = 2**j exactly, x * s = n + 0.5
        j = int(rng.integers(-4, 5))
        x = ((rng.integers(-126, 126, k) + 0.5) * 2.0 ** -j).astype(np.float32)
        x[int(rng.integers(k))] = np.float32(127 * 2.0 ** -j) * (1 if rng.random() < 0.5 else -1)
        return x
    x = (rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    if kind == "outlier":
        x[int(rng.integers(k))] = np.float32(np.abs(x).max() * 10.0 ** rng.uniform(1, 4))
    return x


@st.composite
def activations(draw, k=None, rows=None, kinds=ROW_KINDS) -> np.ndarray:
    """x float32 [rows, K]: each row one of kinds ("normal", "ties", "outlier", "zero", "tiny").
    k / rows: ints or strategies (default K in 1..512, rows in 1..6)."""
    k = draw(k if isinstance(k, st.SearchStrategy) else st.just(k) if k is not None else st.integers(1, 512))
    n = draw(rows if isinstance(rows, st.SearchStrategy) else st.just(rows) if rows is not None
             else st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n))
    rng = np.random.default_rng(seed)
    x = np.stack([_row(kind, k, rng) for kind in chosen])
    return x


@st.composite
def weights(draw, shape=None, threshold_fraction: float = 0.05, zero_rows: bool = True) -> np.ndarray:
    """w float32 [N, K] with about threshold_fraction of its entries at exactly +-0.5 * absmean_scale(w)
    (of this very tensor: the entries are set and gamma recomputed until the two agree) and, when
    zero_rows, maybe some all-zero rows. shape: (N, K), a strategy of it, or None (N, K in 1..64)."""
    if shape is None:
        shape = st.tuples(st.integers(1, 64), st.integers(1, 64))
    n, k = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    w = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
    if zero_rows and n > 1 and draw(st.booleans()):
        w[rng.random(n) < 0.25] = 0
    at = rng.random((n, k)) < threshold_fraction
    at[rng.integers(n), rng.integers(k)] = True                        # at least one
    sign = np.where(rng.random((n, k)) < 0.5, np.float32(-1), np.float32(1))
    gamma = absmean_scale(w)
    for _ in range(16):                                                 # fixed point of gamma(w)
        w[at] = sign[at] * (gamma * np.float32(0.5))
        new = absmean_scale(w)
        if new == gamma:
            break
        gamma = new
    assume(absmean_scale(w) == gamma and np.all(np.abs(w[at]) == gamma * np.float32(0.5)))
    return w


@st.composite
def ternary_codes(draw, shape=None, layout: str = "codes") -> np.ndarray:
    """codes int8 [N, K] in {-1, 0, 1}: random, with some all-zero rows, all-zero blocks of the layout
    (256 elements for TQ1_0/TQ2_0, 128 for I2_S, 16x32 tiles for bitnet_gpu) and all-+1 / all--1 rows.
    shape: (N, K), a strategy, or None for layout_shapes(layout)."""
    shape = layout_shapes(layout) if shape is None else shape
    n, k = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    block = {"tq2_0": 256, "tq1_0": 256, "i2_s": 128}.get(layout)
    if block and draw(st.booleans()):
        flat = codes.reshape(-1, block)
        flat[rng.random(flat.shape[0]) < 0.3] = 0
    if layout == "bitnet_gpu" and draw(st.booleans()):
        codes[:16, :32] = 0
    for value in draw(st.lists(st.sampled_from([0, 1, -1]), max_size=3)):
        codes[rng.integers(n)] = value
    return codes


@st.composite
def bitlinear_cases(draw, layout: str = "codes", max_n: int = 64, max_k: int = 1024, tokens=None):
    """(x float32 [T, K], codes int8 [N, K], weight_scale float32) for a layout-compatible (N, K)."""
    n, k = draw(layout_shapes(layout, max_n, max_k))
    codes = draw(ternary_codes((n, k), layout))
    x = draw(activations(k, tokens if tokens is not None else st.integers(1, 5)))
    scale = np.float32(draw(st.floats(0.001, 4.0, allow_nan=False)))
    return x, codes, scale
