"""refbitnet.runtime (the fast path) against the readable path, and its compiled glue against NumPy.

The fast path's trace, integer intermediates included, cached keys/values and logits against
refbitnet.model.forward; forward(last_only=True) is the last row of the full logits exactly; the float16
cache's compiled widening equals NumPy's cast. (The kernels behind kernels.TernaryLinear are checked in
test_kernels_door.py, test_kernels.py and test_kernels_v5.py.)
"""

import numpy as np
import pytest

pytest.importorskip("refbitnet.kernels")

from refbitnet import glue  # noqa: E402
from refbitnet.checkpoint import model_from_tensors  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402

from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors  # noqa: E402


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


def test_fast_path_reads_a_mapped_table_into_its_own_memory(tmp_path):
    """A loaded (memory-mapped) tied table: the fast path's LM head and embedding read one in-memory copy
    of it (the same values), not the mapping; the readable weights keep the mapping."""
    import refbitnet
    sizes = TINY_CONFIGS["gqa"]
    refbitnet.save(model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, 0), source="tiny"), tmp_path)
    model = refbitnet.load(str(tmp_path), backend="numba")
    fast = model._fast
    assert isinstance(model.weights.embed_tokens, np.memmap)
    assert type(fast.output_table) is np.ndarray and fast.embed_tokens is fast.output_table
    assert np.array_equal(fast.output_table, model.weights.embed_tokens)


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



@pytest.mark.parametrize("kv_dtype", ["float32", "float16", None])
def test_a_long_prompt_in_blocks_equals_one_block(monkeypatch, kv_dtype):
    """A prompt longer than runtime.PREFILL_BLOCK runs as blocks (FastPath._forward_blocks); with a trace it
    runs as one block. Both give the same logits and cached keys/values bit for bit, for a prompt that is
    not a multiple of the block, at a start past 0, with and without last_only, and without a cache."""
    from refbitnet import runtime
    monkeypatch.setattr(runtime, "PREFILL_BLOCK", 16)
    sizes = TINY_CONFIGS["gqa"]
    model = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, 5), source="tiny", backend="numba")
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, 60)
    if kv_dtype is None:
        assert np.array_equal(model.forward(ids[:45]), model.forward(ids[:45], trace={}))
        return
    blocks, whole = model.new_cache(64, kv_dtype=kv_dtype), model.new_cache(64, kv_dtype=kv_dtype)
    for a, b in ((0, 5), (5, 50)):                      # 45 tokens from position 5: blocks of 16, 16 and 13
        last = model.forward(ids[a:b], cache=blocks, last_only=True)
        full = model.forward(ids[a:b], cache=whole, trace={})
        assert np.array_equal(last, full[-1:])
    assert np.array_equal(blocks.k, whole.k) and np.array_equal(blocks.v, whole.v)
    again = model.new_cache(64, kv_dtype=kv_dtype)
    model.forward(ids[:5], cache=again)
    assert np.array_equal(model.forward(ids[5:50], cache=again), full)

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


def test_widen_float16_equals_numpy_cast_for_every_bit_pattern():
    """glue.widen_float16 (the float16 KV cache's read on the numba backend) against NumPy's cast: all 65536
    float16 bit patterns (zeros, subnormals, normals, infs, NaN payloads), bit for bit, and lengths that are
    not a multiple of the per-thread block."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.full(every.shape, 7.0, np.float32)
    glue.widen_float16(every, out)
    nan = np.isnan(every)               # (a NaN's payload bits may differ: F16C quiets signalling NaNs;
    assert nan.sum() == 2046            # KVCache.store never lets a NaN into a cache anyway)
    assert np.array_equal(out[~nan].view(np.uint32), every[~nan].astype(np.float32).view(np.uint32))
    assert np.isnan(out[nan]).all()
    rng = np.random.default_rng(3)
    for n in (1, 7, glue.WIDEN_BLOCK - 1, glue.WIDEN_BLOCK + 5, 3 * glue.WIDEN_BLOCK):
        src = rng.integers(0, 2**16, n).astype(np.uint16).view(np.float16).reshape(n, 1)
        out = np.empty((n, 1), np.float32)
        glue.widen_float16(src, out)
        assert np.array_equal(out, src.astype(np.float32), equal_nan=True)
    with pytest.raises(TypeError, match="widen_float16"):
        glue.widen_float16(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="widen_float16"):
        glue.widen_float16(np.zeros(8, np.float16)[::2], np.zeros(4, np.float32))
