"""Attention: the readable order (refbitnet.model.attention), the compiled one (refbitnet.attention_kernel), and
what ties them together.

1. NumPy's reduction orders that model.attention relies on, checked on this NumPy against an independent
   model of them: np.sum along a contiguous last axis is the pairwise sum (8 partial sums in blocks of <= 128,
   halves above that, after an initial 0.0); np.sum along axis -2 of a C-ordered array adds in order
   t = 0, 1, 2, ...; glue.pairwise_dot is the first.
2. exp_float32 (model, NumPy) and its compiled twin give the same bits, and stay within 1 ulp of e**x.
3. The compiled attention equals model.attention bit for bit on drawn shapes (the 2B4T head shape 20/5/128
   among them), float32 and float16 caches, every code path (one thread, split decode, rows of a block), and
   a prompt block equals its tokens one by one.
4. model.attention against attention in float64 from the same float32 inputs, within a bound derived below.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import attention_kernel as ak
from refbitnet import glue
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.kv_cache import KVCache
from refbitnet.model import attention, exp_float32

U = 2.0 ** -24                          # unit roundoff of float32


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


# ------------------------------------------------------------------ 1. NumPy's orders, modelled independently
def _pairwise_model(x, lo, n):
    """numpy's pairwise sum of x[..., lo:lo+n] in float32, vectorized over the leading axes (written from
    numpy's loops_utils.h: below 8 one by one from -0.0; up to 128: 8 partial sums, ((r0+r1)+(r2+r3)) +
    ((r4+r5)+(r6+r7)), then the rest one by one; above: split at n/2 rounded down to a multiple of 8)."""
    if n < 8:
        res = np.full(x.shape[:-1], -0.0, np.float32)
        for i in range(lo, lo + n):
            res = res + x[..., i]
        return res
    if n <= 128:
        r = [x[..., lo + j] for j in range(8)]
        i = 8
        while i < n - n % 8:
            r = [r[j] + x[..., lo + i + j] for j in range(8)]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(n - n % 8, n):
            res = res + x[..., lo + i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_model(x, lo, half) + _pairwise_model(x, lo + half, n - half)


def _draw(rng, shape):
    """float32 values over several magnitudes (so that the order of additions shows in the last bits)."""
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)


@pytest.mark.parametrize("n", list(range(1, 140)) + [255, 256, 257, 383, 1000, 1024, 1031, 4096, 4097, 8193,
                                                      20000])
def test_numpy_sums_a_contiguous_last_axis_pairwise(n):
    rng = np.random.default_rng(n)
    for lead in ((), (3,), (2, 1, 5)):
        x = _draw(rng, lead + (n,))
        want = np.float32(0.0) + _pairwise_model(x, 0, n)
        assert np.array_equal(bits(np.sum(x, axis=-1, dtype=np.float32)), bits(want)), lead


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), kvh=st.integers(1, 5), g=st.integers(1, 5), t=st.integers(1, 300),
       hd=st.sampled_from([2, 4, 6, 8, 16, 64, 128, 130, 256]))
def test_numpy_sums_axis_minus_2_of_a_c_ordered_array_in_order(seed, kvh, g, t, hd):
    """np.sum(terms, axis=-2) for C-ordered terms [KVH, G, T, HD] (HD >= 2, as RoPE needs) = 0.0 +
    terms[..., 0, :] + terms[..., 1, :] + ..., one addition after another."""
    terms = _draw(np.random.default_rng(seed), (kvh, g, t, hd))
    acc = np.zeros((kvh, g, hd), np.float32)
    for i in range(t):
        acc = acc + terms[:, :, i]
    assert np.array_equal(bits(np.sum(terms, axis=-2, dtype=np.float32)), bits(acc))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 1100))
def test_pairwise_dot_is_numpys_sum_of_products(seed, n):
    """glue.pairwise_dot (the vectorized block, the explicit stack above 128) = np.sum(a * b) less its 0.0,
    and the block for ROWS rows at once = ROWS single blocks."""
    rng = np.random.default_rng(seed)
    a, b = _draw(rng, n), _draw(rng, n)
    want = np.sum(a * b, dtype=np.float32)
    assert bits(np.float32(0.0) + glue.pairwise_dot(a, b, n)) == bits(want)
    assert bits(glue.pairwise_dot(a, b, n)) == bits(_pairwise_model(a * b, 0, n))
    if n <= 128:
        rows = _draw(rng, (glue.ROWS + 2, n))
        out = np.empty(glue.ROWS, np.float32)
        glue.block_dot_rows(rows, 2, b, n, out)
        assert np.array_equal(bits(out), bits([glue.pairwise_dot(rows[2 + j], b, n) for j in range(glue.ROWS)]))


# ------------------------------------------------------------------ 2. exp
def _ulps(got, x):
    """|got - e**x| in units of the float32 spacing at e**x (2**-149 in the subnormal range), float64."""
    exact = np.exp(x.astype(np.float64))
    spacing = np.ldexp(1.0, np.maximum(np.frexp(exact)[1] - 24, -149))
    return np.abs(got.astype(np.float64) - exact) / spacing


def _exp_numba(x):
    from numba import njit

    @njit(cache=False)
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = ak.exp_float32(x[i])
    out = np.empty_like(x)
    run(x, out)
    return out


SPECIAL = np.array([0.0, -0.0, -1e-30, -1e-7, -0.5, -0.34657359, -0.3465736, -1.0, -10.0, -80.0, -87.33654,
                    -87.33655, -88.0, -100.0, -103.27892, -103.97208, -103.9721, -104.0, -104.1, -200.0,
                    -3.4e38, -np.inf], np.float32)


def test_exp_float32_is_within_one_ulp_and_the_compiled_one_has_its_bits():
    """Every 61st float32 in [-104, 0] (18 million) and special points: model.exp_float32 is within 1 ulp of
    e**x (faithful), and the compiled exp_float32 gives the same bits. (Run once over all 1.12e9 floats in
    [-104, 0], with the stride 1: the same two results.)"""
    x = np.concatenate([np.arange(0x80000000, 0xC2D00001, 61, dtype=np.uint32).view(np.float32), SPECIAL])
    got = exp_float32(x)
    assert _ulps(got, x).max() < 1.0
    assert np.array_equal(bits(_exp_numba(x)), bits(got))
    assert exp_float32(np.float32(0.0)) == 1.0 and exp_float32(np.array([-np.inf], np.float32))[0] == 0.0
    nan = np.array([np.nan], np.float32)
    assert np.isnan(exp_float32(nan)[0]) and np.isnan(_exp_numba(nan)[0])


# ------------------------------------------------------------------ 3. compiled == readable, bit for bit
HEAD_SHAPES = [(20, 5, 128), (4, 2, 16), (6, 3, 8), (5, 5, 8), (4, 1, 8), (8, 1, 32), (10, 2, 64), (2, 1, 2),
               (3, 3, 130), (2, 2, 256), (5, 1, 6)]       # (H, KVH, HD): G = 4, 2, 1, 8, 5 (4 + 1), HD > 128


def _qkv(seed, s_len, t_len, shape, magnitude, kv_dtype):
    n_heads, n_kv, hd = shape
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((s_len, n_heads, hd)) * magnitude).astype(np.float32)
    kv = (rng.standard_normal((2, t_len + 3, n_kv, hd)) * magnitude).astype(kv_dtype)
    return q, kv[0, :t_len], kv[1, :t_len]           # prefixes of a longer block, as a cache holds them


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(HEAD_SHAPES), s_len=st.integers(1, 9),
       start=st.integers(0, 400), magnitude=st.sampled_from([0.01, 1.0, 30.0, 300.0]),
       kv_dtype=st.sampled_from([np.float32, np.float16]), split=st.booleans())
def test_compiled_attention_equals_model_attention(seed, shape, s_len, start, magnitude, kv_dtype, split):
    """attention_kernel.attention(q, k, v) = model.attention(q, k, v widened to float32), bit for bit; split:
    every call takes the threaded paths (the decode step split in three loops, or one query per task)."""
    q, k, v = _qkv(seed, s_len, start + s_len, shape, magnitude, kv_dtype)
    want = attention(q, k.astype(np.float32), v.astype(np.float32), start)
    serial_work = ak.SERIAL_WORK
    try:
        ak.SERIAL_WORK = -1 if split else serial_work
        got = ak.attention(q, k, v, start)
    finally:
        ak.SERIAL_WORK = serial_work
    assert np.array_equal(bits(got), bits(want))


def _attention_plain(q, k, v, start):
    """model.attention written plainly, one query head at a time on 1-D and 2-D arrays (each reduction over a
    contiguous last axis, or over axis 0 of a C-ordered [T, HD]): the operations it must reproduce however
    it is arranged."""
    s_len, n_heads, head_dim = q.shape
    groups = n_heads // k.shape[1]
    scale = np.float32(head_dim ** -0.5)
    out = np.empty_like(q)
    for i in range(s_len):
        t = start + i + 1
        for h in range(n_heads):
            kh, vh = k[:t, h // groups], v[:t, h // groups]                         # [T, HD]
            scores = np.sum(q[i, h] * kh, axis=-1, dtype=np.float32) * scale        # [T]
            e = exp_float32(scores - scores.max())
            weights = e / np.sum(e, dtype=np.float32)
            out[i, h] = np.sum(weights[:, None] * vh, axis=0, dtype=np.float32)    # [HD]
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(HEAD_SHAPES), s_len=st.integers(1, 6),
       start=st.integers(0, 300), magnitude=st.sampled_from([1.0, 30.0]))
def test_model_attention_equals_the_plain_formula(seed, shape, s_len, start, magnitude):
    """model.attention (all heads of a query at once, products C-ordered) = the per-head formula, bitwise."""
    q, k, v = _qkv(seed, s_len, start + s_len, shape, magnitude, np.float32)
    assert np.array_equal(bits(attention(q, k, v, start)), bits(_attention_plain(q, k, v, start)))


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("t_len", [1, 129, 1000, 4096])
def test_2b4t_heads_long_context_decode_and_blocks(kv_dtype, t_len):
    """The 2B4T head shape over long contexts (past SERIAL_WORK: the threaded decode step), through a KVCache as
    the fast path reads it (attend): the last query alone and a block of 3 ending there, bit for bit."""
    class Config:
        num_hidden_layers, num_key_value_heads, head_dim = 2, 5, 128
    cache = KVCache(Config, t_len + 4, dtype=np.dtype(kv_dtype).name)
    q, k, v = _qkv(t_len, 3, t_len, (20, 5, 128), 3.0, np.float32)
    cache.store(1, 0, k, v)
    k32, v32 = cache.read(1, t_len)
    for s_len in (1, 3):
        start = t_len - s_len
        if start < 0:
            continue
        want = attention(q[:s_len], k32, v32, start)
        assert np.array_equal(bits(ak.attend(q[:s_len], cache, 1, start)), bits(want))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(HEAD_SHAPES), s_len=st.integers(2, 12),
       start=st.integers(0, 40), kv_dtype=st.sampled_from([np.float32, np.float16]))
def test_a_block_equals_its_tokens_one_by_one(seed, shape, s_len, start, kv_dtype):
    """Prefill of a block = decoding its tokens one at a time (each query sees exactly the keys up to its
    position), on both paths: the property the KV cache relies on."""
    q, k, v = _qkv(seed, s_len, start + s_len, shape, 2.0, kv_dtype)
    k32, v32 = k.astype(np.float32), v.astype(np.float32)
    block = attention(q, k32, v32, start)
    one_by_one = np.concatenate([attention(q[i:i + 1], k32[:start + i + 1], v32[:start + i + 1], start + i)
                                 for i in range(s_len)])
    compiled = np.concatenate([ak.attention(q[i:i + 1], k[:start + i + 1], v[:start + i + 1], start + i)
                               for i in range(s_len)])
    assert np.array_equal(bits(block), bits(one_by_one))
    assert np.array_equal(bits(ak.attention(q, k, v, start)), bits(block))
    assert np.array_equal(bits(compiled), bits(block))


def test_compiled_attention_checks_its_arguments():
    q, k, v = _qkv(0, 2, 5, (4, 2, 8), 1.0, np.float32)
    with pytest.raises(RefBitNetTypeError, match="attention k"):
        ak.attention(q, k.astype(np.float64), v, 3)
    with pytest.raises(RefBitNetTypeError, match="attention q"):
        ak.attention(q.astype(np.float16), k, v, 3)
    with pytest.raises(RefBitNetError, match="attention v"):
        ak.attention(q, k, v.astype(np.float16), 3)
    with pytest.raises(RefBitNetError, match="attention start"):
        ak.attention(q, k, v, 4)                         # keys end at 4: the second query (position 5) has none
    with pytest.raises(RefBitNetError, match="H % KVH"):
        ak.attention(np.ascontiguousarray(q[:, :3]), k, v, 3)
    with pytest.raises(RefBitNetError, match="C-contiguous"):
        ak.attention(q, k[::-1], v, 3)
    with pytest.raises(RefBitNetError, match="out"):
        ak.attention(q, k, v, 3, out=np.empty((2, 4, 9), np.float32))


# ------------------------------------------------------------------ 4. against float64
def _depth(n):
    """The number of roundings a term goes through in numpy's pairwise sum of n terms (its longest chain)."""
    if n < 8:
        return max(n - 1, 0)
    if n <= 128:
        return (n // 8 - 1) + 3 + n % 8
    half = n // 2 - (n // 2) % 8
    return 1 + max(_depth(half), _depth(n - half))


def _gamma(m):
    return m * U / (1 - m * U)


def _attention_f64_and_bound(q, k, v, start):
    """Attention in float64 from the same float32 inputs (and the same float32 scale), and a bound on
    |model.attention - it| per output element, from the error of each float32 step:

    score s_t = fl(fl(q.k) * scale): the pairwise dot has each product rounded and depth(HD) additions
      above it, |err| <= gamma(depth(HD) + 1) * scale * sum_i |q_i k_ti| + U |s_t| =: es_t;
    x_t = fl(s_t - max s): |err| <= es_t + max es + U |x_t| =: ex_t (the max is exact, of rounded scores);
    e_t = exp_float32(x_t): within 1 ulp (relative 2U) of e**(x_t + err) = e**x_t e**err, so its relative
      error is at most a_t = e**ex_t (1 + 2U) - 1; one that underflows may be off by 2**-149 absolutely,
      its weight by 2**-149 (the sum is >= 1);
    Z = pairwise sum of the e_t (all >= 0): within a factor (1 +- max a)(1 +- gamma(depth(T)));
    w_t = fl(e_t / Z): relative error <= (1 + a_t)(1 + U) / ((1 - max a)(1 - gamma(depth(T)))) - 1 =: ew_t;
    o = 0 + fl(w_0 v_0) + fl(w_1 v_1) + ... one after another: |err| <= sum_t ew_t w_t |v_t| (the weights)
      + gamma(T) sum_t (1 + ew_t) w_t |v_t| (the T products and additions) + T 2**-149 max |v| (underflow).
    A factor 1.001 covers the float64 reference's own rounding.
    """
    s_len, n_heads, hd = q.shape
    groups = n_heads // k.shape[1]
    scale = float(np.float32(hd ** -0.5))
    out = np.empty((s_len, n_heads, hd))
    bound = np.empty((s_len, n_heads, hd))
    for i in range(s_len):
        t = start + i + 1
        for h in range(n_heads):
            qh = q[i, h].astype(np.float64)
            kh, vh = k[:t, h // groups].astype(np.float64), v[:t, h // groups].astype(np.float64)
            s = kh @ qh * scale                                                   # [T]
            x = s - s.max()
            w = np.exp(x) / np.exp(x).sum()
            out[i, h] = w @ vh
            es = _gamma(_depth(hd) + 1) * scale * (np.abs(kh) @ np.abs(qh)) + U * np.abs(s)
            ex = es + es.max() + U * np.abs(x)
            a = np.exp(ex) * (1 + 2 * U) - 1
            ew = (1 + a) * (1 + U) / ((1 - a.max()) * (1 - _gamma(_depth(t)))) - 1 if a.max() < 1 else np.inf
            per_t = (ew + _gamma(t) * (1 + ew)) * w                               # [T]
            bound[i, h] = 1.001 * (per_t @ np.abs(vh)) + t * 2.0 ** -149 * np.abs(vh).max(axis=0)
    return out, bound


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(HEAD_SHAPES), s_len=st.integers(1, 4),
       start=st.integers(0, 300), magnitude=st.sampled_from([0.01, 1.0, 10.0, 100.0]))
def test_model_attention_is_within_the_float64_bound(seed, shape, s_len, start, magnitude):
    """model.attention (float32) against the same attention in float64, per element within the derived bound
    (magnitude 100 spreads scores over thousands: most weights underflow there)."""
    q, k, v = _qkv(seed, s_len, start + s_len, shape, magnitude, np.float32)
    exact, bound = _attention_f64_and_bound(q, k, v, start)
    err = np.abs(attention(q, k, v, start).astype(np.float64) - exact)
    assert np.isfinite(bound).all()
    assert (err <= bound).all(), float((err / bound).max())
