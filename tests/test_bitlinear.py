"""BitLinear in NumPy against torch: exact integer form, and transformers' AutoBitLinear within a derived bound.

Numerics:
- "int": acc = xq @ codes.T (int32) must equal a torch int64 matmul exactly; y = (f32(acc) / s) * ws
  must equal the same float32 epilogue evaluated by torch, bit for bit.
- "fake-quant": transformers' AutoBitLinear (offline, float32 model, weights loaded through
  unpack_weights as the packed checkpoint is, output * weight_scale) runs a float32 matmul on
  dequantized activations; it agrees with bitlinear_fake_quant and bitlinear_int within the bounds
  derived in ``fake_quant_bound`` / ``int_bound``.
"""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from refbitnet.bf16 import round_to_bf16
from refbitnet.bitlinear import (FLOAT32_EXACT_MAX_K, BitLinearOutput, bitlinear_epilogue, bitlinear_fake_quant,
                                 bitlinear_int, ternary_matmul_exact)
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.layouts import pack_hf
from refbitnet.quant import absmax_int8, dequantize_int8
from test_quant import float_inputs
from transformers.integrations.bitnet import AutoBitLinear, unpack_weights

U = 2.0 ** -24


@st.composite
def layer_case(draw, max_n=8):
    """(x [..., K], codes [N, K], weight_scale: float32 scalar or per-row [N])."""
    x = draw(float_inputs(max_last=48, huge_max=1e35))                      # |y| <= 48 * 16 * 1e35: no float32 overflow
    k = x.shape[-1]
    n = 4 * draw(st.integers(1, max_n // 4)) if draw(st.booleans()) else draw(st.integers(1, max_n))
    codes = draw(arrays(np.int8, (n, k), elements=st.integers(-1, 1)))
    if draw(st.booleans()):
        ws = np.float32(draw(st.floats(2.0 ** -20, 16, width=32)))
    else:
        ws = draw(arrays(np.float32, (n,), elements=st.floats(0, 16, width=32)))
    return x, codes, ws


def torch_epilogue(acc, s, ws):
    return ((torch.from_numpy(acc).float() / torch.from_numpy(np.asarray(s, np.float32))[..., None])
            * torch.from_numpy(np.asarray(ws, np.float32))).numpy()


@given(layer_case())
def test_int_form_bit_identical_to_torch_integer_matmul_and_epilogue(case):
    x, codes, ws = case
    out = bitlinear_int(x, codes, ws)
    assert isinstance(out, BitLinearOutput)
    xq, s = absmax_int8(x)
    assert np.array_equal(out.xq, xq) and np.array_equal(out.s, s)
    acc_t = torch.from_numpy(xq).to(torch.int64) @ torch.from_numpy(codes).to(torch.int64).T
    assert out.acc.dtype == np.int32 and out.acc.shape == x.shape[:-1] + (codes.shape[0],)
    assert np.array_equal(out.acc.astype(np.int64), acc_t.numpy())
    assert out.y.dtype == np.float32
    assert np.array_equal(out.y.view(np.uint32), torch_epilogue(out.acc, out.s, ws).view(np.uint32))
    assert np.array_equal(bitlinear_epilogue(out.acc, out.s, ws).view(np.uint32), out.y.view(np.uint32))


def test_float32_matmul_is_exact_up_to_its_k_bound_and_fallback_beyond():
    # Worst case |partial sum| = 128 * K: at K = 131072 that is 2**24, the last integer float32
    # holds with all smaller ones; one more column goes to the exact int64 path.
    for k in (FLOAT32_EXACT_MAX_K, FLOAT32_EXACT_MAX_K + 1):
        xq = np.full((1, k), -128, np.int8)
        codes = np.full((2, k), -1, np.int8)
        codes[1, ::2] = 1                                                   # alternating signs: exact cancellation
        acc = ternary_matmul_exact(xq, codes)
        assert acc.tolist() == [[128 * k, -128 * ((k + 1) // 2 - k // 2)]]


def fake_quant_bound(xdq, codes, ws, y_a, y_b):
    """|y_a - y_b| bound for two float32 evaluations of fl(fl(sum_k xdq_k w_nk) * ws) with different
    summation orders. Terms xdq_k * w_nk are exact (w in {-1,0,1}). Any order of float32 sums of K
    terms has |z' - z| <= gamma_{K-1} A, A = sum_k |xdq_k w_nk| (Higham §4.2), so the two sums are
    within 2 gamma_{K-1} A; each product with ws rounds once (relative u, and |z ws| <= |y| / (1 - u)).
    """
    k = codes.shape[1]
    gamma_k = (k - 1) * U / (1 - (k - 1) * U)
    a = np.abs(xdq.astype(np.float64)) @ np.abs(codes.T.astype(np.float64))     # [..., N]
    ws64 = np.asarray(ws, np.float64)
    return ws64 * 2 * gamma_k * a + U * (np.abs(y_a) + np.abs(y_b)) / (1 - U)


def int_bound(xq, s, codes, ws, y_t, y_i):
    """|y_t - y_i| bound, y_t = AutoBitLinear (float32 sum of xdq_k w_nk, then * ws) and
    y_i = fl(fl(acc / s) * ws) with acc exact. xdq_k = fl(xq_k / s) = (xq_k / s)(1 + d_k), |d_k| <= u,
    so the exact sum of xdq_k w_nk is within u B of acc / s, B = sum |xq_k w_nk| / s; the float32 sum adds
    gamma_{K-1} A (A <= B (1 + u)); fl(acc / s) adds u |acc / s|; the products with ws one rounding each.
    """
    k = codes.shape[1]
    gamma_k = (k - 1) * U / (1 - (k - 1) * U)
    s64 = np.asarray(s, np.float64)[..., None]
    b = (np.abs(xq.astype(np.float64)) @ np.abs(codes.T.astype(np.float64))) / s64   # [..., N]
    acc = (xq.astype(np.float64) @ codes.T.astype(np.float64)) / s64
    ws64 = np.asarray(ws, np.float64)
    return ws64 * (gamma_k * b * (1 + U) + U * b + U * np.abs(acc)) + U * (np.abs(y_t) + np.abs(y_i)) / (1 - U)


# The bounds are evaluated in float64; its own rounding (relative ~1e-15) is covered by this factor.
F64_SLACK = 1 + 1e-9


@given(layer_case())
def test_transformers_autobitlinear_offline_agrees_within_derived_bounds(case):
    x, codes, ws = case
    ws = np.float32(round_to_bf16(np.atleast_1d(ws).astype(np.float32))[0])    # a bf16 [1] weight_scale, as released
    x = x.astype(np.float32)                                                # a float32 model's activations
    n, k = codes.shape
    layer = AutoBitLinear(k, n, bias=False, dtype=torch.float32, online_quant=False)
    if n % 4 == 0:                                                          # load through the packed release format
        weight = unpack_weights(torch.from_numpy(pack_hf(codes)), dtype=torch.float32)
    else:
        weight = torch.from_numpy(codes.astype(np.float32))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight_scale.copy_(torch.tensor([ws]))
        y_t = layer(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    y_f = bitlinear_fake_quant(x, codes, ws)
    out = bitlinear_int(x, codes, ws)
    xdq = dequantize_int8(out.xq, out.s)
    assert y_t.dtype == y_f.dtype == out.y.dtype == np.float32
    d_f = np.abs(y_t.astype(np.float64) - y_f)
    d_i = np.abs(y_t.astype(np.float64) - out.y)
    assert (d_f <= fake_quant_bound(xdq, codes, ws, y_t, y_f) * F64_SLACK).all()
    assert (d_i <= int_bound(out.xq, out.s, codes, ws, y_t, out.y) * F64_SLACK).all()


@given(layer_case())
def test_transformers_autobitlinear_in_a_bf16_model_agrees_within_derived_bound(case):
    # The release's torch_dtype is bfloat16: AutoBitLinear then rounds xq / s to bf16, runs a bf16
    # matmul (accumulation precision is torch's choice: we only assume every addition rounds with
    # relative error <= u_b = 2**-9, true for float32 or bf16 accumulators), rounds the output to bf16
    # and multiplies by the bf16 weight_scale (one more bf16 rounding). With eta = (1 + u)(1 + u_b) - 1
    # for xdq = bf16(fl(xq / s)) and B = sum |xq_k w_nk| / s:
    #   |y_t - ws acc / s| <= ws (eta + gamma^b_{K-1} (1 + eta)) B + u_b |y_t| / (1 - u_b)**2 + u_b |y_t| / (1 - u_b)
    #   |y_i - ws acc / s| <= ((1 + u)**2 - 1) ws |acc| / s          (refbitnet's float32 epilogue)
    ub = 2.0 ** -9
    x, codes, ws = case
    ws = np.float32(round_to_bf16(np.atleast_1d(ws).astype(np.float32))[0])
    x = round_to_bf16(x.astype(np.float32))                                # a bf16 model's activations, widened exactly
    n, k = codes.shape
    layer = AutoBitLinear(k, n, bias=False, dtype=torch.bfloat16, online_quant=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(codes.astype(np.float32)).to(torch.bfloat16))
        layer.weight_scale.copy_(torch.tensor([ws]).to(torch.bfloat16))
        y_t = layer(torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)).float().numpy().astype(np.float64)
    out = bitlinear_int(x, codes, ws)
    s64 = np.asarray(out.s, np.float64)[..., None]
    b = (np.abs(out.xq.astype(np.float64)) @ np.abs(codes.T.astype(np.float64))) / s64
    exact = ws * (out.xq.astype(np.float64) @ codes.T.astype(np.float64)) / s64
    eta = (1 + U) * (1 + ub) - 1
    gamma_b = (k - 1) * ub / (1 - (k - 1) * ub)
    bound = (ws * (eta + gamma_b * (1 + eta)) * b + ub * np.abs(y_t) / (1 - ub) ** 2 + ub * np.abs(y_t) / (1 - ub)
             + ((1 + U) ** 2 - 1) * np.abs(exact))
    assert (np.abs(y_t - out.y) <= bound * F64_SLACK).all()


def test_autobitlinear_agreement_at_a_real_projection_size():
    # One full-width case (K = 2560, N = 640) from realistic activations, same bounds.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2560)).astype(np.float32)
    codes = rng.integers(-1, 2, (640, 2560)).astype(np.int8)
    ws = np.float32(round_to_bf16(np.array([0.0213], np.float32))[0])
    layer = AutoBitLinear(2560, 640, bias=False, dtype=torch.float32, online_quant=False)
    with torch.no_grad():
        layer.weight.copy_(unpack_weights(torch.from_numpy(pack_hf(codes)), dtype=torch.float32))
        layer.weight_scale.copy_(torch.tensor([ws]))
        y_t = layer(torch.from_numpy(x)).numpy()
    out = bitlinear_int(x, codes, ws)
    d = np.abs(y_t.astype(np.float64) - out.y)
    bound = int_bound(out.xq, out.s, codes, ws, y_t, out.y) * F64_SLACK
    assert (d <= bound).all()
    assert np.max(np.abs(out.y)) > 1                                        # not a vacuous all-zero output


# ----------------------------------------------------------------------------- shapes and bad input

def test_shapes_one_dimensional_and_batched():
    codes = np.array([[1, -1, 0, 1], [0, 0, 0, 0]], np.int8)
    out = bitlinear_int(np.array([1.0, 2.0, -3.0, 0.5], np.float32), codes, 0.5)
    assert out.y.shape == (2,) and out.acc.shape == (2,) and out.s.shape == ()
    assert out.xq.tolist() == [42, 85, -127, 21] and out.acc.tolist() == [42 - 85 + 21, 0]
    assert bitlinear_int(np.zeros((2, 3, 4), np.float32), codes, [0.5]).y.shape == (2, 3, 2)
    assert bitlinear_fake_quant(np.ones((5, 4)), codes, np.float32(1)).shape == (5, 2)


def test_rejects_bad_input():
    x = np.ones((2, 4), np.float32)
    codes = np.zeros((3, 4), np.int8)
    with pytest.raises(RefBitNetError, match=r"codes: expected K = 4 columns to match x's last axis, found shape \(3, 5\)"):
        bitlinear_int(x, np.zeros((3, 5), np.int8), 1.0)
    with pytest.raises(RefBitNetTypeError, match="codes: expected dtype int8 ternary codes, found float32"):
        bitlinear_fake_quant(x, codes.astype(np.float32), 1.0)
    with pytest.raises(RefBitNetError, match=r"codes: expected values in \{-1, 0, 1\}, found 3"):
        bitlinear_int(x, np.full((3, 4), 3, np.int8), 1.0)
    with pytest.raises(RefBitNetError, match=r"codes: expected a 2-D \[N, K\] array"):
        bitlinear_int(x, np.zeros(4, np.int8), 1.0)
    with pytest.raises(RefBitNetTypeError, match="x: expected a numpy float array"):
        bitlinear_int([1.0, 2.0, 3.0, 4.0], codes, 1.0)
    with pytest.raises(RefBitNetTypeError, match="x: expected a float16/float32/float64 array, found dtype int64"):
        bitlinear_int(np.ones((2, 4), np.int64), codes, 1.0)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(RefBitNetError, match=r"x: expected finite values, found nan at index \(1, 1\)"):
        bitlinear_fake_quant(bad, codes, 1.0)
    for ws, message in [(np.nan, "weight_scale: expected finite values >= 0"), (-1.0, "weight_scale: expected finite values >= 0"),
                        (np.ones(2, np.float32), r"weight_scale: expected a scalar, shape \(1,\) or shape \(3,\), found shape \(2,\)"),
                        (np.ones(1, np.uint16), "bf16 bits"), ("0.5", "weight_scale: expected a real scalar")]:
        with pytest.raises(RefBitNetError, match=message):
            bitlinear_int(x, codes, ws)
    acc = np.zeros((2, 3), np.int32)
    with pytest.raises(RefBitNetTypeError, match="acc: expected an int32 array"):
        bitlinear_epilogue(acc.astype(np.int64), np.ones(2, np.float32), 1.0)
    with pytest.raises(RefBitNetTypeError, match="s: expected float32 activation scales, found dtype float64"):
        bitlinear_epilogue(acc, np.ones(2), 1.0)
    with pytest.raises(RefBitNetError, match=re.escape("s: expected shape (2,) (one scale per row of acc), found (3,)")):
        bitlinear_epilogue(acc, np.ones(3, np.float32), 1.0)
    with pytest.raises(RefBitNetError, match="s: expected finite positive scales"):
        bitlinear_epilogue(acc, np.zeros(2, np.float32), 1.0)
    with pytest.raises(RefBitNetTypeError, match="xq: expected an int8 array"):
        ternary_matmul_exact(np.ones((2, 4), np.int16), codes)
