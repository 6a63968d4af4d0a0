"""runtime.decode_region: a decode step's GEMVs and glue in one parallel region per layer, against the
readable path and the per-GEMV fast path, bit for bit.

The tiny models of test_runtime have widths below 128, where the fast path runs v3 and not the regions;
here every width is a multiple of 128 (v4's chunk), so decoding (S = 1, no trace) goes through
decode_region. Threads claim chunks of rows from shared counters, so which thread computes which rows
changes from call to call; each row is still computed by one thread in one fixed order, so the result
may not depend on it: checked at 1 and 2 threads and across repeated calls.
"""

import numpy as np
import pytest

pytest.importorskip("refbitnet.kernels")

from refbitnet import kernels, runtime  # noqa: E402
from refbitnet.checkpoint import model_from_tensors  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402

from _kernel_testing import MAX_THREADS, restore_threads  # noqa: E402,F401
from _tiny_bitnet import numpy_config, numpy_release_tensors  # noqa: E402

WIDE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)


def models(seed=5, regions=True):
    """The wide tiny model on the fast path with decode regions on (they are opt-in), and on the readable one."""
    tensors = numpy_release_tensors(WIDE, seed)
    fast = model_from_tensors(numpy_config(WIDE), tensors, source="wide", backend="numba")
    slow = model_from_tensors(numpy_config(WIDE), tensors, source="wide", backend="numpy")
    if not fast._fast.regions_fit:
        pytest.skip("no AVX2: the fast path runs v3 and no decode regions")
    fast._fast.decode_regions = regions
    return fast, slow


def test_the_wide_tiny_model_fits_the_regions_and_they_are_opt_in(monkeypatch):
    fast, _ = models(regions=False)
    assert fast._fast.regions_fit and not fast._fast.decode_regions
    monkeypatch.setenv("REFBITNET_DECODE_REGIONS", "1")
    again = model_from_tensors(numpy_config(WIDE), numpy_release_tensors(WIDE, 5), source="wide", backend="numba")
    assert again._fast.decode_regions


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("threads", sorted({1, min(2, MAX_THREADS)}))
def test_decoding_through_regions_equals_the_readable_path(kv_dtype, threads):
    """Prefill 7 tokens, then decode 12 one by one: cached keys/values equal the readable path's bit for bit,
    logits within the LM head's summation order; and the same bits as the per-GEMV fast path
    (decode_regions off) and as a traced step (the trace takes the per-GEMV path)."""
    kernels.set_num_threads(threads)
    fast, slow = models()
    ids = np.random.default_rng(3).integers(0, WIDE["vocab_size"], 19)
    c_fast, c_slow, c_plain = (m.new_cache(19, kv_dtype=kv_dtype) for m in (fast, slow, fast))
    fast.forward(ids[:7], cache=c_fast), slow.forward(ids[:7], cache=c_slow)
    fast.forward(ids[:7], cache=c_plain)
    for p in range(7, 19):
        tok = ids[p:p + 1]
        fast._fast.decode_regions = True
        a = fast.forward(tok, cache=c_fast)
        fast._fast.decode_regions = False
        b = fast.forward(tok, cache=c_plain)
        fast._fast.decode_regions = True
        s = slow.forward(tok, cache=c_slow)
        assert np.array_equal(a, b), p
        assert np.abs(a - s).max() <= 1e-5 * np.abs(s).max()
    assert np.array_equal(c_fast.k, c_slow.k) and np.array_equal(c_fast.v, c_slow.v)
    assert np.array_equal(c_fast.k, c_plain.k) and np.array_equal(c_fast.v, c_plain.v)


def test_regions_repeat_exactly_and_match_the_trace():
    """The same step many times (rows claimed by whichever thread comes first): the same bits each time;
    and the traced step's intermediates lead to the same logits."""
    fast, _ = models(seed=8)
    ids = np.random.default_rng(4).integers(0, WIDE["vocab_size"], 6)
    cache = fast.new_cache(8)
    fast.forward(ids[:5], cache=cache)
    first = None
    for _ in range(20):
        cache.length = 5
        logits = fast.forward(ids[5:6], cache=cache)
        first = logits if first is None else first
        assert np.array_equal(logits, first)
    cache.length = 5
    trace = {}
    assert np.array_equal(fast.forward(ids[5:6], cache=cache, trace=trace), first)
    assert np.array_equal(trace["logits"], first)


def test_region_layers_forward_range():
    """layers_forward over a sub-range of layers (first > 0) through regions equals the per-GEMV path."""
    fast, _ = models(seed=2)
    fp, cfg = fast._fast, fast.config
    cos, sin = runtime.rope_tables(np.arange(1), cfg.head_dim, cfg.rope_theta)
    h = np.random.default_rng(1).standard_normal((1, cfg.hidden_size)).astype(np.float32)
    outs = []
    for flag in (True, False):
        fp.decode_regions = flag
        cache = fast.new_cache(4)
        outs.append(np.array(fp.layers_forward(h, cos, sin, cache, 0, None, 1, 3)))
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("layer", [0, 2])
def test_overflow_in_a_region_names_the_layer(layer):
    """An o_proj scale that makes the residual stream inf: the region stops and the door of the next
    projection reports the non-finite input, naming the layer (as the per-GEMV path does)."""
    fast, _ = models()
    tensors = fast.release_tensors()
    tensors[f"model.layers.{layer}.self_attn.o_proj.weight_scale"] = np.array([3e38], np.float32)
    bad = model_from_tensors(numpy_config(WIDE), tensors, source="wide", backend="numba")
    bad._fast.decode_regions = True
    cache = bad.new_cache(4)
    with pytest.raises(RefBitNetError, match=rf"layers\.{layer}\..*finite"):
        bad.forward(np.array([3]), cache=cache)


@pytest.mark.parametrize("threads", sorted({1, min(2, MAX_THREADS)}))
def test_claimed_lm_head_equals_the_door(threads):
    """lm_head_v2.bf16_matmul_claimed_v2 (decoding's LM head, rows claimed from a counter) against
    kernels.bf16_matmul, bit for bit, for a vocabulary that is not a multiple of the task or step size."""
    from refbitnet.bf16 import f32_to_bf16
    from refbitnet.kernels.lm_head_v2 import bf16_matmul_claimed_v2
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(threads)
    table = f32_to_bf16(rng.standard_normal((4099, 64)).astype(np.float32))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ref = kernels.bf16_matmul(x, table)
    for _ in range(5):
        out = np.full((1, 4099), np.nan, np.float32)
        bf16_matmul_claimed_v2(x, table, out, np.zeros(3, np.int64), threads)
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
