"""refbitnet.kernels.v5_prefill (the prefill GEMM) against the NumPy reference and v4, bit for bit.

Numerics: "int". The kernel's integers are checked through its float output with s = 1 and
weight_scale = 1, where y = float32(acc) is exact (|acc| <= 128 K <= 2**24 for K <= 131072); every other
comparison is of float32 bits (uint32 views) against refbitnet.kernels.reference / bitlinear_int and
v4_maddubs.matmul_scaled_v4_blocked. The raw kernel is called directly where a test varies its tiling;
otherwise through the door, ``TernaryLinear(..., kernel="v5")``. Shapes are drawn so that S is not a
multiple of the 8-token block, N not a multiple of the row tile, and K spans several 15-chunk int16
windows and unpacked panels.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import kernels
from refbitnet.bitlinear import bitlinear_int
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.kernels import TernaryLinear, act_quant, reference, v4_maddubs
from refbitnet.kernels import v5_prefill as v5
from refbitnet.kernels.avx2 import available
from refbitnet.layouts import pack_kernel
from refbitnet.quant import absmax_int8

from _kernel_testing import MAX_THREADS, bits, restore_threads  # noqa: F401  (restore_threads: autouse fixture)

pytestmark = pytest.mark.skipif(not available(), reason="v5_prefill needs AVX2")



@st.composite
def problem(draw, max_s=40, max_n=70, max_chunks=40):
    """(xq int8 [S, K], codes int8 [N, K]), K = 128 * chunks, values drawn to hit the int8/int16 extremes."""
    S = draw(st.integers(1, max_s))
    N = draw(st.integers(1, max_n))
    K = 128 * draw(st.integers(1, max_chunks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x_kind = draw(st.sampled_from(["uniform", "min", "max", "extremes", "small"]))
    xq = {"uniform": lambda: rng.integers(-128, 128, (S, K)), "min": lambda: np.full((S, K), -128),
          "max": lambda: np.full((S, K), 127), "extremes": lambda: rng.choice([-128, 127], (S, K)),
          "small": lambda: rng.integers(-2, 3, (S, K))}[x_kind]()
    w_kind = draw(st.sampled_from(["uniform", "plus", "minus", "zero", "sparse"]))
    codes = {"uniform": lambda: rng.integers(-1, 2, (N, K)), "plus": lambda: np.ones((N, K)),
             "minus": lambda: -np.ones((N, K)), "zero": lambda: np.zeros((N, K)),
             "sparse": lambda: rng.choice([-1, 0, 0, 0, 1], (N, K))}[w_kind]()
    return xq.astype(np.int8), codes.astype(np.int8)


def run_v5(xq, packed, s, row_scale, tile_rows=v5.TILE_ROWS, panel_chunks=v5.PANEL_CHUNKS):
    S = xq.shape[0]
    out = np.full((S, packed.shape[0]), np.nan, np.float32)
    xsum = xq.astype(np.int64).sum(1).astype(np.int32)
    blocks, _ = act_quant.token_blocks(xq, v5.TOKENS)
    v5.matmul_scaled_v5(packed, blocks, xsum, s, row_scale, out, tile_rows, panel_chunks)
    return out


# ----------------------------------------------------------------------------------------------- integers
@given(problem(), st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]), st.integers(1, 45))
def test_accumulators_equal_reference(prob, tile_rows, panel_chunks):
    """Any row tile (odd ones too) and unpacked panel width (the int16 widening every 15 chunks is inside the
    register loop): every accumulator exact."""
    xq, codes = prob
    packed = pack_kernel(codes)
    acc = reference.ternary_matmul_acc_reference(xq, packed)                   # [S, N] int32
    ones_s, ones_n = np.ones(xq.shape[0], np.float32), np.ones(codes.shape[0], np.float32)
    y = run_v5(xq, packed, ones_s, ones_n, tile_rows, panel_chunks)
    np.testing.assert_array_equal(y, acc.astype(np.float32))
    assert np.all(np.abs(acc) < 2**24)                                          # so float32(acc) was exact
    np.testing.assert_array_equal(y.astype(np.int64), acc)


@pytest.mark.parametrize("K", [1920, 2560, 6912])
@pytest.mark.parametrize("x", [-128, 127])
@pytest.mark.parametrize("w", [-1, 1])
def test_int16_panel_bound_extremes(K, x, w):
    """Saturated activations and all-(+-1) weights: K = 1920 is exactly one 15-chunk panel, where an int16
    lane reaches 15 * 4 * 2 * (2 * -128) = -30720 (c = 2, x = -128), the bound the panel width rests on."""
    xq = np.full((5, K), x, np.int8)
    packed = pack_kernel(np.full((3, K), w, np.int8))
    y = run_v5(xq, packed, np.ones(5, np.float32), np.ones(3, np.float32))
    np.testing.assert_array_equal(y, np.full((5, 3), x * w * K, np.float32))


# ------------------------------------------------------------------------------------------------- floats
def v4_token_blocks(xq):
    """v4 blocked's layout [ceil(S/4), K/128, 4, 4, 32]: blocks[b, c, t, i, j] = xq[4b + t, 4(32c + j) + i]."""
    S, K = xq.shape
    padded = np.zeros((-(-S // 4) * 4, K), np.int8)
    padded[:S] = xq
    return np.ascontiguousarray(padded.reshape(-1, 4, K // 128, 32, 4).transpose(0, 2, 1, 4, 3))


@given(problem(), st.integers(0, 2**32 - 1))
def test_bit_identical_to_reference_and_v4_blocked(prob, seed):
    xq, codes = prob
    S, N = xq.shape[0], codes.shape[0]
    rng = np.random.default_rng(seed)
    s = (rng.random(S) * 100 + 0.01).astype(np.float32)
    ws = (rng.random(N) + 0.01).astype(np.float32)
    packed = pack_kernel(codes)
    expected = reference.ternary_matmul_reference(xq, s, packed, ws)
    y = TernaryLinear(packed, ws, kernel="v5").matmul(xq, s)
    np.testing.assert_array_equal(bits(y), bits(expected))
    v4 = np.empty((S, N), np.float32)
    xsum = xq.astype(np.int64).sum(1).astype(np.int32)
    v4_maddubs.matmul_scaled_v4_blocked(packed, v4_token_blocks(xq), xsum, s, ws, v4)
    np.testing.assert_array_equal(bits(y), bits(v4))


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 40), st.integers(1, 24),
       st.sampled_from([1e-3, 1.0, 1e3]), st.sampled_from(["scalar", "rows"]))
def test_from_float_x_equals_bitlinear_int(seed, S, N, chunks, magnitude, scale_kind):
    """From float x: quantize_token_blocks + the GEMM == refbitnet.bitlinear.bitlinear_int, bit for bit."""
    K = 128 * chunks
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((S, K)) * magnitude).astype(np.float32)
    codes = rng.integers(-1, 2, (N, K)).astype(np.int8)
    ws = (rng.random(N) + 0.5).astype(np.float32)
    if scale_kind == "scalar":
        ws = ws[0]
    out = bitlinear_int(x, codes, ws)
    linear = TernaryLinear(pack_kernel(codes), ws, kernel="v5")
    for _ in range(2):                                   # S = 1: the second call reuses the decode buffers
        np.testing.assert_array_equal(bits(linear(x)), bits(out.y))


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 23), st.integers(1, 20))
def test_quantize_token_blocks_equals_absmax_int8(seed, S, chunks):
    K = 128 * chunks
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((S, K)) * rng.choice([1e-6, 1.0, 1e4])).astype(np.float32)
    x[0, : min(K, 3)] = [127.5 / 127, -0.5, 0.0][: min(K, 3)]          # ties of round-half-even
    xq, s = absmax_int8(x)
    blocks = act_quant.empty_token_blocks(S, K, v5.TOKENS)
    blocks[...] = 99                                                     # padding must be rewritten
    s_got, xsum = np.empty(S, np.float32), np.empty(S, np.int32)
    assert act_quant.quantize_token_blocks(x, s_got, blocks, xsum) == -1
    want, want_xsum = act_quant.token_blocks(xq, v5.TOKENS)
    np.testing.assert_array_equal(blocks, want)
    np.testing.assert_array_equal(bits(s_got), bits(s))
    np.testing.assert_array_equal(xsum, xq.astype(np.int64).sum(1))
    np.testing.assert_array_equal(want_xsum, xsum)
    assert blocks.ctypes.data % act_quant.ALIGN == 0


def test_token_blocks_layout():
    """blocks[b, c, t, i, j] = xq[8b + t, 4(32c + j) + i], written out element by element."""
    rng = np.random.default_rng(0)
    xq = rng.integers(-128, 128, (11, 256)).astype(np.int8)
    blocks, _ = act_quant.token_blocks(xq, v5.TOKENS)
    assert blocks.shape == (2, 2, 8, 4, 32) and v5.TOKENS == 8
    for b, c, t, i, j in np.ndindex(*blocks.shape):
        s = 8 * b + t
        assert blocks[b, c, t, i, j] == (xq[s, 4 * (32 * c + j) + i] if s < 11 else 0)


# ------------------------------------------------------------------------------------------------ threads
@settings(max_examples=8)
@given(problem(max_n=200))
def test_results_do_not_depend_on_thread_count(prob):
    xq, codes = prob
    packed = pack_kernel(codes)
    s = np.linspace(0.5, 3.0, xq.shape[0]).astype(np.float32)
    ws = np.linspace(0.1, 1.0, codes.shape[0]).astype(np.float32)
    results = []
    for n in sorted({1, 2, MAX_THREADS}):
        if n <= MAX_THREADS:
            kernels.set_num_threads(n)
            results.append(bits(TernaryLinear(packed, ws, kernel="v5").matmul(xq, s)))
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


# --------------------------------------------------------------------------------------------- bad input
def _good():
    return np.ones((3, 256), np.float32), pack_kernel(np.zeros((5, 256), np.int8)), np.float32(0.5)


BAD = {
    "x float64": (lambda x, p, w: (x.astype(np.float64), p, w), RefBitNetTypeError, "x: expected dtype float32"),
    "x list": (lambda x, p, w: (x.tolist(), p, w), RefBitNetTypeError, "x"),
    "x 1-D": (lambda x, p, w: (x[0], p, w), RefBitNetError, "x"),
    "x strided": (lambda x, p, w: (np.ones((3, 512), np.float32)[:, ::2], p, w), RefBitNetError, "contiguous"),
    "x empty": (lambda x, p, w: (x[:0], p, w), RefBitNetError, "non-empty"),
    "x NaN": (lambda x, p, w: (np.where(np.arange(256) == 7, np.nan, x).astype(np.float32), p, w), RefBitNetError, "finite"),
    "packed int8": (lambda x, p, w: (x, p.view(np.int8), w), RefBitNetTypeError, "packed"),
    "packed wrong K": (lambda x, p, w: (x, np.zeros((5, 32), np.uint8), w), RefBitNetError, "packed"),
    "packed transposed": (lambda x, p, w: (x, np.zeros((64, 5), np.uint8).T, w), RefBitNetError, "contiguous"),
    "K % 128": (lambda x, p, w: (np.ones((3, 192), np.float32), np.zeros((5, 48), np.uint8), w), RefBitNetError, "K % 128"),
    "scale float64": (lambda x, p, w: (x, p, np.ones(5)), RefBitNetTypeError, "weight_scale"),
    "scale wrong rows": (lambda x, p, w: (x, p, np.ones(4, np.float32)), RefBitNetError, "weight_scale"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_v5_door_rejects_bad_input(case):
    make, error, message = BAD[case]
    x, packed, ws = make(*_good())
    with pytest.raises(error, match=message):
        TernaryLinear(packed, ws, kernel="v5")(x)


@pytest.mark.parametrize("xq, s, error, message", [
    (np.zeros((2, 192), np.int8), np.ones(2, np.float32), RefBitNetError, "K % 128"),
    (np.zeros((2, 256), np.int16), np.ones(2, np.float32), RefBitNetTypeError, "xq"),
    (np.zeros((2, 256), np.int8), np.ones(3, np.float32), RefBitNetError, "s"),
])
def test_v5_door_rejects_bad_int8_input(xq, s, error, message):
    packed = np.zeros((4, xq.shape[1] // 4), np.uint8)
    with pytest.raises(error, match=message):
        TernaryLinear(packed, 1.0, kernel="v5").matmul(xq, s)
