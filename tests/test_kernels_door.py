"""refbitnet.kernels.TernaryLinear, the one checked door to the ternary kernels, and what stands behind it.

- Every kernel name (forced with kernel=) gives the reference's bits on hypothesis-drawn shapes, through
  all three entry points: __call__(x f32), acc(xq), matmul(xq, s); "auto" picks the kernel by S as the
  runtime needs it (v4 / v4_blocked / v5 on AVX2 with K % 128 == 0, else v3).
- The fused quantize-and-lay-out passes of act_quant equal quant.absmax_int8 followed by the readable
  layouts, bit for bit (round-half-even ties, all-zero rows, the 1e-5 floor, codes clipped at -128).
- The load-time repack (kernels.repack) equals the readable layouts.pack_kernel(layouts.unpack_hf(...)).
- Bad input gives a RefBitNetError naming the argument, before any kernel runs.
Several tests here moved from tests/test_runtime.py (runtime.PackedLinear, which this door replaces) with
their assertions.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import kernels
from refbitnet.bitlinear import bitlinear_int
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.kernels import KERNELS, TernaryLinear, act_quant, linear, reference, v4_maddubs, v6_vnni
from refbitnet.kernels.avx2 import available
from refbitnet.kernels.repack import kernel_layout_rows
from refbitnet.kernels.v3_word_planes import MAX_K
from refbitnet.layouts import pack_hf, pack_kernel, unpack_hf
from refbitnet.quant import absmax_int8

from _kernel_testing import bits, restore_threads  # noqa: F401  (restore_threads: autouse fixture)

AVX2 = ("v4", "v4_blocked", "v5", "v6")
needs_avx2 = pytest.mark.skipif(not available(), reason="v4 / v5 need AVX2")
GEMV = "v6" if v6_vnni.available() else "v4"      # the door's S = 1 kernel on this CPU (K % 128 == 0)


def runnable(K):
    return [k for k in KERNELS if k not in AVX2 or (available() and K % 128 == 0
                                                    and (k != "v6" or v6_vnni.available()))]


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


# ------------------------------------------------------------------------------- every kernel, forced
@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 12), n=st.integers(1, 70),
       k=st.sampled_from([8, 24, 128, 136, 256, 384, 2048, 2560]), kind=st.sampled_from(["normal", "ties", "zeros"]),
       weights=st.sampled_from(["random", "plus", "minus"]))
def test_every_kernel_bit_identical_to_reference(seed, s_len, n, k, kind, weights):
    """Each kernel name through each entry point == kernels.reference (integers) and bitlinear_int (floats)."""
    rng = np.random.default_rng(seed)
    codes = {"random": rng.integers(-1, 2, (n, k)), "plus": np.ones((n, k)), "minus": -np.ones((n, k))}[weights]
    codes = codes.astype(np.int8)
    packed = pack_kernel(codes)
    ws = rng.uniform(0.01, 2.0, n).astype(np.float32)
    x = _activations(seed, s_len, k, kind)
    want = bitlinear_int(x, codes, ws)                                    # xq, s, acc, y of the readable path
    np.testing.assert_array_equal(reference.ternary_matmul_acc_reference(want.xq, packed), want.acc)
    for name in ["auto"] + runnable(k):
        door = TernaryLinear(packed, ws, kernel=name)
        if name != "auto":
            assert door.kernel_for(s_len) == name
        np.testing.assert_array_equal(door.acc(want.xq), want.acc, err_msg=name)
        np.testing.assert_array_equal(bits(door.matmul(want.xq, want.s)), bits(want.y), err_msg=name)
        np.testing.assert_array_equal(bits(door(x)), bits(want.y), err_msg=name)
        out = np.full((s_len, n), np.nan, np.float32)                    # a caller's buffer: written, returned
        assert door(x, out) is out
        np.testing.assert_array_equal(bits(out), bits(want.y), err_msg=name)


@pytest.mark.parametrize("k, avx2", [(256, True), (136, False), (2560, True), (8, False)])
def test_auto_picks_the_kernel_by_token_count(k, avx2):
    door = TernaryLinear(pack_kernel(np.zeros((4, k), np.int8)))
    want = {1: GEMV, 2: "v4_blocked", 4: "v4_blocked", 5: "v5", 64: "v5"} if avx2 and available() else \
        {s: "v3" for s in (1, 2, 4, 5, 64)}
    assert {s: door.kernel_for(s) for s in want} == want
    for name in runnable(k):
        assert {TernaryLinear(door.packed, kernel=name).kernel_for(s) for s in (1, 3, 9)} == {name}


def test_without_avx2_auto_runs_v3_and_avx2_kernels_are_refused(monkeypatch):
    monkeypatch.setattr(linear, "available", lambda: False)
    packed = pack_kernel(np.ones((4, 256), np.int8))
    door = TernaryLinear(packed)
    assert {door.kernel_for(s) for s in (1, 3, 9)} == {"v3"}
    for name in AVX2:
        with pytest.raises(RefBitNetError, match="without AVX2"):
            TernaryLinear(packed, kernel=name)
    np.testing.assert_array_equal(door.acc(np.ones((3, 256), np.int8)), np.full((3, 4), 256))


def test_without_vnni_auto_runs_v4_and_v6_is_refused(monkeypatch):
    monkeypatch.setattr(v6_vnni, "available", lambda: False)
    packed = pack_kernel(np.ones((4, 256), np.int8))
    door = TernaryLinear(packed)
    if available():
        assert door.kernel_for(1) == "v4"
    with pytest.raises(RefBitNetError, match="AVX512-VNNI" if available() else "without AVX2"):
        TernaryLinear(packed, kernel="v6")
    np.testing.assert_array_equal(door(np.ones((1, 256), np.float32)), np.full((1, 4), 256, np.float32))


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), k=st.sampled_from([16, 256]))
def test_decode_buffers_are_reused_and_results_stay_exact(seed, n, k):
    """S = 1 returns this matrix's reused buffer (valid until the next S = 1 call), for every kernel."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    ws = rng.uniform(0.5, 2.0, n).astype(np.float32)
    for name in runnable(k):
        door = TernaryLinear(pack_kernel(codes), ws, kernel=name)
        x1, x2 = _activations(seed, 1, k, "normal"), _activations(seed + 1, 1, k, "normal")
        y1 = door(x1).copy()
        y2 = door(x2)
        np.testing.assert_array_equal(bits(y1), bits(bitlinear_int(x1, codes, ws).y), err_msg=name)
        np.testing.assert_array_equal(bits(y2), bits(bitlinear_int(x2, codes, ws).y), err_msg=name)
        if name not in ("reference", "v1", "v2"):
            assert door(x1) is y2                                           # the same buffer, rewritten


# ------------------------------------------------------------------------- moved from tests/test_runtime.py
@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 5), n4=st.integers(1, 24), words=st.integers(1, 40))
def test_door_equals_ternary_matmul(seed, s_len, n4, words):
    rng = np.random.default_rng(seed)
    n, k = 4 * n4, 8 * words
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    row_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
    door = TernaryLinear(pack_kernel(codes), row_scale)
    for step in range(2):          # the second S = 1 call reuses the first one's buffers
        x = _activations(seed + step, s_len, k, "normal")
        xq, s = absmax_int8(x)
        assert np.array_equal(door(x), kernels.ternary_matmul(xq, s, pack_kernel(codes), row_scale))


def test_door_rejects_bad_input():
    door = TernaryLinear(pack_kernel(np.zeros((4, 16), np.int8)), np.ones(4, np.float32))
    x = np.ones((1, 16), np.float32)
    x[0, 5] = np.inf
    with pytest.raises(RefBitNetError, match="finite"):
        door(x)
    with pytest.raises(RefBitNetError, match="float32"):
        door(np.ones((1, 8), np.float32))
    with pytest.raises(RefBitNetError, match="float32"):
        door(np.ones((1, 16), np.float64))
    with pytest.raises(RefBitNetError, match="multiple of 8"):
        TernaryLinear(np.zeros((4, 3), np.uint8), np.ones(4, np.float32))
    with pytest.raises(RefBitNetError, match="weight_scale"):          # (PackedLinear called it row_scale)
        TernaryLinear(np.zeros((4, 4), np.uint8), np.ones(3, np.float32))


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 4), words=st.integers(1, 40),
       kind=st.sampled_from(["normal", "ties", "zeros", "tiny"]))
def test_quantize_word_planes_equals_absmax_int8_then_word_planes(seed, s_len, words, kind):
    x = _activations(seed, s_len, 8 * words, kind)
    xq, s = absmax_int8(x)
    planes, xsum = act_quant.word_planes(xq)
    s2, planes2 = np.empty(s_len, np.float32), np.empty(planes.shape, np.int16)
    xsum2 = np.empty(s_len, np.int32)
    assert act_quant.quantize_word_planes(x, s2, planes2, xsum2) == -1
    assert np.array_equal(s, s2) and np.array_equal(planes, planes2) and np.array_equal(xsum, xsum2)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 9), chunks=st.integers(1, 6),
       kind=st.sampled_from(["normal", "ties", "zeros", "tiny"]))
def test_quantize_token_blocks_equals_byte_planes(seed, s_len, chunks, kind):
    """act_quant.quantize_token_blocks: the same s, codes and sums as quantize_byte_planes, in the 4-token
    block layout, padding tokens zero."""
    k = 128 * chunks
    x = _activations(seed, s_len, k, kind)
    s1, planes, xsum1 = np.empty(s_len, np.float32), np.empty((s_len, 4, k // 4), np.int8), np.empty(s_len, np.int32)
    assert act_quant.quantize_byte_planes(x, s1, planes, xsum1) == -1
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


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 11), chunks=st.integers(1, 5),
       kind=st.sampled_from(["normal", "ties", "zeros", "tiny"]))
def test_every_fused_quantizer_equals_its_readable_layout(seed, s_len, chunks, kind):
    """quantize_byte_planes / quantize_token_blocks (T = 4 and 8) == absmax_int8 + byte_planes / token_blocks,
    and each fused pass reports the first row holding a NaN/inf."""
    k = 128 * chunks
    x = _activations(seed, s_len, k, kind)
    xq, s = absmax_int8(x)
    cases = [(act_quant.quantize_byte_planes, act_quant.byte_planes(xq), np.empty((s_len, 4, k // 4), np.int8))]
    for t in (4, 8):
        out = act_quant.empty_token_blocks(s_len, k, t)
        out[...] = 99
        cases.append((act_quant.quantize_token_blocks, act_quant.token_blocks(xq, t), out))
    cases.append((act_quant.quantize_word_planes, act_quant.word_planes(xq), np.empty((s_len, 8, k // 8), np.int16)))
    for quantize, (want, want_xsum), out in cases:
        s2, xsum2 = np.empty(s_len, np.float32), np.empty(s_len, np.int32)
        assert quantize(x, s2, out, xsum2) == -1
        assert np.array_equal(out, want) and np.array_equal(xsum2, want_xsum) and np.array_equal(bits(s2), bits(s))
        bad = x.copy()
        bad[s_len // 2, 3] = np.inf
        assert quantize(bad, s2, out, xsum2) == s_len // 2


@pytest.mark.parametrize("case", ["negative_max", "signed_zeros", "largest_finite", "subnormals", "at_the_floor",
                                  "nan", "negative_nan", "nan_payload", "inf", "negative_inf"])
def test_row_quantizer_on_edge_values(case):
    """act_quant.quantize_row (max|x| taken over the bit patterns) == absmax_int8 on the values where a float
    max and an integer max could part: the largest magnitude negative, signed zeros, the largest finite
    float, subnormals, max|x| at and around the 1e-5 floor; and -1 (nothing written) for every NaN and inf
    pattern, wherever it sits."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(256).astype(np.float32)
    special = {"negative_max": -np.float32(50.0), "largest_finite": np.finfo(np.float32).max,
               "nan": np.float32(np.nan), "inf": np.float32(np.inf), "negative_inf": -np.float32(np.inf)}
    if case == "signed_zeros":
        x[:] = 0.0
        x[::3] = -0.0
    elif case == "subnormals":
        mantissas = rng.integers(1, 2**23, 256).astype(np.uint32)
        signs = rng.integers(0, 2, 256).astype(np.uint32) << np.uint32(31)
        x = (mantissas | signs).view(np.float32)
    elif case == "at_the_floor":
        x = (x / np.abs(x).max() * np.float32(1e-5)).astype(np.float32)
        x[17] = np.nextafter(np.float32(1e-5), np.float32(1.0))
    elif case == "negative_nan":
        x[100] = np.array([0xFFC00000], np.uint32).view(np.float32)[0]
    elif case == "nan_payload":
        x[255] = np.array([0x7F800001], np.uint32).view(np.float32)[0]
    else:
        x[200] = special[case]
    q = np.full(256, 99, np.int8)
    scale, total = act_quant.quantize_row(x, q)
    if not np.isfinite(x).all():
        assert scale == -1 and (q == 99).all()
        return
    xq, s = absmax_int8(x[None])
    assert bits(np.float32(scale)) == bits(s[0]) and np.array_equal(q, xq[0]) and total == int(xq.sum())


def test_readable_layouts_element_by_element():
    xq = np.random.default_rng(2).integers(-128, 128, (3, 256)).astype(np.int8)
    planes, xsum = act_quant.word_planes(xq)
    bytes_, _ = act_quant.byte_planes(xq)
    assert np.array_equal(xsum, xq.astype(np.int64).sum(1))
    for r, t, w in np.ndindex(*planes.shape):
        assert planes[r, t, w] == int(xq[r, 8 * w + t]) * 4 ** (3 - t % 4)
    for r, i, j in np.ndindex(*bytes_.shape):
        assert bytes_[r, i, j] == xq[r, 4 * j + i]


def test_kernel_layout_rows_equals_readable_repack():
    rng = np.random.default_rng(8)
    for k, ns in ((4, (4,)), (12, (8, 4)), (48, (160, 40, 40)), (120, (24, 24))):
        parts = [pack_hf(rng.integers(-1, 2, size=(n, k)).astype(np.int8)) for n in ns]
        assert np.array_equal(kernel_layout_rows(parts),
                              np.concatenate([pack_kernel(unpack_hf(p)) for p in parts]))
    with pytest.raises(RefBitNetError, match="divisible by 4"):
        kernel_layout_rows([np.zeros((1, 6), np.uint8)])
    with pytest.raises(RefBitNetTypeError, match=r"parts\[1\]"):
        kernel_layout_rows([np.zeros((1, 8), np.uint8), np.zeros((1, 8), np.int8)])
    with pytest.raises(RefBitNetError, match="parts"):
        kernel_layout_rows([])


@needs_avx2
@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 12), n=st.integers(1, 70), blocks=st.integers(1, 60),
       extreme=st.sampled_from([None, 1, -1]))
def test_avx2_kernels_equal_v3(seed, s_len, n, blocks, extreme):
    """The door on its AVX2 kernels (K % 128 == 0: v4 GEMV for S = 1, v4 blocked for S <= 4, v5_prefill
    beyond, S not a multiple of its 8-token block included) bit-identical to the v3 kernel, including
    all-(+1)/all-(-1) rows against activations quantized to 127/-128 (int16 partials at their bound)."""
    rng = np.random.default_rng(seed)
    k = 128 * blocks
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8) if extreme is None else np.full((n, k), extreme, np.int8)
    x = _activations(seed, s_len, k, "normal")
    if extreme is not None:
        x = np.full((s_len, k), -1.0 if seed % 2 else 1.0, np.float32)
        x[:, 0] = 1.0 if seed % 2 else -1.0          # one opposite value: the rest quantize to -127 or 127
    row_scale = rng.uniform(0.01, 2.0, n).astype(np.float32)
    door = TernaryLinear(pack_kernel(codes), row_scale)
    assert door.kernel_for(s_len) == (GEMV if s_len == 1 else "v4_blocked" if s_len <= 4 else "v5")
    xq, s = absmax_int8(x)
    assert np.array_equal(door(x), TernaryLinear(pack_kernel(codes), row_scale, kernel="v3").matmul(xq, s))


@needs_avx2
@pytest.mark.parametrize("chunks", [1, 2, 3, 15, 16, 20, 29, 30, 31, 45, 54, 59, 60, 61])
def test_v4_gemv_at_the_int16_bound_for_every_block_split(chunks):
    """v4's GEMV (blocks of up to 30 chunks, chunks alternating between two int16 accumulators of at most
    15 each, an odd last chunk, then the next block) on rows of all +1 / all -1 against activations of
    127 / -128, where every int16 partial sits at its bound, and on random rows: == the reference."""
    k = 128 * chunks
    rng = np.random.default_rng(chunks)
    codes = np.stack([np.ones(k), -np.ones(k), rng.integers(-1, 2, k), np.zeros(k)]).astype(np.int8)   # [4, K]
    door = TernaryLinear(pack_kernel(codes), kernel="v4")
    for value in (127, -128):
        xq = np.full((1, k), value, np.int8)
        np.testing.assert_array_equal(door.acc(xq), reference.ternary_matmul_acc_reference(xq, pack_kernel(codes)))
    xq = rng.integers(-128, 128, (1, k)).astype(np.int8)
    np.testing.assert_array_equal(door.acc(xq), reference.ternary_matmul_acc_reference(xq, pack_kernel(codes)))


@needs_avx2
@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), s_len=st.integers(1, 11), n=st.integers(1, 40), chunks=st.integers(1, 40),
       weights=st.sampled_from(["random", "plus", "minus"]), acts=st.sampled_from(["random", "max", "min", "mixed"]))
def test_v4_blocked_gemm_equals_v4_gemv(seed, s_len, n, chunks, weights, acts):
    """The prefill kernel (4 tokens per weight pass, chunk-interleaved activation blocks, ragged last block)
    equals the one-token v4 kernel token by token, bit for bit, with int8 extremes -128/127 against
    all-(+1)/all-(-1) rows (each int16 partial sum then sits at its bound, 15 chunks x 2048)."""
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
    assert np.array_equal(blocks, act_quant.token_blocks(xq, t)[0])                   # the readable layout
    out = np.empty((s_len, n), np.float32)
    v4_maddubs.matmul_scaled_v4_blocked(packed, blocks, xsum, s_act, row_scale, out)
    planes = np.ascontiguousarray(xq.reshape(s_len, k // 4, 4).transpose(0, 2, 1))
    expect = np.empty((s_len, n), np.float32)
    v4_maddubs.matmul_scaled_v4(packed, planes, xsum, s_act, row_scale, expect)
    assert np.array_equal(out.view(np.uint32), expect.view(np.uint32))
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T                               # exact integers
    ref = ((acc.astype(np.float32) / s_act[:, None]).astype(np.float32) * row_scale).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


# ------------------------------------------------------------------------------------------- bad input
def _packed(k=256, n=4):
    return pack_kernel(np.zeros((n, k), np.int8))


BAD_DOOR = {  # name: (make the door or its packed weights, call it (None: making it fails), error, message)
    "packed float32": (lambda: TernaryLinear(np.zeros((4, 64), np.float32)), None, RefBitNetTypeError, "packed"),
    "packed list": (lambda: TernaryLinear([[0] * 64] * 4), None, RefBitNetTypeError, "packed"),
    "packed 1-D": (lambda: TernaryLinear(np.zeros(64, np.uint8)), None, RefBitNetError, "packed"),
    "packed strided": (lambda: TernaryLinear(np.zeros((4, 128), np.uint8)[:, ::2]), None, RefBitNetError, "contiguous"),
    "packed empty": (lambda: TernaryLinear(np.zeros((0, 64), np.uint8)), None, RefBitNetError, "non-empty"),
    "K % 8": (lambda: TernaryLinear(np.zeros((4, 3), np.uint8)), None, RefBitNetError, "K % 8"),
    "K > MAX_K": (lambda: TernaryLinear(np.zeros((1, MAX_K // 4 + 2), np.uint8)), None, RefBitNetError, "overflow"),
    "unknown kernel": (lambda: TernaryLinear(_packed(), kernel="v9"), None, RefBitNetError, "kernel: expected one of"),
    "kernel not a str": (lambda: TernaryLinear(_packed(), kernel=3), None, RefBitNetError, "kernel"),
    "v4 for K = 136": (lambda: TernaryLinear(_packed(136), kernel="v4"), None, RefBitNetError, "K % 128"),
    "v5 for K = 136": (lambda: TernaryLinear(_packed(136), kernel="v5"), None, RefBitNetError, "K % 128"),
    "scale float64": (lambda: TernaryLinear(_packed(), np.ones(4)), None, RefBitNetTypeError, "weight_scale"),
    "scale rows": (lambda: TernaryLinear(_packed(), np.ones(5, np.float32)), None, RefBitNetError, "weight_scale"),
    "scale bool": (lambda: TernaryLinear(_packed(), True), None, RefBitNetTypeError, "weight_scale"),
    "x float64": (_packed, lambda d: d(np.ones((2, 256))), RefBitNetTypeError, "x: expected dtype float32"),
    "x int8": (_packed, lambda d: d(np.ones((2, 256), np.int8)), RefBitNetTypeError, "x"),
    "x list": (_packed, lambda d: d([[1.0] * 256]), RefBitNetTypeError, "x"),
    "x 1-D": (_packed, lambda d: d(np.ones(256, np.float32)), RefBitNetError, "x"),
    "x wrong K": (_packed, lambda d: d(np.ones((2, 128), np.float32)), RefBitNetError, r"x: expected float32 \[S, K\]"),
    "x strided": (_packed, lambda d: d(np.ones((2, 512), np.float32)[:, ::2]), RefBitNetError, "contiguous"),
    "x transposed": (_packed, lambda d: d(np.ones((256, 2), np.float32).T), RefBitNetError, "contiguous"),
    "x empty": (_packed, lambda d: d(np.ones((0, 256), np.float32)), RefBitNetError, "non-empty"),
    "x NaN": (_packed, lambda d: d(np.where(np.arange(256) == 9, np.nan, 1).astype(np.float32)[None]),
              RefBitNetError, "finite"),
    "x inf, 6 tokens": (_packed, lambda d: d(np.where(np.arange(6)[:, None] == 4, np.inf, np.ones((6, 256)))
                                             .astype(np.float32)), RefBitNetError, "finite"),
    "xq int16": (_packed, lambda d: d.acc(np.ones((2, 256), np.int16)), RefBitNetTypeError, "xq"),
    "xq wrong K": (_packed, lambda d: d.acc(np.ones((2, 128), np.int8)), RefBitNetError, "xq"),
    "xq strided": (_packed, lambda d: d.matmul(np.ones((2, 512), np.int8)[:, ::2], np.ones(2, np.float32)),
                   RefBitNetError, "contiguous"),
    "s float64": (_packed, lambda d: d.matmul(np.ones((2, 256), np.int8), np.ones(2)), RefBitNetTypeError, "s"),
    "s wrong length": (_packed, lambda d: d.matmul(np.ones((2, 256), np.int8), np.ones(3, np.float32)),
                       RefBitNetError, "s: expected shape"),
    "out float64": (_packed, lambda d: d(np.ones((2, 256), np.float32), np.empty((2, 4))), RefBitNetTypeError,
                    "out: expected dtype float32"),
    "out wrong shape": (_packed, lambda d: d(np.ones((2, 256), np.float32), np.empty((2, 5), np.float32)),
                        RefBitNetError, r"out: expected float32 \[S, N\] = \[2, 4\]"),
    "out strided": (_packed, lambda d: d(np.ones((2, 256), np.float32), np.empty((2, 8), np.float32)[:, ::2]),
                    RefBitNetError, "contiguous"),
    "kernel_for(0)": (_packed, lambda d: d.kernel_for(0), RefBitNetError, "S"),
    "kernel_for(1.5)": (_packed, lambda d: d.kernel_for(1.5), RefBitNetTypeError, "S"),
}


@pytest.mark.parametrize("case", sorted(c for c, v in BAD_DOOR.items() if v[1] is None))
def test_door_rejects_bad_weights_and_options(case):
    make, _, error, message = BAD_DOOR[case]
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("case", sorted(c for c, v in BAD_DOOR.items() if v[1] is not None))
@pytest.mark.parametrize("kernel", ["auto", "reference", "v1", "v3", "v5"])
def test_door_rejects_bad_activations(case, kernel):
    make, call, error, message = BAD_DOOR[case]
    if kernel in AVX2 and not available():
        pytest.skip("no AVX2")
    door = TernaryLinear(make(), kernel=kernel)
    with pytest.raises(error, match=message):
        call(door)


def test_error_names_the_cpu_when_avx2_is_missing(monkeypatch):
    monkeypatch.setattr(linear, "available", lambda: False)
    with pytest.raises(RefBitNetError, match="AVX2.*K = 256 on a CPU without AVX2"):
        TernaryLinear(_packed(256), kernel="v4_blocked")


_AVX2_PATHS_SCRIPT = """
import numpy as np
from refbitnet.bitlinear import bitlinear_int
from refbitnet.kernels import TernaryLinear, v5_prefill
from refbitnet.layouts import pack_kernel
assert not v5_prefill.VNNI
rng = np.random.default_rng(7)
for k, n, s_len in ((2560, 70, 1), (2560, 70, 3), (2560, 70, 19), (6912, 33, 9), (384, 5, 1)):
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    ws = rng.uniform(0.5, 2.0, n).astype(np.float32)
    x = (rng.standard_normal((s_len, k)) * 3).astype(np.float32)
    door = TernaryLinear(pack_kernel(codes), ws)
    want = {1: "v4", 3: "v4_blocked"}.get(s_len, "v5")
    assert door.kernel_for(s_len) == want, (door.kernel_for(s_len), want)
    assert np.array_equal(door(x).view(np.uint32), bitlinear_int(x, codes, ws).y.view(np.uint32)), (k, n, s_len)
# the one-go decode step on v4's row dot: the same logits and cache as the op-by-op path
import sys
sys.path.insert(0, TESTS)
from refbitnet import decode_step
from refbitnet.kernels import v4_maddubs
from refbitnet.checkpoint import model_from_tensors
from _tiny_bitnet import numpy_config, numpy_release_tensors
assert decode_step.ROW_DOT is v4_maddubs.dot_row
sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=200)
model = model_from_tensors(numpy_config(sizes), numpy_release_tensors(sizes, 3), source="tiny", backend="numba")
ids = rng.integers(0, 200, 20)
runs = []
for step in (False, True):
    model._fast.step_fits = step
    cache = model.new_cache(32, kv_dtype="float16")
    runs.append([model.forward(ids[:12], cache=cache)] + [model.forward(ids[j:j + 1], cache=cache) for j in range(12, 20)]
                + [cache.k.copy(), cache.v.copy()])
assert model._fast.step is not None
assert all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(*runs))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not (available() and v6_vnni.available()), reason="needs a CPU with AVX512-VNNI")
def test_avx2_paths_on_a_vnni_cpu(tmp_path):
    """With REFBITNET_NO_VNNI=1 (and its own Numba cache) a VNNI CPU runs the AVX2 paths: the door picks v4
    for one token and v5 sums with vpmaddubsw, bit-identical to the reference BitLinear, and the decode step
    (on v4's row dot) gives the op-by-op path's logits and cache."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, REFBITNET_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path))
    script = f"TESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + _AVX2_PATHS_SCRIPT
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
