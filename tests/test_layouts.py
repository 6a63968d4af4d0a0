"""Packed ternary layouts: bit-identical to transformers (HF release) and gguf-py (TQ1_0, TQ2_0),
I2_S / TQ2_0 checked against scalar encoders written straight from SPEC §5's element-to-byte
mapping, every layout round-trips, and bad input is rejected with a named message.

Numerics: integer bit manipulation only; every comparison is exact.
"""

import re

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.layouts import (pack_hf, pack_i2s, pack_kernel, pack_tq1_0, pack_tq2_0, unpack_hf, unpack_i2s,
                               unpack_kernel, unpack_tq1_0, unpack_tq2_0)
from transformers.integrations.bitnet import pack_weights, unpack_weights


@st.composite
def ternary(draw, n_multiple=1, k_multiple=1, max_n=4, max_k=4, layout=True):
    """int8 codes [N, K] (N, K multiples of the given sizes), dense random, all-zero, all-one-value or sparse,
    in C, Fortran or strided memory order."""
    n = n_multiple * draw(st.integers(1, max_n))
    k = k_multiple * draw(st.integers(1, max_k))
    kind = draw(st.sampled_from(["random", "zeros", "constant", "sparse"]))
    if kind == "random":
        codes = draw(arrays(np.int8, (n, k), elements=st.integers(-1, 1)))
    elif kind == "zeros":
        codes = np.zeros((n, k), np.int8)
    elif kind == "constant":
        codes = np.full((n, k), draw(st.sampled_from([-1, 1])), np.int8)
    else:
        codes = np.zeros((n, k), np.int8)
        idx = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, k - 1), st.sampled_from([-1, 1])),
                            max_size=6))
        for r, c, v in idx:
            codes[r, c] = v
    order = draw(st.sampled_from(["C", "F", "strided"])) if layout else "C"
    if order == "F":
        codes = np.asfortranarray(codes)
    elif order == "strided":
        big = np.zeros((n, 2 * k), np.int8)
        big[:, ::2] = codes
        codes = big[:, ::2]
    return codes


# ----------------------------------------------------------------------------- HF release layout

@given(ternary(n_multiple=4, max_n=8, max_k=24))
def test_pack_hf_bit_identical_to_transformers(codes):
    theirs = pack_weights(torch.from_numpy(np.array(codes)))               # pack_weights mutates its input: copy
    assert np.array_equal(pack_hf(codes), theirs.numpy())


@given(arrays(np.uint8, st.tuples(st.integers(1, 8), st.integers(1, 24)),
              elements=st.tuples(*[st.integers(0, 2)] * 4).map(lambda f: f[0] | f[1] << 2 | f[2] << 4 | f[3] << 6)))
def test_unpack_hf_bit_identical_to_transformers_on_any_valid_bytes(packed):
    theirs = unpack_weights(torch.from_numpy(packed), torch.int8).numpy()
    ours = unpack_hf(packed)
    assert ours.dtype == np.int8 and np.array_equal(ours, theirs)
    assert np.array_equal(pack_hf(ours), packed)


def test_hf_worked_example_from_transformers_docstring():
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], np.uint8)
    expected = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_hf(packed).tolist() == expected
    assert pack_hf(np.array([[0, -1], [-1, 1], [1, 0], [1, -1]], np.int8)).tolist() == [[0xA1, 0x18]]


# ----------------------------------------------------------------------------- kernel layout

def scalar_pack_kernel(codes):
    n, k = codes.shape
    out = np.zeros((n, k // 4), np.uint8)
    for r in range(n):
        for c in range(k):
            out[r, c // 4] |= (int(codes[r, c]) + 1) << (2 * (c % 4))
    return out


@given(ternary(k_multiple=4, max_n=5, max_k=6))
def test_kernel_layout_matches_its_definition_and_uint16_reading(codes):
    packed = pack_kernel(codes)
    assert packed.flags.c_contiguous and np.array_equal(packed, scalar_pack_kernel(codes))
    assert np.array_equal(unpack_kernel(packed), codes)
    if codes.shape[1] % 8 == 0:    # how the Numba kernels read it: 8 codes per little-endian uint16 word
        words = np.ascontiguousarray(packed).view("<u2")                    # [N, K/8]
        t = np.arange(8)
        fields = (words[..., None] >> (2 * t)) & 3                          # field t of word w is k = 8w + t
        assert np.array_equal(fields.reshape(codes.shape) - 1, codes)


def test_kernel_worked_example():
    assert pack_kernel(np.array([[1, 0, -1, -1, 0, 0, 1, 1]], np.int8)).tolist() == [[0x06, 0xA5]]


# ----------------------------------------------------------------------------- I2_S

def scalar_pack_i2s(codes, scale):
    """SPEC §5, element by element: element j of each 128-block is in byte j % 32 at shift 6 - 2 (j // 32)."""
    flat = codes.reshape(-1)
    body = np.zeros(flat.size // 4, np.uint8)
    for e in range(flat.size):
        block, j = divmod(e, 128)
        body[32 * block + j % 32] |= (int(flat[e]) + 1) << (6 - 2 * (j // 32))
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return np.concatenate([body, tail])


@given(ternary(k_multiple=128, max_n=3, max_k=2), st.floats(0, 10, width=32))
def test_i2s_matches_spec_mapping_and_round_trips(codes, scale):
    data = pack_i2s(codes, scale)
    assert data.shape == (codes.size // 4 + 32,)
    assert np.array_equal(data, scalar_pack_i2s(codes, scale))
    back, s = unpack_i2s(data, codes.shape)
    assert np.array_equal(back, codes) and s.dtype == np.float32 and s == np.float32(scale)


def test_i2s_hand_built_example():
    codes = np.zeros((1, 128), np.int8)
    codes[0, 0], codes[0, 32], codes[0, 127] = 1, -1, 1
    data = pack_i2s(codes, 0.5)
    expected = np.full(64, 0x55, np.uint8)
    expected[0], expected[31] = 0x85, 0x56
    expected[32:] = 0
    expected[32:36] = [0x00, 0x00, 0x00, 0x3F]                             # 0.5 as little-endian float32
    assert np.array_equal(data, expected)
    # decoding hand-built bytes: byte 5 = 0b00_01_10_01 -> elements 5, 37, 69, 101 = -1, 0, +1, 0
    data = expected.copy()
    data[5] = 0b00_01_10_01
    codes2, scale = unpack_i2s(data, (1, 128))
    assert codes2[0, [5, 37, 69, 101]].tolist() == [-1, 0, 1, 0] and scale == np.float32(0.5)


# ----------------------------------------------------------------------------- TQ2_0 / TQ1_0

def scalar_pack_tq2_0_codes(codes):
    """SPEC §5: element 128h + 32l + m of a 256-block is in byte 32h + m at bits 2l (LSB first), code = w + 1."""
    flat = codes.reshape(-1)
    qs = np.zeros((flat.size // 256, 64), np.uint8)
    for e in range(flat.size):
        block, j = divmod(e, 256)
        h, rest = divmod(j, 128)
        l, m = divmod(rest, 32)
        qs[block, 32 * h + m] |= (int(flat[e]) + 1) << (2 * l)
    return qs


@given(ternary(k_multiple=256, max_n=3, max_k=2), st.floats(2.0 ** -20, 100, width=32))
def test_tq2_0_matches_spec_mapping_and_gguf_py(codes, scale):
    data = pack_tq2_0(codes, scale)
    blocks = data.reshape(-1, 66)
    assert np.array_equal(blocks[:, :64], scalar_pack_tq2_0_codes(codes))
    weights = codes.astype(np.float32) * np.float32(scale)                 # what llama.cpp would quantize
    assert np.array_equal(data, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.TQ2_0).reshape(-1))
    back, d = unpack_tq2_0(data, codes.shape)
    assert np.array_equal(back, codes)
    nonzero = (codes.reshape(codes.shape[0], -1, 256) != 0).any(axis=-1)
    assert np.array_equal(d, np.where(nonzero, np.float32(np.float16(scale)), np.float32(0)))
    deq = gguf.quants.dequantize(data.reshape(codes.shape[0], -1), gguf.GGMLQuantizationType.TQ2_0)
    assert np.array_equal(deq, back * np.repeat(d, 256, axis=1))


def test_tq2_0_hand_built_example():
    codes = np.zeros((1, 256), np.int8)
    codes[0, 0], codes[0, 32], codes[0, 128] = 1, -1, 1
    data = pack_tq2_0(codes, 0.5)
    expected = np.full(66, 0x55, np.uint8)
    expected[0], expected[32] = 0x52, 0x56
    expected[64:] = [0x00, 0x38]                                            # 0.5 as little-endian fp16
    assert np.array_equal(data, expected)
    data = expected.copy()
    data[33] = 0b10_00_01_10      # elements 128+1, 160+1, 192+1, 224+1 = +1, 0, -1, +1
    back, d = unpack_tq2_0(data, (1, 256))
    assert back[0, [129, 161, 193, 225]].tolist() == [1, 0, -1, 1] and d.tolist() == [[0.5]]


@given(ternary(k_multiple=256, max_n=3, max_k=2), st.floats(2.0 ** -20, 100, width=32))
def test_tq1_0_bit_identical_to_gguf_py_and_round_trips(codes, scale):
    data = pack_tq1_0(codes, scale)
    assert data.shape == (codes.size // 256 * 54,)
    weights = codes.astype(np.float32) * np.float32(scale)
    assert np.array_equal(data, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.TQ1_0).reshape(-1))
    back, d = unpack_tq1_0(data, codes.shape)
    assert np.array_equal(back, codes)
    deq = gguf.quants.dequantize(data.reshape(codes.shape[0], -1), gguf.GGMLQuantizationType.TQ1_0)
    assert np.array_equal(deq, back * np.repeat(d, 256, axis=1))


def test_tq1_0_every_trit_group_round_trips_and_worked_example():
    # All 3**5 digit groups in every qs byte and all 3**4 groups in every qh byte, one block each.
    digits5 = np.array(np.unravel_index(np.arange(243), (3,) * 5)).T      # [243, 5], first digit most significant
    for g in range(243):
        codes = np.zeros((1, 256), np.int8)
        for n in range(5):
            codes[0, g % 32 + 32 * n] = digits5[g, n] - 1                    # qs[g % 32] holds elements m + 32n
            codes[0, 160 + g % 16 + 16 * n] = digits5[g, n] - 1             # qs[32 + g % 16]: 160 + m + 16n
        for n in range(4):
            codes[0, 240 + g % 4 + 4 * n] = digits5[g % 81, n + 1] - 1       # qh[g % 4]: 240 + j + 4n
        assert np.array_equal(unpack_tq1_0(pack_tq1_0(codes, 1.0), (1, 256))[0], codes)
    codes = np.zeros((1, 256), np.int8)
    codes[0, [0, 32, 64, 96, 128]] = [1, 0, -1, 0, 1]                      # digits 2,1,0,1,2 -> q = 194
    assert pack_tq1_0(codes, 1.0)[0] == 205                                 # ceil(194 * 256 / 243)


# ----------------------------------------------------------------------------- round trips, all layouts

@given(ternary(n_multiple=4, k_multiple=256, max_n=2, max_k=1), st.floats(2.0 ** -20, 100, width=32))
def test_every_layout_round_trips(codes, scale):
    decoded = [unpack_hf(pack_hf(codes)), unpack_kernel(pack_kernel(codes)),
               unpack_i2s(pack_i2s(codes, scale), codes.shape)[0],
               unpack_tq2_0(pack_tq2_0(codes, scale), codes.shape)[0],
               unpack_tq1_0(pack_tq1_0(codes, scale), codes.shape)[0]]
    for back in decoded:
        assert back.dtype == np.int8 and back.flags.c_contiguous and np.array_equal(back, codes)


# ----------------------------------------------------------------------------- bad input

GOOD = np.zeros((4, 256), np.int8)


@pytest.mark.parametrize("pack", [pack_hf, pack_kernel, lambda c: pack_i2s(c, 1.0),
                                  lambda c: pack_tq2_0(c, 1.0), lambda c: pack_tq1_0(c, 1.0)])
def test_pack_rejects_bad_codes(pack):
    with pytest.raises(RefBitNetTypeError, match="codes: expected dtype int8 ternary codes, found float32"):
        pack(GOOD.astype(np.float32))
    with pytest.raises(RefBitNetTypeError, match="codes: expected a numpy int8 array, found list"):
        pack(GOOD.tolist())
    with pytest.raises(RefBitNetError, match=r"codes: expected a 2-D \[N, K\] array of ternary codes, found shape \(2, 4, 128\)"):
        pack(GOOD.reshape(2, 4, 128))
    bad = GOOD.copy()
    bad[3, 7] = 2
    with pytest.raises(RefBitNetError, match=r"codes: expected values in \{-1, 0, 1\}, found 2 at index \(3, 7\)"):
        pack(bad)
    bad[3, 7] = -128
    with pytest.raises(RefBitNetError, match="found -128"):
        pack(bad)


@pytest.mark.parametrize("pack, shape, message", [
    (pack_hf, (6, 8), r"HF release layout: expected N \(rows\) divisible by 4, found shape \(6, 8\)"),
    (pack_kernel, (4, 6), r"kernel layout: expected K \(columns\) divisible by 4, found shape \(4, 6\)"),
    (lambda c: pack_i2s(c, 1.0), (4, 192), r"I2_S layout: expected K \(columns\) divisible by 128, found shape \(4, 192\)"),
    (lambda c: pack_tq2_0(c, 1.0), (4, 128), r"TQ2_0 layout: expected K \(columns\) divisible by 256, found shape \(4, 128\)"),
    (lambda c: pack_tq1_0(c, 1.0), (1, 320), r"TQ1_0 layout: expected K \(columns\) divisible by 256, found shape \(1, 320\)"),
    (pack_hf, (0, 8), r"codes: expected a non-empty \[N, K\] array, found shape \(0, 8\)"),
])
def test_pack_rejects_sizes_the_layout_cannot_hold(pack, shape, message):
    with pytest.raises(RefBitNetError, match="codes: " + message if not message.startswith("codes") else message):
        pack(np.zeros(shape, np.int8))


@pytest.mark.parametrize("pack", [pack_i2s, pack_tq2_0, pack_tq1_0])
def test_pack_rejects_bad_scales(pack):
    for scale in (np.nan, np.inf, -1.0):
        with pytest.raises(RefBitNetError, match="scale: expected a finite scale >= 0, found"):
            pack(GOOD, scale)
    with pytest.raises(RefBitNetTypeError, match="scale: expected one real number"):
        pack(GOOD, [1.0, 2.0])
    if pack is not pack_i2s:
        with pytest.raises(RefBitNetError, match=r"scale: expected a scale representable in fp16 \(<= 65504.0\), found 70000.0"):
            pack(GOOD, 70000.0)


def test_unpack_rejects_bad_bytes_and_shapes():
    for unpack in (unpack_hf, unpack_kernel):
        with pytest.raises(RefBitNetError, match=r"packed: expected 2-bit codes in \{0, 1, 2\}, found byte 0x1b .*at index \(1, 2\)"):
            bad = np.zeros((2, 4), np.uint8)
            bad[1, 2] = 0b00_01_10_11
            unpack(bad)
        with pytest.raises(RefBitNetTypeError, match="packed: expected dtype uint8, found int8"):
            unpack(np.zeros((2, 4), np.int8))
        with pytest.raises(RefBitNetError, match=r"packed: expected a 2-D uint8 array, found shape \(8,\)"):
            unpack(np.zeros(8, np.uint8))
    i2s = pack_i2s(GOOD, 1.0)
    with pytest.raises(RefBitNetError, match=re.escape("data: expected 288 bytes of I2_S data for shape (4, 256), found 287")):
        unpack_i2s(i2s[:-1], (4, 256))
    with pytest.raises(RefBitNetError, match="shape: I2_S layout: expected K divisible by 128, found"):
        unpack_i2s(i2s, (8, 64))
    bad = i2s.copy()
    bad[0] = 0xC0                                                           # field 3 in the top bits
    with pytest.raises(RefBitNetError, match="data: expected 2-bit codes in .* found byte 0xc0"):
        unpack_i2s(bad, (4, 256))
    tq2 = pack_tq2_0(GOOD, 1.0)
    with pytest.raises(RefBitNetError, match=re.escape("data: expected 264 bytes of TQ2_0 data for shape (4, 256), found 265")):
        unpack_tq2_0(np.concatenate([tq2, [0]]).astype(np.uint8), (4, 256))
    with pytest.raises(RefBitNetError, match="data: expected 2-bit codes"):
        bad = tq2.copy()
        bad[3] = 0xFF
        unpack_tq2_0(bad, (4, 256))
    tq1 = pack_tq1_0(GOOD, 1.0)
    with pytest.raises(RefBitNetError, match=re.escape("data: expected 108 bytes of TQ1_0 data for shape (2, 256), found 216")):
        unpack_tq1_0(tq1, (2, 256))
    with pytest.raises(RefBitNetError, match=r"shape: expected two positive ints \(N, K\), found \(0, 256\)"):
        unpack_tq1_0(tq1, (0, 256))
    with pytest.raises(RefBitNetTypeError, match=r"shape: expected a pair of ints \(N, K\), found 256"):
        unpack_tq1_0(tq1, 256)
    with pytest.raises(RefBitNetTypeError, match="data: expected dtype uint8, found float32"):
        unpack_tq1_0(tq1.astype(np.float32), (4, 256))
