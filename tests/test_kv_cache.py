"""The KV cache: prefill in one block, token-by-token decoding and the full forward agree.

numerics="int": bit for bit. Every op of the NumPy path computes a token's row independently of the
other rows in the block: BitLinear is integer arithmetic plus an elementwise epilogue, rms_norm and
the quantizer reduce each row on its own, attention handles each query with arrays of the same shapes
whether it comes in a block or alone, and the LM head is one matrix-vector product per token.
numerics="fake-quant": BitLinear is a float32 matmul whose rounding depends on how many rows the BLAS
call gets, so a block and single tokens differ by float rounding (observed ~1e-7 relative), which
can flip an int8 code downstream; checked to 1e-5 relative when no code flipped, else 5e-2.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet.checkpoint import model_from_tensors
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.kv_cache import KVCache
from refbitnet.quant import absmax_int8

from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors

_models = {}


def tiny_model(name, numerics="int", backend="numpy", seed=0):
    key = (name, numerics, backend, seed)
    if key not in _models:
        sizes = TINY_CONFIGS[name]
        _models[key] = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, seed),
                                          source=f"tiny {name}", numerics=numerics, backend=backend)
    return _models[key]


def _ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n)


def _run_blocks(model, ids, cuts, trace_list=None):
    cache = model.new_cache(len(ids))
    out, start = [], 0
    for end in list(cuts) + [len(ids)]:
        if end > start:
            trace = {} if trace_list is not None else None
            out.append(model.forward(ids[start:end], cache=cache, trace=trace))
            if trace_list is not None:
                trace_list.append(trace)
            start = end
    assert cache.length == len(ids)
    return np.concatenate(out)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_int_prefill_block_equals_token_by_token_equals_full(name):
    model = tiny_model(name)
    ids = _ids(model, 24)
    full = model.forward(ids)
    one_by_one = _run_blocks(model, ids, range(1, 24))
    prefill_then_decode = _run_blocks(model, ids, [10])
    assert np.array_equal(one_by_one, full)
    assert np.array_equal(prefill_then_decode, full)


@settings(max_examples=25)
@given(cuts=st.lists(st.integers(1, 19), max_size=6), name=st.sampled_from(list(TINY_CONFIGS)))
def test_int_any_split_into_blocks_equals_full(cuts, name):
    model = tiny_model(name)
    ids = _ids(model, 20, seed=len(cuts))
    assert np.array_equal(_run_blocks(model, ids, sorted(set(cuts))), model.forward(ids))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_fake_quant_cache_matches_full_forward(name):
    model = tiny_model(name, numerics="fake-quant")
    ids = _ids(model, 24)
    full_trace = {}
    full = model.forward(ids, trace=full_trace)
    traces = []
    stepped = _run_blocks(model, ids, [8] + list(range(9, 24)), traces)
    flips = 0
    for key in full_trace:
        if key.endswith(("input_layernorm", "attn_sub_norm", "post_attention_layernorm", "ffn_sub_norm")):
            a, _ = absmax_int8(full_trace[key])
            b, _ = absmax_int8(np.concatenate([t[key] for t in traces]))
            flips += int((a != b).sum())
    rel = float(np.abs(stepped - full).max() / np.abs(full).max())
    print(f"[{name}] fake-quant cache vs full: relative max|diff| {rel:.1e}, int8 codes flipped {flips}")
    assert rel <= (1e-5 if flips == 0 else 5e-2)


def test_forward_without_cache_leaves_no_state():
    model = tiny_model("gqa")
    ids = _ids(model, 12)
    first = model.forward(ids)
    cache = model.new_cache(30)
    model.forward(ids[:5], cache=cache)
    assert np.array_equal(model.forward(ids), first)
    assert cache.length == 5
    again = model.forward(ids)
    assert np.array_equal(again, first)


def test_cache_is_preallocated_zeros_of_the_requested_size():
    model = tiny_model("one_kv_head")
    cfg = model.config
    cache = model.new_cache(50)
    assert isinstance(cache, KVCache) and cache.capacity == 50 and cache.length == 0
    assert cache.k.shape == (cfg.num_hidden_layers, 50, cfg.num_key_value_heads, cfg.head_dim)
    assert cache.k.dtype == np.float32 and not cache.k.any()
    assert model.new_cache().capacity == cfg.max_position_embeddings


def test_cache_errors():
    model = tiny_model("gqa")
    with pytest.raises(RefBitNetError, match="max_tokens"):
        model.new_cache(0)
    with pytest.raises(RefBitNetError, match="max_position_embeddings = 128"):
        model.new_cache(129)
    with pytest.raises(RefBitNetTypeError, match="max_tokens"):
        model.new_cache(3.5)
    cache = model.new_cache(6)
    model.forward(_ids(model, 4), cache=cache)
    with pytest.raises(RefBitNetError, match="exceed its capacity 6"):
        model.forward(_ids(model, 3), cache=cache)
    assert cache.length == 4                      # a refused call changes nothing
    other = tiny_model("one_kv_head")
    with pytest.raises(RefBitNetError, match="cache: expected one made for this model"):
        model.forward([1], cache=other.new_cache(4))
    with pytest.raises(RefBitNetTypeError, match="cache"):
        model.forward([1], cache={})
    with pytest.raises(RefBitNetError, match="exceed max_position_embeddings"):
        model.forward(_ids(model, 129))


def test_trace_names_match_the_contract():
    model = tiny_model("odd_sizes")
    cfg = model.config
    trace = {}
    model.forward(_ids(model, 5), trace=trace)
    per_layer = ["input_layernorm", "q", "k", "v", "attn", "attn_sub_norm", "o_proj", "resid_attn",
                 "post_attention_layernorm", "gate", "up", "ffn_act", "ffn_sub_norm", "down_proj", "out"]
    want = ["embed"] + [f"layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in per_layer] + ["norm", "logits"]
    assert sorted(trace) == sorted(want)
    assert trace["layers.0.q"].shape == (5, cfg.num_attention_heads, cfg.head_dim)
    assert trace["layers.1.k"].shape == (5, cfg.num_key_value_heads, cfg.head_dim)
    assert trace["layers.1.ffn_act"].shape == (5, cfg.intermediate_size)
    assert all(v.dtype == np.float32 for v in trace.values())
    assert np.array_equal(trace["layers.1.out"], model.forward_layer(1, trace["layers.0.out"]))


def test_generate_is_greedy_decoding_with_the_cache():
    model = tiny_model("gqa")
    prompt = [int(t) for t in _ids(model, 6, seed=9)]
    seq = list(prompt)
    for _ in range(10):                                   # the slow way: full forward each step
        seq.append(int(np.argmax(model.forward(seq)[-1])))
    want = seq[len(prompt):]
    eos = set(model.config.eos_ids)
    if eos & set(want):                                   # generate stops at eos (not yielded)
        want = want[:min(want.index(e) for e in eos & set(want))]
    assert model.generate(prompt, 10) == want
    assert list(model.generate(np.array(prompt), 10, stream=True)) == want
    with pytest.raises(RefBitNetError, match="tokenizer"):
        model.generate("text needs a tokenizer", 3)


# ------------------------------------------------------------------ continuing a cache (conversations)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), first_len=st.integers(1, 20), shared=st.integers(0, 20), extra=st.integers(1, 8),
       kv_dtype=st.sampled_from(["float32", "float16"]))
def test_keep_prefix_then_continue_equals_a_fresh_prefill(backend, seed, first_len, shared, extra, kv_dtype):
    """A cache holding ids A, cut with keep_prefix(B) to the positions where A and B agree and then fed the
    rest of B, holds bit for bit the keys and values of a fresh prefill of B, and gives its last logits."""
    model = tiny_model("gqa", backend=backend)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, model.config.vocab_size, first_len)
    shared = min(shared, first_len)
    b = np.concatenate([a[:shared], rng.integers(0, model.config.vocab_size, extra)])
    if shared < first_len:
        b[shared] = (a[shared] + 1) % model.config.vocab_size          # differ right after the shared part
    cache = model.new_cache(64, kv_dtype=kv_dtype)
    model.forward(a, cache=cache)
    kept = cache.keep_prefix(b)
    assert kept == min(shared, len(b)) == cache.length
    logits = model.forward(b[kept:], cache=cache, last_only=True)
    fresh = model.new_cache(64, kv_dtype=kv_dtype)
    expect = model.forward(b, cache=fresh, last_only=True)
    n = len(b)
    assert np.array_equal(logits.view(np.uint32), expect.view(np.uint32))
    assert np.array_equal(cache.k[:, :n].view(np.uint8), fresh.k[:, :n].view(np.uint8))
    assert np.array_equal(cache.v[:, :n].view(np.uint8), fresh.v[:, :n].view(np.uint8))
    assert np.array_equal(cache.ids[:n], b)


def test_generate_continues_a_conversation_from_its_cache():
    """Turn 2's prompt = turn 1's prompt + its reply + more: with the turn-1 cache passed back, generate runs
    only the new tokens and returns the same ids as from a fresh cache."""
    model = tiny_model("gqa")
    calls = []
    forward = model.forward

    def counting_forward(ids, cache=None, **kw):
        calls.append(len(ids))
        return forward(ids, cache=cache, **kw)

    prompt1 = list(_ids(model, 9, seed=3))
    cache = model.new_cache(64)
    model.forward = counting_forward
    try:
        reply = model.generate(prompt1, 6, cache=cache)
        prompt2 = prompt1 + reply + list(_ids(model, 5, seed=4))
        calls.clear()
        continued = model.generate(prompt2, 6, cache=cache)
        prefilled = calls[0]
    finally:
        del model.forward                                  # back to the class's method
    assert len(reply) == 6                                 # (no eos in this reply: it ran to max_new_tokens)
    assert continued == model.generate(prompt2, 6)
    # the cache held prompt1 and all but the last reply id (never fed back): that id and the 5 new ones run
    assert prefilled == 1 + 5


def test_generate_cache_errors():
    model = tiny_model("gqa")
    with pytest.raises(RefBitNetError, match="need 12 positions, the cache holds 8"):
        model.generate([1, 2, 3], 10, cache=model.new_cache(8))
    with pytest.raises(RefBitNetError, match="'float16' given, but the cache passed stores 'float32'"):
        model.generate([1, 2, 3], 2, cache=model.new_cache(8), kv_dtype="float16")
    with pytest.raises(RefBitNetTypeError, match="expected a KVCache"):
        model.generate([1, 2, 3], 2, cache=object())
