"""A float16 KV cache (model.new_cache(n, kv_dtype="float16")): keys (after RoPE) and values rounded to
float16 when stored, widened to float32 when read; attention itself computes in float32.

Exact properties (numerics="int"), as for the float32 cache:
- backend="numba" equals backend="numpy" bit for bit on every intermediate and on the cache contents
  (both write through KVCache.store, i.e. NumPy's float32 -> float16 cast, round to nearest even);
  the numba backend's compiled decode step equals its readable layers bit for bit;
- any split of the tokens into prefill/decode blocks gives the same logits bit for bit (a block's own
  keys are rounded before its queries read them, exactly as a lone decoded token's are).
Against the float32 cache (the exact reference):
- layer 0 sees identical q, k, v, so its attention output differs only through the float16 rounding of
  k and v; test_layer0_attention_within_the_derived_bound checks it against a bound derived from the
  actual rounding errors (below);
- the logits: every later layer's int8 quantizers flip codes wherever a value sits within that
  perturbation of a rounding boundary, and a flipped code moves a value by a whole quantization step,
  so the end-to-end difference is not a rounding-sized one. Measured on the four tiny random models,
  seeds 0-2, 64 tokens: relative max|diff| 0.85e-2 .. 2.1e-2 (2,000-10,000 codes flipped); checked to 5e-2;
- greedy decoding of the shipped (trained) model: measured 500 of 500 tokens identical (5 prompts x 100).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet.checkpoint import model_from_tensors
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.generate import generate
from refbitnet.kv_cache import KVCache

from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors

_models = {}
U16 = 2.0 ** -11          # float16 unit roundoff (round to nearest)
U32 = 2.0 ** -24          # float32 unit roundoff


def tiny_model(name, backend="numpy", seed=0):
    key = (name, backend, seed)
    if key not in _models:
        sizes = TINY_CONFIGS[name]
        _models[key] = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, seed),
                                          source=f"tiny {name}", backend=backend)
    return _models[key]


def _ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n)


def _run_blocks(model, ids, cuts, kv_dtype="float16"):
    cache = model.new_cache(len(ids), kv_dtype=kv_dtype)
    out, start = [], 0
    for end in list(cuts) + [len(ids)]:
        if end > start:
            out.append(model.forward(ids[start:end], cache=cache))
            start = end
    return np.concatenate(out), cache


def test_float16_cache_stores_rounded_to_nearest_even_and_reads_float32():
    model = tiny_model("gqa")
    cfg = model.config
    cache = model.new_cache(8, kv_dtype="float16")
    assert cache.dtype == "float16" and cache.k.dtype == np.float16 and cache.v.dtype == np.float16
    assert cache.k.nbytes * 2 == model.new_cache(8).k.nbytes
    shape = (2, cfg.num_key_value_heads, cfg.head_dim)
    k = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    k.flat[:4] = [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, -(1 + 2.0 ** -11), 2.0 ** -26]   # ties -> even; subnormal
    v = -k
    cache.store(1, 3, k, v)
    assert np.array_equal(cache.k[1, 3:5], k.astype(np.float16))
    assert list(cache.k[1, 3].flat[:4]) == [1.0, 1 + 2.0 ** -9, -1.0, 0.0]
    k_all, v_all = cache.read(1, 5)
    assert k_all.dtype == np.float32 and k_all.shape == (5,) + shape[1:]
    assert np.array_equal(k_all[3:], k.astype(np.float16).astype(np.float32))
    assert np.array_equal(v_all[3:], -k_all[3:])
    f32 = model.new_cache(8)
    f32.store(0, 0, k, v)
    assert np.shares_memory(f32.read(0, 2)[0], f32.k) and np.array_equal(f32.read(0, 2)[0], k)   # a view


def test_float16_cache_refuses_values_beyond_its_range():
    model = tiny_model("gqa")
    cfg = model.config
    cache = model.new_cache(4, kv_dtype="float16")
    k = np.ones((1, cfg.num_key_value_heads, cfg.head_dim), np.float32)
    big = k.copy()
    big[0, 0, 5] = 70000.0                           # > 65504: float16 would hold inf
    with pytest.raises(RefBitNetError, match=r"layers.2: values up to \|x\| = 7e\+04 do not fit a float16 KV "
                                             r"cache.*kv_dtype='float32'"):
        cache.store(2, 0, k, big)
    cache.store(2, 0, k, np.full_like(k, 65504.0))   # the largest float16 is fine
    model.new_cache(4).store(2, 0, k, big)           # and float32 holds it


def test_bad_kv_dtype_is_a_clear_error():
    model = tiny_model("gqa")
    for bad in ("bfloat16", "float64", "fp16", "", np.float64, np.dtype(np.int8)):
        with pytest.raises(RefBitNetError, match=r"kv_dtype: expected one of \('float32', 'float16'\)"):
            model.new_cache(4, kv_dtype=bad)
    for bad in (None, 16, True, np.zeros(2), [np.float16]):
        with pytest.raises(RefBitNetTypeError, match="kv_dtype"):
            model.new_cache(4, kv_dtype=bad)
    with pytest.raises(RefBitNetError, match="kv_dtype"):
        KVCache(model.config, 4, "int8")
    with pytest.raises(RefBitNetError, match="kv_dtype"):
        generate(model, [1, 2], 3, kv_dtype="half")              # checked before any work
    with pytest.raises(RefBitNetError, match="kv_dtype"):
        model.generate([1, 2], 3, kv_dtype="float8")
    assert model.new_cache(4, kv_dtype=np.float16).dtype == "float16"
    assert model.new_cache(4).dtype == "float32"


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_float16_numba_backend_equals_numpy_backend(name):
    """numpy backend == numba backend's readable layers on every traced intermediate (bit for bit) and on the
    cache; the numba backend's compiled decode step == its readable layers (logits and cache, bit for bit)."""
    pytest.importorskip("refbitnet.kernels")
    ref, fast = tiny_model(name), tiny_model(name, backend="numba")
    ids = _ids(ref, 14, seed=5)
    caches = {key: m.new_cache(14, kv_dtype="float16") for key, m in
              (("numpy", ref), ("numba_traced", fast), ("numba", fast))}
    for block in (ids[:6],) + tuple(ids[j:j + 1] for j in range(6, 14)):
        t_ref, t_fast = {}, {}
        l_ref = ref.forward(block, cache=caches["numpy"], trace=t_ref)
        l_traced = fast.forward(block, cache=caches["numba_traced"], trace=t_fast)
        l_fast = fast.forward(block, cache=caches["numba"])         # decode blocks: runtime.decode_step
        for key in t_ref:
            if key != "logits":
                assert np.array_equal(t_ref[key], t_fast[key]), key
        assert np.array_equal(l_traced, l_fast)
        assert np.abs(l_ref - l_fast).max() <= 1e-5 * np.abs(l_ref).max()   # LM head summation order only
    for key in ("numba_traced", "numba"):
        assert np.array_equal(caches["numpy"].k, caches[key].k) and np.array_equal(caches["numpy"].v, caches[key].v)


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 19), max_size=6), name=st.sampled_from(list(TINY_CONFIGS)),
       backend=st.sampled_from(["numpy", "numba"]))
def test_float16_any_split_into_blocks_is_bit_identical(cuts, name, backend):
    if backend == "numba":
        pytest.importorskip("refbitnet.kernels")
    model = tiny_model(name, backend=backend)
    ids = _ids(model, 20, seed=len(cuts))
    one_block, c1 = _run_blocks(model, ids, [])
    split, c2 = _run_blocks(model, ids, sorted(set(cuts)))
    assert np.array_equal(split, one_block)
    assert np.array_equal(c1.k, c2.k) and np.array_equal(c1.v, c2.v)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_layer0_attention_within_the_derived_bound(name):
    """Layer 0's q, k, v do not depend on the cache, so its attention differs from the float32 cache's only by
    k' = fl16(k), v' = fl16(v). Per query and head, with scores s_t = c q.k_t (c = HD**-0.5):
      |s'_t - s_t| <= c sum_i |q_i| |k'_ti - k_ti|  (+ float32 rounding of both dot products, <= (HD+2) u32 A_t,
      A_t = c sum_i |q_i k_ti| each) =: delta_t;  softmax weights then change by a factor within exp(+-2 max delta),
      so |w' - w|_1 <= exp(2 delta) - 1 (+ exp/sum/divide rounding in both runs, <= 2 (T+16) u32);
      out' - out = sum_t (w'_t - w_t) v'_t + sum_t w_t (v'_t - v_t), per element d:
      |out'_d - out_d| <= |w' - w|_1 max_t |v'_td| + max_t |v'_td - v_td| + 2 (T+2) u32 max_t |v_td|."""
    model = tiny_model(name)
    cfg = model.config
    ids = _ids(model, 40, seed=2)
    t32, t16 = {}, {}
    model.forward(ids, cache=model.new_cache(40), trace=t32)
    model.forward(ids, cache=model.new_cache(40, kv_dtype="float16"), trace=t16)
    for key in ("q", "k", "v"):
        assert np.array_equal(t32["layers.0." + key], t16["layers.0." + key])
    q, k, v = (t32["layers.0." + key].astype(np.float64) for key in ("q", "k", "v"))   # [S, heads, HD]
    k16 = t32["layers.0.k"].astype(np.float16).astype(np.float64)
    v16 = t32["layers.0.v"].astype(np.float16).astype(np.float64)
    groups, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    c = hd ** -0.5
    diff = np.abs(t16["layers.0.attn"].astype(np.float64) - t32["layers.0.attn"]).reshape(q.shape)   # [S, H, HD]
    worst = 0.0
    for p in range(len(ids)):
        t = p + 1
        for h in range(cfg.num_attention_heads):
            g = h // groups
            qa = np.abs(q[p, h])
            a_t = c * (np.abs(k[:t, g]) @ qa)                                          # [T]
            delta = (c * (np.abs(k16[:t, g] - k[:t, g]) @ qa) + 2 * (hd + 2) * U32 * a_t).max()
            w_change = np.expm1(2 * delta) + 2 * (t + 16) * U32
            bound = (w_change * np.abs(v16[:t, g]).max(axis=0) + np.abs(v16[:t, g] - v[:t, g]).max(axis=0)
                     + 2 * (t + 2) * U32 * np.abs(v[:t, g]).max(axis=0))               # [HD]
            assert (diff[p, h] <= bound).all(), (p, h)
            worst = max(worst, float((diff[p, h] / bound).max()))
    assert diff.max() > 0                                      # the rounding did change something
    print(f"[{name}] layer-0 attention: float16 vs float32 cache |diff| up to {worst:.0%} of the derived bound")


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_float16_vs_float32_cache_logits(name):
    """End to end, measured (module docstring): relative max|diff| 0.85e-2 .. 2.1e-2, checked to 5e-2."""
    for seed in range(2):
        model = tiny_model(name, seed=seed)
        ids = _ids(model, 64, seed=seed)
        a = model.forward(ids, cache=model.new_cache(64))
        b = model.forward(ids, cache=model.new_cache(64, kv_dtype="float16"))
        rel = float(np.abs(a - b).max() / np.abs(a).max())
        print(f"[{name} seed {seed}] float16 vs float32 cache logits: relative max|diff| {rel:.1e}")
        assert 0 < rel <= 5e-2


def test_shipped_model_greedy_float16_vs_float32_cache():
    """Greedy continuations of the shipped model with either cache. Measured: all 5 prompts x 100 tokens
    identical. Asserted: at least 4 of the 5 continuations identical and 400 of the 500 tokens before the
    first divergence (a prompt whose top-2 logits come within the float16 perturbation may diverge)."""
    try:                                # numba when it is there: faster, and the same bits (tests above)
        import refbitnet.kernels  # noqa: F401
        backend = "numba"
    except ImportError:
        backend = "numpy"
    try:
        model = refbitnet.load(backend=backend)
    except RefBitNetError:
        pytest.skip("no shipped model")
    prompts = ["To be, or not to be", "ROMEO:", "The king", "First Citizen:\nBefore we proceed", "O, what a"]
    same_prefix, identical = 0, 0
    for prompt in prompts:
        a = model.generate(prompt, 100, temperature=0.0)
        b = model.generate(prompt, 100, kv_dtype="float16", temperature=0.0)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix += n
        identical += a == b
    print(f"shipped model greedy: {identical}/5 continuations identical, {same_prefix}/500 tokens before the "
          f"first divergence")
    assert identical >= 4 and same_prefix >= 400
