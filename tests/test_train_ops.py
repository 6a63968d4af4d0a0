"""Every hand-written backward in refbitnet.train.ops against torch autograd (float64), and the
smooth ops also against central finite differences.

Numerics: float64 throughout. The quantizers are written in torch in the STE form
``x + (q(x) - x).detach()`` (tests/torch_twin_train.py), so the forward values agree to float64
rounding and the gradients to a few ulps of their magnitude: the bound below, 1e-12 relative to the
largest gradient entry, leaves room for different summation orders in the matmuls (~1e-15 each).
Finite differences (step 1e-6, central) are accurate to ~1e-8 relative for these smooth functions.
"""

import numpy as np
import pytest
import torch

from refbitnet import quant
from refbitnet.train import ops
from refbitnet.model import rope_tables

import torch_twin_train as twin

REL = 1e-12


def report(name, ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = float(np.abs(ours - ref).max()) if ours.size else 0.0
    scale = max(float(np.abs(ref).max()), 1e-300)
    print(f"{name:28s} maxdiff {err:.3e}  (max |ref| {scale:.3e})")
    return err / scale


def check(name, ours, ref, rel=REL):
    assert np.asarray(ours).shape == tuple(ref.shape), (name, np.asarray(ours).shape, tuple(ref.shape))
    assert report(name, ours, ref.detach().numpy() if torch.is_tensor(ref) else ref) <= rel, name


def leaf(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def numeric_grad(f, x, dout, h=1e-6):
    """d sum(f(x) * dout) / dx by central differences."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f(x) * dout)
        x[i] = old - h
        minus = np.sum(f(x) * dout)
        x[i] = old
        g[i] = (plus - minus) / (2 * h)
    return g


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- quantizers ------------------------------------------------------------------------------------

def test_float32_fake_quant_is_refbitnet_quant(rng):
    w = rng.standard_normal((48, 64)).astype(np.float32)
    w_q, codes, gamma = ops.absmean_fake_quant(w)
    ref_codes, ref_gamma = quant.absmean_ternary(w)
    assert np.array_equal(codes, ref_codes) and gamma == ref_gamma
    assert np.array_equal(w_q, ref_codes.astype(np.float32) * ref_gamma)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    xq, s = quant.absmax_int8(x)
    assert np.array_equal(ops.absmax_fake_quant(x), xq.astype(np.float32) / s[..., None])


def test_float64_fake_quant_matches_float32_grid(rng):
    """The float64 path (gradient checks) lands on the same codes as the release quantizer."""
    w = rng.standard_normal((64, 64))
    _, codes64, gamma64 = ops.absmean_fake_quant(w)
    codes32, gamma32 = quant.absmean_ternary(w.astype(np.float32))
    assert np.array_equal(codes64, codes32)
    assert abs(gamma64 - gamma32) <= 1e-6 * gamma32
    x = rng.standard_normal((7, 64))
    xq32, s32 = quant.absmax_int8(x.astype(np.float32))
    np.testing.assert_allclose(ops.absmax_fake_quant(x), xq32 / s32[:, None].astype(np.float64), rtol=1e-6)


# -- per-op gradients vs torch autograd ------------------------------------------------------------

def test_embedding(rng):
    table, ids = rng.standard_normal((11, 8)), rng.integers(0, 11, (2, 9))
    out, cache = ops.embedding_forward(ids, table)
    dout = rng.standard_normal(out.shape)
    t = leaf(table)
    ref = t[torch.tensor(ids)]
    ref.backward(torch.tensor(dout))
    check("embedding out", out, ref)
    check("embedding dtable", ops.embedding_backward(dout, cache), t.grad)


def test_rms_norm(rng):
    x, w = rng.standard_normal((2, 5, 16)), rng.standard_normal(16)
    out, cache = ops.rms_norm_forward(x, w, 1e-5)
    dout = rng.standard_normal(out.shape)
    tx, tw = leaf(x), leaf(w)
    ref = twin.rms_norm(tx, tw, 1e-5)
    ref.backward(torch.tensor(dout))
    dx, dw = ops.rms_norm_backward(dout, cache)
    check("rms_norm out", out, ref)
    check("rms_norm dx", dx, tx.grad)
    check("rms_norm dw", dw, tw.grad)
    check("rms_norm dx (finite diff)", dx, numeric_grad(lambda a: ops.rms_norm_forward(a, w, 1e-5)[0], x, dout), 1e-7)
    check("rms_norm dw (finite diff)", dw, numeric_grad(lambda a: ops.rms_norm_forward(x, a, 1e-5)[0], w, dout), 1e-7)


@pytest.mark.parametrize("quantize", [True, False])
def test_bitlinear_ste(rng, quantize):
    x, w = rng.standard_normal((2, 6, 32)), rng.standard_normal((24, 32)) * 0.1
    out, cache = ops.bitlinear_forward(x, w, quantize)
    dout = rng.standard_normal(out.shape)
    tx, tw = leaf(x), leaf(w)
    ref = twin.bitlinear(tx, tw, quantize)
    ref.backward(torch.tensor(dout))
    dx, dw = ops.bitlinear_backward(dout, cache)
    check(f"bitlinear(q={quantize}) out", out, ref)
    check(f"bitlinear(q={quantize}) dx", dx, tx.grad)
    check(f"bitlinear(q={quantize}) dw", dw, tw.grad)
    if not quantize:
        check("linear dx (finite diff)", dx, numeric_grad(lambda a: ops.bitlinear_forward(a, w, False)[0], x, dout), 1e-7)
        check("linear dw (finite diff)", dw, numeric_grad(lambda a: ops.bitlinear_forward(x, a, False)[0], w, dout), 1e-7)


def test_bitlinear_ste_is_identity_through_quantizers(rng):
    """STE written out: the weight gradient uses the quantized activations, the input gradient the
    quantized weights, and nothing of the rounding or scales."""
    x, w = rng.standard_normal((4, 32)), rng.standard_normal((8, 32))
    _, cache = ops.bitlinear_forward(x, w, True)
    dout = rng.standard_normal((4, 8))
    dx, dw = ops.bitlinear_backward(dout, cache)
    w_q, _, _ = ops.absmean_fake_quant(w)
    np.testing.assert_array_equal(dx, dout @ w_q)
    np.testing.assert_array_equal(dw, dout.T @ ops.absmax_fake_quant(x))


def test_rope(rng):
    x = rng.standard_normal((2, 7, 3, 16))
    cos, sin = (t.astype(np.float64) for t in rope_tables(np.arange(7), 16, 10000.0))
    out, cache = ops.rope_forward(x, cos, sin)
    dout = rng.standard_normal(out.shape)
    tx = leaf(x)
    tcos, tsin = twin.rope_tables(7, 16, 10000.0, torch.float64)
    ref = twin.rope(tx, tcos, tsin)
    ref.backward(torch.tensor(dout))
    dx = ops.rope_backward(dout, cache)
    check("rope out", out, ref)
    check("rope dx", dx, tx.grad)
    check("rope dx (finite diff)", dx, numeric_grad(lambda a: ops.rope_forward(a, cos, sin)[0], x, dout), 1e-7)


def test_rope_pairs_i_with_i_plus_half():
    """Half-split layout: a unit vector in slot 0 rotates into slot HD/2, not slot 1."""
    x = np.zeros((1, 2, 1, 8))
    x[..., 0] = 1.0
    cos, sin = (t.astype(np.float64) for t in rope_tables(np.arange(2), 8, 10000.0))
    out, _ = ops.rope_forward(x, cos, sin)
    assert np.allclose(out[0, 1, 0], [np.cos(1), 0, 0, 0, np.sin(1), 0, 0, 0])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_attention_gqa_causal(rng, heads, kv_heads):
    q = rng.standard_normal((2, 6, heads, 8))
    k, v = rng.standard_normal((2, 6, kv_heads, 8)), rng.standard_normal((2, 6, kv_heads, 8))
    out, cache = ops.attention_forward(q, k, v)
    dout = rng.standard_normal(out.shape)
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    ref = twin.attention(tq, tk, tv)
    ref.backward(torch.tensor(dout))
    dq, dk, dv = ops.attention_backward(dout, cache)
    check("attention out", out, ref)
    check("attention dq", dq, tq.grad)
    check("attention dk", dk, tk.grad)
    check("attention dv", dv, tv.grad)
    check("attention dk (finite diff)", dk, numeric_grad(lambda a: ops.attention_forward(q, a, v)[0], k, dout), 1e-7)
    check("attention dq (finite diff)", dq, numeric_grad(lambda a: ops.attention_forward(a, k, v)[0], q, dout), 1e-7)


def test_attention_is_causal(rng):
    q, k, v = (rng.standard_normal((1, 5, 2, 4)) for _ in range(3))
    out, _ = ops.attention_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:], v2[:, 3:] = 9.0, -9.0                     # change the future of position 2
    out2, _ = ops.attention_forward(q, k2, v2)
    np.testing.assert_array_equal(out[:, :3], out2[:, :3])


def test_relu2_gate(rng):
    gate, up = rng.standard_normal((3, 4, 12)), rng.standard_normal((3, 4, 12))
    out, cache = ops.relu2_gate_forward(gate, up)
    dout = rng.standard_normal(out.shape)
    tg, tu = leaf(gate), leaf(up)
    ref = torch.relu(tg) ** 2 * tu
    ref.backward(torch.tensor(dout))
    dg, du = ops.relu2_gate_backward(dout, cache)
    check("relu2*up out", out, ref)
    check("relu2*up dgate", dg, tg.grad)
    check("relu2*up dup", du, tu.grad)
    check("relu2*up dgate (finite diff)", dg, numeric_grad(lambda a: ops.relu2_gate_forward(a, up)[0], gate, dout), 1e-7)


def test_residual(rng):
    h, d = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    out, cache = ops.residual_forward(h, d)
    dout = rng.standard_normal(out.shape)
    dh, dd = ops.residual_backward(dout, cache)
    assert np.array_equal(out, h + d) and np.array_equal(dh, dout) and np.array_equal(dd, dout)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lm_head_and_cross_entropy(rng, reduction):
    x, table = rng.standard_normal((2, 5, 16)), rng.standard_normal((23, 16))
    targets = rng.integers(0, 23, (10,))
    targets[[1, 7]] = -1                                            # not counted (SFT prompt tokens)
    logits, c_head = ops.lm_head_forward(x, table)
    loss, c_ce = ops.cross_entropy_forward(logits.reshape(10, 23), targets, reduction)
    dlogits = ops.cross_entropy_backward(1.0, c_ce)
    dx, dtable = ops.lm_head_backward(dlogits.reshape(2, 5, 23), c_head)
    tx, tt = leaf(x), leaf(table)
    ref = torch.nn.functional.cross_entropy((tx @ tt.T).reshape(10, 23), torch.tensor(targets),
                                            ignore_index=-1, reduction=reduction)
    ref.backward()
    check(f"cross_entropy({reduction}) loss", np.array(loss), ref)
    check(f"lm_head dx ({reduction})", dx, tx.grad)
    check(f"lm_head dtable ({reduction})", dtable, tt.grad)

    def loss_of(a):
        return ops.cross_entropy_forward(ops.lm_head_forward(a, table)[0].reshape(10, 23), targets, reduction)[0]
    check("lm_head+ce dx (finite diff)", dx, numeric_grad(loss_of, x, 1.0), 1e-7)


def test_cross_entropy_sum_is_mean_times_count(rng):
    logits, targets = rng.standard_normal((6, 9)), np.array([1, 2, -1, 3, 4, -1])
    mean, _ = ops.cross_entropy_forward(logits, targets, "mean")
    total, _ = ops.cross_entropy_forward(logits, targets, "sum")
    assert np.isclose(total, 4 * mean, rtol=1e-14)
