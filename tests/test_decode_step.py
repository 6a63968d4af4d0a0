"""refbitnet.decode_step (one parallel region per decoded token) against the op-by-op fast path.

The op-by-op path (runtime.FastPath.layers_forward) is checked bit for bit against the readable model in
test_runtime.py; here the one-region step must give the same bits as it: logits and every cached key and
value, for single decoded tokens and short blocks, both KV cache types, one and two threads, shapes that
take the attention's vector paths and its loops. Also: the step's float16 cache store equals NumPy's cast,
and a step that meets a NaN/inf or a float16 overflow raises the op-by-op path's error naming the layer.
"""

import numpy as np
import pytest
from numba import njit

pytest.importorskip("refbitnet.kernels")

from refbitnet import kernels  # noqa: E402
from refbitnet.checkpoint import model_from_tensors  # noqa: E402
from refbitnet.decode_step import float16_bits  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402
from refbitnet.kernels.avx2 import available as avx2_available  # noqa: E402
from refbitnet.runtime import SHORT_BLOCK  # noqa: E402

from _tiny_bitnet import numpy_config, numpy_release_tensors  # noqa: E402

# Shapes the step runs (K % 128 == 0 for the door's one-token AVX2 kernels): 4 query heads per KV head
# (attention's 4-head vector paths), 2 per KV head (its loops), one KV head with HD = 128.
STEP_CONFIGS = {
    "groups_of_4": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=300),
    "groups_of_2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=200),
    "hd_128": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=160),
}

needs_avx2 = pytest.mark.skipif(not avx2_available(), reason="the decode step runs on the AVX2 kernels")


@njit   # not cached: Numba would not see a change to float16_bits, which it inlines
def _float16_bits_all(x, out):
    for i in range(x.shape[0]):
        out[i] = float16_bits(x[i])


def _check_float16_bits(x):
    out = np.empty(x.shape, np.uint16)
    _float16_bits_all(x, out)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], expected[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()


def test_float16_bits_equals_numpy_cast():
    """Every finite float16 value, the float32 values one ulp either side of it, every midpoint between
    neighbouring float16s (the ties, both parities) and one ulp either side of those, zeros, infs, NaNs,
    float32 subnormals, the overflow edge (65504, 65519.99, 65520), and 2**22 random bit patterns."""
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    ordered = np.unique(finite)                                                 # ascending, -65504 .. 65504
    mids = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)   # exact in float32
    points = np.concatenate([finite, mids, [np.float32(65519.99), np.float32(65520.0), np.float32(-65520.0),
                                            np.float32(1e-45), np.float32(-1e-45), np.float32(3e38),
                                            np.float32(np.inf), np.float32(-np.inf), np.float32(np.nan)]])
    points = points.astype(np.float32)
    with np.errstate(over="ignore"):
        around = np.concatenate([points, np.nextafter(points, np.float32(np.inf)),
                                 np.nextafter(points, np.float32(-np.inf))])
    _check_float16_bits(around)
    rng = np.random.default_rng(5)
    _check_float16_bits(rng.integers(0, 2**32, 2**22, dtype=np.uint64).astype(np.uint32).view(np.float32))


def _model(name, seed=3, **edit):
    sizes = STEP_CONFIGS[name]
    tensors = numpy_release_tensors(sizes, seed)
    tensors.update(edit)
    return model_from_tensors(numpy_config(sizes), tensors, source="tiny", backend="numba")


def _run(model, ids, kv_dtype, step):
    """A prompt (op by op: longer than SHORT_BLOCK), single tokens, short blocks with every row's logits and
    with the last row's only: the logits of each call and the cache."""
    model._fast.step_fits = step
    cache = model.new_cache(64, kv_dtype=kv_dtype)
    calls = [(0, 12, False), (12, 13, False), (13, 14, True), (14, 19, False), (19, 25, True), (25, 26, False),
             (26, 26 + SHORT_BLOCK, False), (26 + SHORT_BLOCK, 40, False)]
    logits = [model.forward(ids[a:b], cache=cache, last_only=last) for a, b, last in calls]
    return logits, cache


@needs_avx2
@pytest.mark.parametrize("name", list(STEP_CONFIGS))
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_equals_the_op_by_op_path(name, kv_dtype, threads):
    """Logits and cache of the one-region step == the op-by-op path's, bit for bit, and the step did run."""
    model = _model(name)
    assert model._fast.step_fits
    before = kernels.get_num_threads()
    kernels.set_num_threads(min(threads, before))
    try:
        ids = np.random.default_rng(11).integers(0, model.config.vocab_size, 40)
        op_logits, op_cache = _run(model, ids, kv_dtype, step=False)
        assert model._fast.step is None
        step_logits, step_cache = _run(model, ids, kv_dtype, step=True)
        assert model._fast.step is not None
    finally:
        kernels.set_num_threads(before)
    for a, b in zip(op_logits, step_logits):
        assert a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.array_equal(op_cache.k.view(np.uint8), step_cache.k.view(np.uint8))
    assert np.array_equal(op_cache.v.view(np.uint8), step_cache.v.view(np.uint8))
    assert np.array_equal(op_cache.ids, step_cache.ids) and op_cache.length == step_cache.length == 40


@needs_avx2
def test_decode_step_with_the_int8_head_equals_the_op_by_op_path():
    """With the opt-in 8-bit LM head the step stops after the final norm and the head runs as before."""
    model = _model("groups_of_4")
    model._fast.use_int8_head()
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, 40)
    op_logits, _ = _run(model, ids, "float16", step=False)
    step_logits, _ = _run(model, ids, "float16", step=True)
    for a, b in zip(op_logits, step_logits):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_avx2
def test_decode_step_names_the_layer_of_a_non_finite_activation():
    """ffn_sub_norm's weight at the largest bf16 makes layer 1's down_proj input inf: the step stops, the
    token is rerun op by op, and its error names the projection."""
    name = "model.layers.1.mlp.ffn_sub_norm.weight"
    sizes = STEP_CONFIGS["groups_of_2"]
    model = _model("groups_of_2", **{name: np.full(sizes["intermediate_size"], 0x7F7F, np.uint16)})
    cache = model.new_cache(8)
    with pytest.raises(RefBitNetError, match="layers.1.down_proj"):
        model.forward([3], cache=cache)
    assert model._fast.step is not None


@needs_avx2
def test_decode_step_refuses_a_value_beyond_a_float16_cache():
    """v_proj's weight_scale at 2**20 gives values beyond 65504: the float16 cache refuses them with the
    op-by-op path's error; a float32 cache keeps them."""
    from refbitnet.bf16 import f32_to_bf16
    name = "model.layers.0.self_attn.v_proj.weight_scale"
    model = _model("groups_of_2", **{name: f32_to_bf16(np.array([2.0 ** 20], np.float32))})
    with pytest.raises(RefBitNetError, match="layers.0: values .* do not fit a float16 KV cache"):
        model.forward([5], cache=model.new_cache(8, kv_dtype="float16"))
    assert np.isfinite(model.forward([5], cache=model.new_cache(8))).all()


def _decode_in_child(model, ids, queue):
    cache = model.new_cache(16)
    queue.put(model.forward(ids, cache=cache, last_only=True))


@needs_avx2
def test_decode_step_in_a_forked_child():
    """The step's threads do not survive a fork: a child forked after the parent decoded makes its own and
    computes the same logits (no hang waiting for a parent's thread)."""
    import multiprocessing
    model = _model("groups_of_2")
    ids = np.arange(5)
    before = kernels.get_num_threads()
    kernels.set_num_threads(min(2, before))
    try:
        parent = model.forward(ids, cache=model.new_cache(16), last_only=True)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_decode_in_child, args=(model, ids, queue))
        child.start()
        try:
            got = queue.get(timeout=120)
            child.join(timeout=60)
        finally:
            if child.is_alive():
                child.kill()
    finally:
        kernels.set_num_threads(before)
    assert child.exitcode == 0 and np.array_equal(got, parent)
