"""The opt-in 8-bit LM head (kernels.lm_head_int8): its kernel against its NumPy definition bit for bit, the
per-row quantization's bound, and the fast path's logits with it on within that bound of the bf16 head's."""

import numpy as np
import pytest

pytest.importorskip("refbitnet.kernels")

from refbitnet import kernels  # noqa: E402
from refbitnet.bf16 import bf16_to_f32, f32_to_bf16  # noqa: E402
from refbitnet.checkpoint import model_from_tensors  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402
from refbitnet.kernels.lm_head_int8 import int8_matmul, int8_matmul_reference, quantize_rows_int8  # noqa: E402

from _kernel_testing import MAX_THREADS, restore_threads  # noqa: E402,F401
from _tiny_bitnet import numpy_config, numpy_release_tensors  # noqa: E402


def test_quantization_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    table = f32_to_bf16(rng.standard_normal((300, 64)).astype(np.float32) * rng.uniform(0.01, 3, (300, 1)))
    table[7] = 0                                                     # an all-zero row: scale 1, codes 0
    q, scale = quantize_rows_int8(table, chunk_rows=64)
    w = bf16_to_f32(table)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max() <= 127
    # half a step, plus the float32 rounding of w / scale and of q * scale (a few units of 2**-24 of max|w|)
    assert np.all(np.abs(q.astype(np.float32) * scale[:, None] - w) <= scale[:, None] * (0.5 + 127 * 2.0**-22))
    assert scale[7] == 1 and not q[7].any()
    bad = table.copy()
    bad[3, 3] = 0x7F80                                               # +inf in bf16
    with pytest.raises(RefBitNetError, match="finite"):
        quantize_rows_int8(bad)


@pytest.mark.parametrize("threads", sorted({1, min(2, MAX_THREADS)}))
@pytest.mark.parametrize("s_len", [1, 3])
def test_kernel_equals_its_numpy_definition(threads, s_len):
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(threads + s_len)
    q = rng.integers(-127, 128, (1027, 48), dtype=np.int8)
    scale = rng.uniform(1e-3, 1e-1, 1027).astype(np.float32)
    x = rng.standard_normal((s_len, 48)).astype(np.float32)
    out = int8_matmul(x, q, scale)
    assert np.array_equal(out.view(np.uint32), int8_matmul_reference(x, q, scale).view(np.uint32))
    with pytest.raises(RefBitNetError):
        int8_matmul(x[:, :32], q, scale)


def test_fast_path_with_the_int8_head():
    """Layers untouched (same hidden state); logits within the quantization bound of the bf16 head's:
    |y8 - y| <= sum_k |x_k| * scale_v / 2 (+ float32 rounding of the two dots)."""
    sizes = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500)
    model = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, 1), source="t", backend="numba")
    fp = model._fast
    ids = np.array([5, 9, 11, 2])
    trace = {}
    exact = model.forward(ids, trace=trace)
    fp.use_int8_head()
    approx = model.forward(ids)                      # 4 tokens: the decode step, the int8 head run inside it
    assert fp.step.head_in_step and fp.step.weights.int8_head
    # the step's head: int8_matmul's bits on the same final-norm rows (the trace's, from the op-by-op path)
    assert np.array_equal(approx.view(np.uint32), int8_matmul(trace["norm"], *fp.int8_head).view(np.uint32))
    fp.use_int8_head(False)
    assert np.array_equal(model.forward(ids), exact)
    _, scale = quantize_rows_int8(fp.output_table)
    x = trace["norm"]
    bound = np.abs(x).sum(axis=1)[:, None] * scale[None, :] / 2 + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(approx - exact) <= bound)
    assert not np.array_equal(approx, exact)


def test_model_lm_head_option():
    """model.set_lm_head("int8") is the public switch: the fast path's 8-bit head on, logits close to the
    bf16 head's but not equal, and back with "bf16"; an unknown head, or int8 on the readable path, is
    refused by name."""
    import refbitnet
    model = refbitnet.load()
    ids = np.array([0, 5, 9, 200])
    a = model.forward(ids)
    model.set_lm_head("int8")
    b = model.forward(ids)
    assert not np.array_equal(a, b) and np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    model.set_lm_head("bf16")
    assert np.array_equal(model.forward(ids), a)
    with pytest.raises(RefBitNetError, match="lm_head"):
        model.set_lm_head("fp8")
    with pytest.raises(RefBitNetError, match="lm_head='int8'"):
        refbitnet.load(backend="numpy").set_lm_head("int8")
