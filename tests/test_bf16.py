"""bf16 <-> float32 conversion, bit-identical to torch.

Numerics: pure bit manipulation; every comparison is exact on the bit patterns (NaN: only "is NaN",
because torch's choice of NaN bits depends on its code path).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays, array_shapes

from refbitnet.bf16 import bf16_to_f32, f32_to_bf16, round_to_bf16
from refbitnet.errors import RefBitNetTypeError


def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_every_bf16_pattern_widens_like_torch_and_round_trips():
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)            # all 65536 patterns
    ours = bf16_to_f32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))
    assert np.array_equal(f32_to_bf16(ours)[~nan], bits[~nan])               # widening then narrowing is the identity
    assert np.isnan(bf16_to_f32(f32_to_bf16(ours[nan]))).all()


# float32 bit patterns: uniform ones, plus ones whose low 16 bits sit exactly at or next to the
# rounding tie 0x8000, plus the edges (max finite, inf, subnormals, zeros of both signs).
_edge_bits = st.sampled_from([0x00000000, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                              0x00000001, 0x807FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000, 0x00008000])
_tie_bits = st.tuples(st.integers(0, 2 ** 16 - 1), st.sampled_from([0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF])).map(
    lambda t: (t[0] << 16) | t[1])
_f32_bits = st.one_of(st.integers(0, 2 ** 32 - 1), _tie_bits, _edge_bits)


@given(arrays(np.uint32, array_shapes(min_dims=1, max_dims=3, max_side=16), elements=_f32_bits))
def test_f32_to_bf16_matches_torch_round_to_nearest_even(bits):
    x = bits.view(np.float32)
    ours = f32_to_bf16(x)
    theirs = torch_bf16_bits(x)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_to_f32(ours[nan])).all()
    assert ours.shape == x.shape


@given(arrays(np.float64, array_shapes(min_dims=1, max_dims=2, max_side=16),
              elements=st.floats(-3e38, 3e38, allow_nan=False)))
def test_float64_input_rounds_like_torch(x):
    # torch rounds double -> float -> bfloat16 (two roundings); so do we.
    assert np.array_equal(f32_to_bf16(x), torch_bf16_bits(x))


def test_round_to_bf16_on_noncontiguous_and_fortran_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10)).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(round_to_bf16(np.asfortranarray(x)), expected)
    assert np.array_equal(round_to_bf16(x[:, ::2]), expected[:, ::2])


def test_bf16_to_f32_rejects_wrong_dtype():
    with pytest.raises(RefBitNetTypeError, match="u16: expected uint16 .* found dtype float32"):
        bf16_to_f32(np.zeros(3, np.float32))
    with pytest.raises(TypeError):                                          # RefBitNetTypeError is a TypeError
        bf16_to_f32(np.zeros(3, np.int16))
