"""refbitnet.quant against a torch float32 implementation of docs/SPEC.md §3 and against transformers'
quantizers.

Numerics: float32 throughout (float16/float64 inputs are first converted to float32, as transformers'
``ActQuant``/``WeightQuant`` do with ``.float()``). Activation codes and scales are compared
bit for bit; the weight scale mean|W| is a float reduction whose summation order differs between
numpy and torch, so its difference is bounded in ulps (derivation at ``mean_ulp_bound``) and the
weight codes are compared bit for bit given the same scale.
"""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.quant import (absmax_int8, absmean_scale, absmean_ternary, check_ternary_codes,
                             dequantize_int8, dequantize_ternary, ternary_codes)
from transformers.integrations.bitnet import ActQuant, BitLinear, WeightQuant

U = 2.0 ** -24          # unit roundoff of float32
DTYPES = [np.float16, np.float32, np.float64]
_MAX = {np.float16: 65504.0, np.float32: 3.4e38, np.float64: 3.4e38}    # f64 beyond f32 range is bad input


# ----------------------------------------------------------------------------- input strategies

def _elements(dtype, kind, huge_max=None):
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]
    exact = lambda v: float(dtype(v))                                       # bounds hypothesis accepts for width
    big = exact(_MAX[dtype] if huge_max is None else min(_MAX[dtype], huge_max))
    if kind == "wide":
        return st.floats(-big, big, width=width, allow_nan=False)
    if kind == "tiny":                                                      # below both clamps (1e-5)
        return st.floats(exact(-9e-6), exact(9e-6), width=width, allow_nan=False)
    if kind == "huge":                                                      # above 1e30 (f16: near its max)
        lo = exact(1e4 if dtype == np.float16 else 1e30)
        return st.floats(lo, big, width=width).flatmap(lambda v: st.sampled_from([v, -v]))
    if kind == "zeros":
        return st.sampled_from([0.0, -0.0])
    return st.one_of(_elements(dtype, "wide", huge_max), _elements(dtype, "tiny"), _elements(dtype, "huge", huge_max),
                     _elements(dtype, "zeros"), st.floats(-1, 1, width=width))


@st.composite
def float_inputs(draw, min_dims=1, max_dims=3, max_last=40, last=None, ties=True, dtypes=tuple(DTYPES),
                 huge_max=None):
    """Float arrays [..., K] of every dtype, magnitude class and memory layout the issue lists.

    huge_max caps magnitudes (weights: the float32 sum of |w| must not overflow).
    "ties": each row is (k + 0.5) * 2**e with one entry +-127 * 2**e, so s = 2**-e exactly and
    x * s = k + 0.5 exactly: every element is a rounding tie of absmax_int8.
    """
    dtype = draw(st.sampled_from(dtypes))
    shape = list(draw(array_shapes(min_dims=min_dims, max_dims=max_dims, max_side=4)))
    shape[-1] = last if last is not None else draw(st.integers(1, max_last))
    kinds = ["wide", "tiny", "huge", "zeros", "mixed"] + (["ties"] * 2 if ties else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "ties":
        e = draw(st.integers(-10, 8) if dtype == np.float16 else st.integers(-60, 60))
        k = draw(arrays(np.int64, shape, elements=st.integers(-127, 126)))
        x = (k + 0.5) * 2.0 ** e
        x[..., 0] = draw(st.sampled_from([127.0, -127.0])) * 2.0 ** e
        x = x.astype(dtype)
    else:
        x = draw(arrays(dtype, shape, elements=_elements(dtype, kind, huge_max)))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        big = np.full(x.shape[:-1] + (2 * x.shape[-1],), 7, dtype=dtype)   # junk between the elements
        big[..., ::2] = x
        x = big[..., ::2]
    return x


# ----------------------------------------------------------------------------- torch references

def torch_absmax_int8(x: np.ndarray):
    """docs/SPEC.md §3 activations in torch float32: s = 127 / max(max|x|, 1e-5);
    xq = clip(round(x * s), -128, 127)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    s = 127 / t.abs().amax(dim=-1).clamp(min=1e-5)                         # [...]
    xq = (t * s[..., None]).round().clamp(-128, 127).to(torch.int8)         # [..., K]
    return xq.numpy(), s.numpy()


def torch_absmean(w: np.ndarray):
    """docs/SPEC.md §3 weights in torch float32: gamma = max(mean|w|, 1e-5) (torch's summation order)."""
    return torch.from_numpy(np.ascontiguousarray(w)).float().abs().mean().clamp(min=1e-5).numpy()


def torch_ternary_codes(w: np.ndarray, gamma) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(w)).float()
    return (t / torch.tensor(np.float32(gamma))).round().clamp(-1, 1).to(torch.int8).numpy()


def ulps_apart(a, b) -> int:
    """Number of float32 values between two positive finite float32s (their bit patterns are ordered)."""
    return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def mean_ulp_bound(w32: np.ndarray) -> float:
    """Bound on ulps between two float32 computations of mean|w| that differ only in summation order.

    The n = w.size summands |w_i| are exact and non-negative. Any order of n - 1 float32 additions
    (sequential, pairwise, blocked, vectorized partial sums: every scheme numpy and torch use)
    returns sum * (1 + e) with |e| <= gamma_{n-1} = (n-1) u / (1 - (n-1) u), because with
    non-negative terms every partial sum is at most the total (Higham, Accuracy and Stability,
    §4.2). The division by n adds one rounding: mean' = mean * (1 + e)(1 + d), |d| <= u. So each
    result is within r = (1 + gamma_{n-1})(1 + u) - 1 of the exact mean m, and the two differ by at
    most 2 r m. One ulp at a value v >= m (1 - r) is at least 2**(floor(log2 v) - 23) > v * 2**-24,
    so the distance in ulps is at most 2 r m / (m (1 - r) 2**-24) + 1 (the +1 covers the
    clamp to 1e-5 when m straddles it: clamping only moves both values toward each other).
    """
    n = w32.size
    if (n - 1) * U >= 0.5:                                                  # the a-priori bound says nothing here
        return float("inf")
    gamma_n = (n - 1) * U / (1 - (n - 1) * U)
    r = (1 + gamma_n) * (1 + U) - 1
    return 2 * r / ((1 - r) * U) + 1


def assert_same_values(a, b):
    """Equal as numbers (+0 == -0) and equal dtype: the int8 codes behind them carry no sign of zero."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- activations

@given(float_inputs())
def test_absmax_int8_bit_identical_to_torch_spec(x):
    xq, s = absmax_int8(x)
    xq_t, s_t = torch_absmax_int8(x)
    assert xq.dtype == np.int8 and s.dtype == np.float32
    assert xq.shape == x.shape and np.shape(s) == x.shape[:-1]
    assert np.array_equal(xq, xq_t)
    assert np.array_equal(np.asarray(s).view(np.uint32), s_t.view(np.uint32))


@given(float_inputs())
def test_absmax_dequantized_equals_transformers_actquant(x):
    xq, s = absmax_int8(x)
    ours = dequantize_int8(xq, s).astype(x.dtype)                           # xq / s in float32, back to x's dtype
    theirs = ActQuant.apply(torch.from_numpy(x)).numpy()
    assert_same_values(ours, theirs)


@given(float_inputs(dtypes=(np.float32,)))
def test_absmax_codes_and_scale_equal_transformers_legacy_bitlinear(x):
    # transformers' legacy BitLinear.activation_quant computes in the input dtype: float32 only.
    xq_t, s_t = BitLinear.activation_quant(None, torch.from_numpy(x))
    xq, s = absmax_int8(x)
    assert np.array_equal(xq, xq_t.numpy())
    assert np.array_equal(np.asarray(s).view(np.uint32), s_t.numpy()[..., 0].view(np.uint32))


def test_absmax_ties_round_half_to_even():
    x = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5], np.float32)   # s = 1 exactly
    xq, s = absmax_int8(x)
    assert s == np.float32(1.0)
    assert xq.tolist() == [127, 0, 2, 2, 0, -2, -126, 126]


def test_absmax_clamp_and_extremes():
    xq, s = absmax_int8(np.zeros((2, 5), np.float32))                       # all-zero rows
    assert (xq == 0).all() and (s == np.float32(127) / np.float32(1e-5)).all()
    tiny = np.array([1e-6, -5e-6, 2e-6], np.float32)                        # max|x| < 1e-5: the clamp decides s
    xq, s = absmax_int8(tiny)
    assert s == np.float32(127) / np.float32(1e-5)
    assert xq.tolist() == np.round(tiny * s).astype(np.int8).tolist() == [13, -64, 25]
    # Near float32's max, 1 / m is subnormal (about 7 significant bits), so s is coarse and
    # -1.5e38 lands on -63, not on the tie -63.5 -> -64; torch computes the same.
    big = np.array([3e38, -1.5e38, 1e30, -0.0], np.float32)
    xq, s = absmax_int8(big)
    xq_t, s_t = torch_absmax_int8(big)
    assert xq.tolist() == xq_t.tolist() == [127, -63, 0, 0] and s == s_t and np.isfinite(s) and s > 0


# ----------------------------------------------------------------------------- weights

@given(float_inputs(max_dims=2, max_last=64, ties=False, huge_max=1e35))
def test_absmean_codes_bit_identical_given_scale_and_scale_within_ulp_bound(w):
    codes, gamma = absmean_ternary(w)
    gamma_t = torch_absmean(w)
    w32 = w.astype(np.float32)
    assert gamma.dtype == np.float32 and codes.dtype == np.int8 and codes.shape == w.shape
    assert ulps_apart(gamma, gamma_t) <= mean_ulp_bound(w32)
    assert np.array_equal(codes, torch_ternary_codes(w32, gamma))           # our scale in torch's formula
    assert np.array_equal(ternary_codes(w, gamma_t), torch_ternary_codes(w32, gamma_t))   # torch's scale in ours
    assert np.array_equal(dequantize_ternary(codes, gamma), codes.astype(np.float32) * gamma)


def test_absmean_scale_ulp_difference_on_a_large_matrix():
    # A real projection shape (640 x 2560): the measured difference must respect the derived bound.
    w = np.random.default_rng(0).standard_normal((640, 2560)).astype(np.float32) * np.float32(0.02)
    bound = mean_ulp_bound(w)
    measured = ulps_apart(absmean_scale(w), torch_absmean(w))
    assert measured <= bound, (measured, bound)


def test_weight_codes_at_exact_thresholds():
    gamma = np.float32(0.75)
    w = (np.array([0.5, -0.5, 1.0, 1.5, -1.5, 2.5, 0.49, 0.51, 0.0, -0.0], np.float64) * 0.75).astype(np.float32)
    codes = ternary_codes(w, gamma)
    assert codes.tolist() == [0, 0, 1, 1, -1, 1, 0, 1, 0, 0]                 # 0.5 is a tie: to even, i.e. 0
    assert np.array_equal(codes, torch_ternary_codes(w, gamma))


_multipliers = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.5, -2.5, 0.25, 3.0])


@given(st.floats(2.0 ** -16, 2.0 ** 16, width=32), arrays(np.float64, st.integers(1, 32), elements=_multipliers),
       arrays(np.int8, st.integers(1, 32), elements=st.integers(-1, 1)))
def test_weight_codes_at_and_next_to_every_threshold_bit_identical_to_torch(gamma, mult, nudge):
    # w = m * gamma for m on and around the rounding thresholds 0.5 and 1.5 (0.5 * gamma is exact;
    # 1.5 * gamma may round), and one float32 step up or down from there.
    gamma = np.float32(gamma)
    m = np.resize(mult, max(mult.size, nudge.size))
    w = (m * gamma).astype(np.float32)
    step = np.resize(nudge, w.size)
    w = np.where(step > 0, np.nextafter(w, np.float32(np.inf)), np.where(step < 0, np.nextafter(w, np.float32(-np.inf)), w))
    codes = ternary_codes(w, gamma)
    assert np.array_equal(codes, torch_ternary_codes(w, gamma))
    exact = np.clip(np.round(w.astype(np.float64) / np.float64(gamma)), -1, 1)   # float64 quotient: no double rounding
    assert np.array_equal(codes, exact.astype(np.int8))


@given(float_inputs(max_dims=2, max_last=64, ties=False, huge_max=1e35))
def test_weight_codes_agree_with_transformers_weightquant_except_at_threshold(w):
    # transformers' WeightQuant rounds w * fl(1 / gamma) instead of w / gamma. fl(1/gamma) carries
    # relative error <= u and the product another u, the quotient w / gamma rounds once: both are
    # within 2u + u**2 (relative) of the exact w / gamma, so they can only round to different
    # integers when the exact |w / gamma| is within 3u * 0.5 of the threshold 0.5 (at 1.5 the clip
    # to [-1, 1] hides any difference).
    t = torch.from_numpy(np.ascontiguousarray(w))
    gamma_t = torch_absmean(w)
    theirs = np.sign(WeightQuant.apply(t).float().numpy()).astype(np.int8)  # codes / fl(1/gamma): sign is the code
    ours = ternary_codes(w, gamma_t)
    w32 = w.astype(np.float32)
    differ = ours != theirs
    near = np.abs(np.abs(w32.astype(np.float64) / np.float64(gamma_t)) - 0.5) <= 3 * U * 0.5
    assert not (differ & ~near).any()
    if w.dtype != np.float16:   # WeightQuant returns codes / scale in w's dtype: f16 may flush tiny values to 0
        assert np.array_equal(theirs, np.clip(np.round(w32 * (np.float32(1) / gamma_t)), -1, 1).astype(np.int8))


def test_reciprocal_versus_division_example():
    # A pinned case: w is one float32 step above 0.5 * gamma. Division (docs/SPEC.md, refbitnet) gives +1;
    # transformers' w * fl(1/gamma) gives 0.
    gamma, w = np.float32(0.9487008), np.float32(0.47435042)
    assert w > np.float32(0.5) * gamma
    assert ternary_codes(np.array([w]), gamma)[0] == 1
    assert np.round(w * (np.float32(1) / gamma)) == 0


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn", [absmax_int8, absmean_ternary, absmean_scale])
def test_rejects_nan_inf_and_wrong_types(fn):
    name = "x" if fn is absmax_int8 else "w"
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones((2, 4), np.float32)
        a[1, 2] = bad
        with pytest.raises(RefBitNetError, match=rf"{name}: expected finite values, found {bad} at index \(1, 2\)"):
            fn(a)
    with pytest.raises(RefBitNetError, match="overflow converting float64 to float32"):
        fn(np.array([1e39, 1.0]))
    with pytest.raises(RefBitNetTypeError, match=rf"{name}: expected a float16/float32/float64 array, found dtype int32"):
        fn(np.ones((2, 4), np.int32))
    with pytest.raises(RefBitNetTypeError, match=rf"{name}: expected a numpy array, found list"):
        fn([1.0, 2.0])
    with pytest.raises(RefBitNetError, match=rf"{name}: expected at least 1 dimension"):
        fn(np.ones((), np.float32))
    with pytest.raises(RefBitNetError, match=rf"{name}: expected a non-empty array, found shape \(3, 0\)"):
        fn(np.ones((3, 0), np.float32))


def test_rejects_weights_whose_mean_overflows():
    with pytest.raises(RefBitNetError, match=re.escape("w: expected weights whose mean |w| fits in float32")):
        absmean_ternary(np.full((4, 4), 3e38, np.float32))


def test_rejects_bad_codes_scales_and_shapes():
    with pytest.raises(RefBitNetError, match=r"codes: expected values in \{-1, 0, 1\}, found 2 at index \(0, 1\)"):
        check_ternary_codes(np.array([[0, 2]], np.int8))
    with pytest.raises(RefBitNetError, match="found -3"):
        dequantize_ternary(np.array([-3], np.int8), 1.0)
    with pytest.raises(RefBitNetTypeError, match="codes: expected dtype int8 ternary codes, found int32"):
        check_ternary_codes(np.array([0, 1], np.int32))
    for gamma in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(RefBitNetError, match="gamma: expected a positive finite scale"):
            ternary_codes(np.ones(4, np.float32), gamma)
    with pytest.raises(RefBitNetTypeError, match="xq: expected an int8 array"):
        dequantize_int8(np.ones((2, 3), np.int16), np.ones(2, np.float32))
    with pytest.raises(RefBitNetError, match=r"s: expected shape \(2,\) \(one scale per row of xq\), found \(3,\)"):
        dequantize_int8(np.ones((2, 3), np.int8), np.ones(3, np.float32))
