"""refbitnet.testing.strategies: each draws what it promises, and properties of refbitnet that hold on them."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import testing as oracle
from refbitnet.quant import Numerics, absmax_int8, absmean_scale, ternary_codes
from refbitnet.testing import strategies as bst
from refbitnet.testing.dump import LAYOUT_MULTIPLES


@settings(max_examples=40)
@given(st.sampled_from(oracle.LAYOUTS).flatmap(
    lambda layout: st.tuples(st.just(layout), bst.bitlinear_cases(layout))))
def test_every_layout_gives_the_same_bitlinear(case):
    layout, (x, codes, scale) = case
    n, k = codes.shape
    nm, km = LAYOUT_MULTIPLES[layout]
    assert n % nm == 0 and k % km == 0 and x.shape[1] == k
    data = oracle.encode(codes, layout, scale=scale)
    back, stored = oracle.decode(data, layout, shape=(n, k))
    assert np.array_equal(back, codes)
    base = oracle.reference_bitlinear(x, codes, weight_scale=scale)
    out = oracle.reference_bitlinear(x, data, layout, shape=(n, k), weight_scale=scale)
    assert np.array_equal(out.acc, base.acc) and np.array_equal(out.y, base.y)
    exact = base.xq.astype(np.int64) @ codes.T.astype(np.int64)
    assert np.array_equal(base.acc, exact)


@settings(max_examples=40)
@given(bst.activations(kinds=("ties",), rows=st.integers(1, 4), k=st.integers(2, 300)))
def test_tie_rows_tie(x):
    _, s = absmax_int8(x)
    q = x * s[:, None]
    assert np.all(np.any(np.abs(q - np.floor(q) - 0.5) == 0, axis=1))


@settings(max_examples=60)
@given(bst.activations())
def test_other_roundings_are_only_benign_flips(x):
    """The classifier's promise: IEEE scales and half-up ties differ from refbitnet only by benign flips."""
    for numerics in ("ieee", Numerics(ties="half_up")):
        check = oracle.compare_int8_codes("xq", x, absmax_int8(x, numerics)[0])
        assert check.ok and check.real == 0, check.detail


@settings(max_examples=40)
@given(bst.weights())
def test_threshold_weights(w):
    gamma = absmean_scale(w)
    at = np.abs(w) == gamma * np.float32(0.5)
    assert at.any()
    even = ternary_codes(w, gamma)
    up = ternary_codes(w, gamma, Numerics(ties="half_up"))
    assert np.all(even[at] == 0)                                          # ties to even: 0
    assert np.all(up[at] == (w[at] > 0))                                  # half up: +0.5 -> 1, -0.5 -> 0
    check = oracle.compare_ternary_codes("w", w, up, gamma=gamma)
    assert check.ok and check.benign == int((w[at] > 0).sum()) and check.real == 0


@settings(max_examples=30)
@given(st.sampled_from(["tq2_0", "i2_s", "bitnet_gpu", "hf"]).flatmap(
    lambda layout: st.tuples(st.just(layout), bst.ternary_codes(layout=layout))))
def test_ternary_codes_fit_their_layout(case):
    layout, codes = case
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 0, 1}
    nm, km = LAYOUT_MULTIPLES[layout]
    assert codes.shape[0] % nm == 0 and codes.shape[1] % km == 0
    assert np.array_equal(oracle.decode(oracle.encode(codes, layout, scale=np.float32(0.5)), layout,
                                        shape=codes.shape)[0], codes)
