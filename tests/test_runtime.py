"""refbitnet.runtime (the numba backend's BitLinear hot path) against the checked public pieces it fuses.

quantize_planes must equal quant.absmax_int8 followed by v3_word_planes.planes_for bit for bit (s, the int16
planes, the int32 sum of codes), including round-half-to-even ties, all-zero rows (the 1e-5 floor) and
values that clip at -128; PackedLinear must equal kernels.ternary_matmul on the same codes bit for bit, for
S = 1 (reused buffers) and S > 1. forward(last_only=True) must be the last row of the full logits exactly.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("refbitnet.kernels")

from refbitnet import kernels, runtime  # noqa: E402
from refbitnet.checkpoint import model_from_tensors  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402
from refbitnet.kernels import act_quant  # noqa: E402
from refbitnet.kernels.v3_word_planes import planes_for  # noqa: E402
from refbitnet.layouts import pack_kernel  # noqa: E402
from refbitnet.quant import absmax_int8  # noqa: E402

from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors  # noqa: E402


def _activations(seed, s_len, k, kind):
    rng = np.random.default_rng(seed)
    if kind == "ties":             # halves: x * s lands on .5 for many entries when max|x| = 127
        x = rng.integers(-254, 255, (s_len, k)).astype(np.float32) / 2
        x[:, 0] = 127.0
    elif kind == "zeros":
        x = np.zeros((s_len, k), np.float32)
    elif kind == "tiny":           # below the 1e-5 absmax floor
        x = (rng.standard_normal((s_len, k)) * 1e-7).astype(np.float32)
    else:                          # wide dynamic range, one extreme negative value per row (-> -128 or -127)
        x = (rng.standard_normal((s_len, k)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
        x[:, -1] = -np.abs(x).max(axis=1) * 1.004
    return x


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 4), words=st.integers(1, 40),
       kind=st.sampled_from(["normal", "ties", "zeros", "tiny"]))
def test_quantize_planes_equals_absmax_int8_then_planes(seed, s_len, words, kind):
    x = _activations(seed, s_len, 8 * words, kind)
    xq, s = absmax_int8(x)
    planes, xsum = planes_for(xq)
    s2, planes2 = np.empty(s_len, np.float32), np.empty(planes.shape, np.int16)
    xsum2 = np.empty(s_len, np.int32)
    assert runtime.quantize_planes(x, s2, planes2, xsum2) == -1
    assert np.array_equal(s, s2) and np.array_equal(planes, planes2) and np.array_equal(xsum, xsum2)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 5), n4=st.integers(1, 24), words=st.integers(1, 40))
def test_packed_linear_equals_ternary_matmul(seed, s_len, n4, words):
    rng = np.random.default_rng(seed)
    n, k = 4 * n4, 8 * words
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    row_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
    linear = runtime.PackedLinear(pack_kernel(codes), row_scale)
    for step in range(2):          # the second S = 1 call reuses the first one's buffers
        x = _activations(seed + step, s_len, k, "normal")
        xq, s = absmax_int8(x)
        assert np.array_equal(linear(x), kernels.ternary_matmul(xq, s, pack_kernel(codes), row_scale))


def test_packed_linear_rejects_bad_input():
    linear = runtime.PackedLinear(pack_kernel(np.zeros((4, 16), np.int8)), np.ones(4, np.float32))
    x = np.ones((1, 16), np.float32)
    x[0, 5] = np.inf
    with pytest.raises(RefBitNetError, match="finite"):
        linear(x)
    with pytest.raises(RefBitNetError, match="float32"):
        linear(np.ones((1, 8), np.float32))
    with pytest.raises(RefBitNetError, match="float32"):
        linear(np.ones((1, 16), np.float64))
    with pytest.raises(RefBitNetError, match="multiple of 8"):
        runtime.PackedLinear(np.zeros((4, 3), np.uint8), np.ones(4, np.float32))
    with pytest.raises(RefBitNetError, match="row_scale"):
        runtime.PackedLinear(np.zeros((4, 4), np.uint8), np.ones(3, np.float32))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_forward_last_only_is_the_last_row(backend):
    sizes = TINY_CONFIGS["gqa"]
    model = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, 0), source="tiny", backend=backend)
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, 9)
    full = model.forward(ids)
    last = model.forward(ids, last_only=True)
    assert last.shape == (1, full.shape[1]) and np.array_equal(last, full[-1:])
    cache = model.new_cache(16)
    assert np.array_equal(model.forward(ids, cache=cache, last_only=True), full[-1:])
    assert cache.length == 9


def test_kernel_layout_rows_equals_readable_repack():
    from refbitnet.layouts import pack_hf, unpack_hf
    rng = np.random.default_rng(8)
    for k, ns in ((4, (4,)), (12, (8, 4)), (48, (160, 40, 40)), (120, (24, 24))):
        parts = [pack_hf(rng.integers(-1, 2, size=(n, k)).astype(np.int8)) for n in ns]
        assert np.array_equal(runtime.kernel_layout_rows(parts),
                              np.concatenate([pack_kernel(unpack_hf(p)) for p in parts]))
    with pytest.raises(RefBitNetError, match="divisible by 4"):
        runtime.kernel_layout_rows([np.zeros((1, 6), np.uint8)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 12), n=st.integers(1, 70), blocks=st.integers(1, 60),
       extreme=st.sampled_from([None, 1, -1]))
def test_v4_maddubs_equals_ternary_matmul(seed, s_len, n, blocks, extreme):
    """PackedLinear on its AVX2 kernels (K % 128 == 0: v4 GEMV for S = 1, v4 blocked for S <= 4, v5_prefill
    beyond, S not a multiple of its 8-token block included) bit-identical to the checked v3 kernel, including
    all-(+1)/all-(-1) rows against activations quantized to 127/-128 (int16 partials at their bound)."""
    from refbitnet.kernels import v4_maddubs
    if not v4_maddubs.available():
        pytest.skip("no AVX2")
    rng = np.random.default_rng(seed)
    k = 128 * blocks
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8) if extreme is None else np.full((n, k), extreme, np.int8)
    x = _activations(seed, s_len, k, "normal")
    if extreme is not None:
        x = np.full((s_len, k), -1.0 if seed % 2 else 1.0, np.float32)
        x[:, 0] = 1.0 if seed % 2 else -1.0          # one opposite value: the rest quantize to -127 or 127
    row_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
    linear = runtime.PackedLinear(pack_kernel(codes), row_scale)
    assert linear._kernel(s_len) == ("v4" if s_len == 1 else "v4_blocked" if s_len <= 4 else "v5")
    xq, s = absmax_int8(x)
    assert np.array_equal(linear(x), kernels.ternary_matmul(xq, s, pack_kernel(codes), row_scale))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_fast_path_equals_the_readable_path_trace_included(name, kv_dtype):
    """backend="numba" (runtime.FastPath: compiled glue, row-parallel for a block, its own trace) against
    backend="numpy" (model.forward): cached keys/values and every traced intermediate, integer ones
    included, are the same bits, for prefill blocks of several sizes, single decoded tokens, and a forward
    without a cache; logits differ only by the LM head's summation order; a trace never changes the
    fast path's result."""
    sizes = TINY_CONFIGS[name]
    tensors = numpy_release_tensors(sizes, 3)
    fast_model = model_from_tensors(numpy_config(sizes), tensors, source="tiny", backend="numba")
    slow_model = model_from_tensors(numpy_config(sizes), tensors, source="tiny", backend="numpy")
    ids = np.random.default_rng(9).integers(0, fast_model.config.vocab_size, 40)
    fast, slow = fast_model.new_cache(40, kv_dtype=kv_dtype), slow_model.new_cache(40, kv_dtype=kv_dtype)
    plain = fast_model.new_cache(40, kv_dtype=kv_dtype)
    for a, b in ((0, 4), (4, 5), (5, 22), (22, 23), (23, 24), (24, 26), (26, 40)):
        t_fast, t_slow = {}, {}
        logits_fast = fast_model.forward(ids[a:b], cache=fast, trace=t_fast, trace_integers=True)
        logits_slow = slow_model.forward(ids[a:b], cache=slow, trace=t_slow, trace_integers=True)
        assert t_fast.keys() == t_slow.keys()
        for key in t_slow:
            if key != "logits":
                assert t_fast[key].dtype == t_slow[key].dtype and np.array_equal(t_fast[key], t_slow[key]), key
        assert np.abs(logits_fast - logits_slow).max() <= 1e-5 * np.abs(logits_slow).max()
        assert np.array_equal(fast_model.forward(ids[a:b], cache=plain), logits_fast)
    assert np.array_equal(fast.k, slow.k) and np.array_equal(fast.v, slow.v)
    assert np.array_equal(fast.k, plain.k) and np.array_equal(fast.v, plain.v)
    assert np.array_equal(fast_model.forward(ids[:17]), fast_model.forward(ids[:17], trace={}))


def test_decode_step_names_the_layer_of_a_non_finite_activation():
    sizes = TINY_CONFIGS["gqa"]
    tensors = numpy_release_tensors(sizes, 0)
    name = "model.layers.1.mlp.ffn_sub_norm.weight"
    # the largest finite bf16 (3.4e38): the normalized activations times it overflow to inf
    tensors[name] = np.full_like(tensors[name], 3.3e38) if tensors[name].dtype != np.uint16 else \
        np.full_like(tensors[name], 0x7F7F)
    model = model_from_tensors(numpy_config(sizes), tensors, source="tiny", backend="numba")
    cache = model.new_cache(8)
    with pytest.raises(RefBitNetError, match="layers.1.down_proj"):
        model.forward([3], cache=cache)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 11), n=st.integers(1, 40), chunks=st.integers(1, 40),
       weights=st.sampled_from(["random", "plus", "minus"]), acts=st.sampled_from(["random", "max", "min", "mixed"]))
def test_v4_blocked_gemm_equals_v4_gemv(seed, s_len, n, chunks, weights, acts):
    """The prefill kernel (4 tokens per weight pass, chunk-interleaved activation blocks, ragged last block)
    equals the one-token v4 kernel token by token, bit for bit, with int8 extremes -128/127 against
    all-(+1)/all-(-1) rows (each int16 partial sum then sits at its bound, 15 chunks x 2048)."""
    from refbitnet.kernels import v4_maddubs
    if not v4_maddubs.available():
        pytest.skip("no AVX2")
    rng = np.random.default_rng(seed)
    k = 128 * chunks
    codes = {"random": rng.integers(-1, 2, (n, k)), "plus": np.ones((n, k)), "minus": -np.ones((n, k))}[weights]
    packed = pack_kernel(codes.astype(np.int8))
    xq = {"random": rng.integers(-128, 128, (s_len, k)), "max": np.full((s_len, k), 127),
          "min": np.full((s_len, k), -128), "mixed": rng.choice([-128, 127], (s_len, k))}[acts].astype(np.int8)
    s_act = rng.uniform(0.5, 300.0, s_len).astype(np.float32)
    row_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
    xsum = xq.astype(np.int32).sum(axis=1).astype(np.int32)
    t = v4_maddubs.TOKENS_PER_PASS
    blocks = np.zeros(((s_len + t - 1) // t * t, k // 128, 4, 32), np.int8)
    blocks[:s_len] = xq.reshape(s_len, k // 128, 32, 4).transpose(0, 1, 3, 2)        # [S, C, i, j] = xq[4(32c+j)+i]
    blocks = np.ascontiguousarray(blocks.reshape(-1, t, k // 128, 4, 32).transpose(0, 2, 1, 3, 4))
    out = np.empty((s_len, n), np.float32)
    v4_maddubs.matmul_scaled_v4_blocked(packed, blocks, xsum, s_act, row_scale, out)
    planes = np.ascontiguousarray(xq.reshape(s_len, k // 4, 4).transpose(0, 2, 1))
    expect = np.empty((s_len, n), np.float32)
    v4_maddubs.matmul_scaled_v4(packed, planes, xsum, s_act, row_scale, expect)
    assert np.array_equal(out.view(np.uint32), expect.view(np.uint32))
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T                               # exact integers
    ref = ((acc.astype(np.float32) / s_act[:, None]).astype(np.float32) * row_scale).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 9), chunks=st.integers(1, 6),
       kind=st.sampled_from(["normal", "ties", "zeros", "tiny"]))
def test_quantize_token_blocks_equals_byte_planes(seed, s_len, chunks, kind):
    """act_quant.quantize_token_blocks: the same s, codes and sums as quantize_byte_planes, in the 4-token
    block layout, padding tokens zero."""
    k = 128 * chunks
    x = _activations(seed, s_len, k, kind)
    s1, planes, xsum1 = np.empty(s_len, np.float32), np.empty((s_len, 4, k // 4), np.int8), np.empty(s_len, np.int32)
    assert runtime.quantize_byte_planes(x, s1, planes, xsum1) == -1
    b = (s_len + 3) // 4
    s2, blocks, xsum2 = np.empty(s_len, np.float32), np.full((b, chunks, 4, 4, 32), 99, np.int8), np.empty(s_len, np.int32)
    assert act_quant.quantize_token_blocks(x, s2, blocks, xsum2) == -1
    flat = blocks.transpose(0, 2, 1, 3, 4).reshape(4 * b, chunks, 4, 32)        # [token, c, i, j]
    expect = np.zeros_like(flat)
    expect[:s_len] = planes.reshape(s_len, 4, chunks, 32).transpose(0, 2, 1, 3)
    assert np.array_equal(s1, s2) and np.array_equal(xsum1, xsum2) and np.array_equal(flat, expect)
    bad = x.copy()
    bad[-1, 5] = np.nan
    assert act_quant.quantize_token_blocks(bad, s2, blocks, xsum2) == s_len - 1


def test_widen_float16_equals_numpy_cast_for_every_bit_pattern():
    """runtime.widen_float16 (the float16 KV cache's read on the numba backend) against NumPy's cast: all 65536
    float16 bit patterns (zeros, subnormals, normals, infs, NaN payloads), bit for bit, and lengths that are
    not a multiple of the per-thread block."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.full(every.shape, 7.0, np.float32)
    runtime.widen_float16(every, out)
    nan = np.isnan(every)               # (a NaN's payload bits may differ: F16C quiets signalling NaNs;
    assert nan.sum() == 2046            # KVCache.store never lets a NaN into a cache anyway)
    assert np.array_equal(out[~nan].view(np.uint32), every[~nan].astype(np.float32).view(np.uint32))
    assert np.isnan(out[nan]).all()
    rng = np.random.default_rng(3)
    for n in (1, 7, runtime.WIDEN_BLOCK - 1, runtime.WIDEN_BLOCK + 5, 3 * runtime.WIDEN_BLOCK):
        src = rng.integers(0, 2**16, n).astype(np.uint16).view(np.float16).reshape(n, 1)
        out = np.empty((n, 1), np.float32)
        runtime.widen_float16(src, out)
        assert np.array_equal(out, src.astype(np.float32), equal_nan=True)
    with pytest.raises(TypeError, match="widen_float16"):
        runtime.widen_float16(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="widen_float16"):
        runtime.widen_float16(np.zeros(8, np.float16)[::2], np.zeros(4, np.float32))
