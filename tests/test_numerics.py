"""Each numerics option of refbitnet.quant.Numerics against the implementation its docstring names.

Bit for bit against the real code where it runs here: transformers' ActQuant, WeightQuant and legacy
BitLinear.activation_quant (eager, TORCHDYNAMO_DISABLE=1) in float32 and bf16, onebitllms'
quantize_to_1bit weight rule (its own function, loaded from the installed package's file because the
package's __init__ imports triton, which has no CPU build here). onebitllms' Triton kernels need a
CUDA GPU: they are checked against a torch transcription of their lines (tl.floor(x * scale + 0.5),
127.0 / row_absmax as an IEEE division), which examples/case_study_onebitllms.py runs against the
kernels themselves on a GPU.
"""

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
torch = pytest.importorskip("torch")

from refbitnet.bitlinear import bitlinear_fake_quant, bitlinear_int  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402
from refbitnet.quant import (NUMERICS, Numerics, absmax_int8, absmean_scale, absmean_ternary,  # noqa: E402
                             bf16_values, fake_quantize_activations, fake_quantize_weights, round_codes,
                             ternary_codes)

bitnet = pytest.importorskip("transformers.integrations.bitnet")


def activations(seed, rows=48, k=512):
    """Rows of very different magnitudes, one all-zero row, one row with an outlier channel."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.01, 100, (rows, 1))).astype(np.float32)
    x[0] = 0
    x[1, 7] = 1000 * np.abs(x[1]).max()
    return x


def ties_row(k=256):
    """A row whose max is 127, so s = 1 exactly and x * s = x: every .5 below is an exact tie."""
    x = np.arange(k, dtype=np.float32) % 64 - 31.5                       # -31.5 ... 31.5
    x[0] = 127
    return x[None, :]


# ============================================================== act_scale
def test_act_scale_torch_is_torchs_127_over_m_and_ieee_is_one_division():
    m = np.arange(1, 200001, dtype=np.float32) * np.float32(0.0137)     # many absmax values
    x = np.zeros((m.size, 2), np.float32)
    x[:, 0] = m
    t = torch.from_numpy(x)
    torch_s = (127 / t.abs().amax(dim=-1).clamp(min=1e-5)).numpy()        # torch's expression
    ieee_s = torch.div(torch.full((m.size,), 127.0), t.abs().amax(dim=-1)).numpy()  # one IEEE division
    assert np.array_equal(absmax_int8(x)[1], torch_s)
    assert np.array_equal(absmax_int8(x, "torch")[1], torch_s)
    assert np.array_equal(absmax_int8(x, Numerics(act_scale="ieee"))[1], ieee_s)
    assert np.array_equal(ieee_s, (np.float64(127) / m.astype(np.float64)).astype(np.float32))
    differ = np.flatnonzero(torch_s != ieee_s)
    assert differ.size > 1000                                             # the choice matters
    assert np.all(np.abs(torch_s[differ].view(np.int32) - ieee_s[differ].view(np.int32)) == 1)   # by 1 ulp
    one = np.array([[1835.0, 0.0]], np.float32)                          # the docstring's example
    assert absmax_int8(one)[1][0] != absmax_int8(one, "ieee")[1][0]


# ============================================================== transformers, float32 and bf16
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_actquant_float32_is_the_default(seed):
    x = activations(seed)
    assert np.array_equal(bitnet.ActQuant.apply(torch.from_numpy(x)).numpy(), fake_quantize_activations(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_actquant_bf16_is_transformers_bf16(seed):
    xb = torch.from_numpy(activations(seed)).to(torch.bfloat16)
    theirs = bitnet.ActQuant.apply(xb).float().numpy()
    ours = fake_quantize_activations(xb.float().numpy(), "transformers-bf16")
    assert np.array_equal(theirs, ours)
    # the float32 x is rounded to bf16 first, as the layer receives it
    assert np.array_equal(fake_quantize_activations(activations(seed), "transformers-bf16"), ours)
    # and bf16 is not float32: most values differ
    assert (fake_quantize_activations(xb.float().numpy()) != ours).mean() > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_bitlinear_activation_quant_in_bf16(seed):
    """transformers' legacy BitLinear quantizes the bf16 tensor itself: reciprocal, scale and x * s each
    rounded to bf16. Codes and the (bf16) scale agree bit for bit, the all-zero row included."""
    xb = torch.from_numpy(activations(seed)).to(torch.bfloat16)
    layer = bitnet.BitLinear(512, 64, False, dtype=torch.bfloat16)
    q, scale = layer.activation_quant(xb)
    xq, s = absmax_int8(xb.float().numpy(), "transformers-legacy-bf16")
    assert np.array_equal(q.numpy(), xq)
    assert np.array_equal(scale.float().numpy()[:, 0], s)
    assert not np.array_equal(absmax_int8(xb.float().numpy())[0], xq)  # float32 arithmetic differs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weightquant_is_reciprocal_rounding(seed):
    """WeightQuant: codes = round(w * fl(1/gamma)), returned as codes / fl(1/gamma) in the weight's dtype.
    gamma is torch's float32 mean, whose summation order differs from NumPy's (see test below), so
    the rule is checked with torch's gamma, then the whole function on these tensors."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((256, 512)) * 0.05).astype(np.float32)
    for dtype, preset in ((torch.float32, Numerics(weight_round="reciprocal")),
                          (torch.bfloat16, "transformers-bf16")):
        wt = torch.from_numpy(w).to(dtype)
        theirs = bitnet.WeightQuant.apply(wt).float().numpy()
        wf = wt.float().numpy()
        gamma_t = np.float32(wt.float().abs().mean().clamp(min=1e-5).item())
        codes = ternary_codes(wf, gamma_t, preset)
        ours = codes.astype(np.float32) / (np.float32(1) / gamma_t)
        ours = bf16_values(ours) if dtype == torch.bfloat16 else ours
        assert np.array_equal(theirs, ours)
        assert np.array_equal(theirs, fake_quantize_weights(wf, preset)[0])


def reciprocal_flip():
    """A weight and gamma for which round(w / gamma) != round(w * fl(1/gamma)): w at the 0.5*gamma
    threshold, found by search (deterministic)."""
    rng = np.random.default_rng(5)
    g = rng.uniform(0.01, 1, 20000).astype(np.float32)
    w = (g * np.float32(0.5)).astype(np.float32)
    for step in range(-3, 4):
        ws = np.nextafter(w, np.float32(np.inf) if step > 0 else np.float32(-np.inf)) if step else w
        for _ in range(abs(step) - 1):
            ws = np.nextafter(ws, np.float32(np.inf) if step > 0 else np.float32(-np.inf))
        a = np.rint(ws / g)
        b = np.rint(ws * (np.float32(1) / g).astype(np.float32))
        hit = np.flatnonzero(a != b)
        if hit.size:
            return ws[hit[0]], g[hit[0]]
    raise AssertionError("no flip found")


def test_divide_and_reciprocal_differ_only_at_the_threshold():
    w, g = reciprocal_flip()
    wt = torch.tensor([[w]])
    div = ternary_codes(np.array([w]), g)
    rec = ternary_codes(np.array([w]), g, Numerics(weight_round="reciprocal"))
    assert div[0] != rec[0]
    assert int(torch.round(wt / torch.tensor(g)).item()) == div[0]            # torch, dividing
    assert int(torch.round(wt * (1.0 / torch.tensor(g))).item()) == rec[0]  # torch, WeightQuant's order
    assert abs(w / g - 0.5) < 1e-6


def test_gamma_numpy_vs_torch_mean_is_within_the_stated_ulps():
    """docs/SPEC.md §3.1: numpy's pairwise float32 mean vs torch's float32 mean of |W|, at the 2B4T
    projection shapes and smaller ones; the page states 0-3 ulp as measured by examples/oracle_gamma_ulps.py."""
    worst = 0
    for seed, shape in enumerate([(640, 2560), (2560, 2560), (6912, 2560), (2560, 6912), (64, 512), (3, 7)]):
        rng = np.random.default_rng(seed)
        for scale in (0.01, 1.0):
            w = (rng.standard_normal(shape) * scale).astype(np.float32)
            ours = absmean_scale(w)
            theirs = np.float32(torch.from_numpy(w).abs().mean().item())
            worst = max(worst, abs(int(ours.view(np.int32)) - int(theirs.view(np.int32))))
    assert worst <= 3


# ============================================================== onebitllms
def load_onebitllms_quantization_utils():
    spec = importlib.util.find_spec("onebitllms")
    if spec is None:
        pytest.skip("onebitllms is not installed (pip install onebitllms)")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "quantization_utils.py")
    module_spec = importlib.util.spec_from_file_location("onebitllms_quantization_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)                              # imports torch and transformers only
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_onebitllms_quantize_to_1bit_weight_rule(seed):
    """onebitllms' own _weight_quant (what quantize_to_1bit writes) on bf16 weights, as it loads them."""
    utils = load_onebitllms_quantization_utils()
    rng = np.random.default_rng(seed)
    wb = torch.from_numpy((rng.standard_normal((256, 512)) * 0.03).astype(np.float32)).to(torch.bfloat16)
    codes_t, scale_t = utils._weight_quant(wb.clone())
    wf = wb.float().numpy()
    gamma = absmean_scale(wf, "onebitllms-checkpoint")
    assert gamma == np.float32(wb.abs().mean().float().item())           # bf16 mean, the same bf16
    assert np.float32(scale_t.float().item()) == bf16_values(np.float32(1) / gamma)  # what the file stores
    codes = ternary_codes(wf, gamma, "onebitllms-checkpoint")
    assert np.array_equal(codes_t.float().numpy().astype(np.int8), codes)
    assert np.array_equal(absmean_ternary(wf, "onebitllms-checkpoint")[0], codes)


def onebitllms_activation_kernel_in_torch(x):
    """finalize_and_quant_kernel of onebitllms/kernels/activation_quant.py, line by line in torch float32."""
    row_absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    scale = torch.full_like(row_absmax, 127.0) / row_absmax              # 127.0 / row_absmax
    rounded = torch.floor(x * scale + 0.5)                               # tl.floor(scaled_x + 0.5)
    return torch.clamp(rounded, -128, 127) / scale


def onebitllms_weight_kernel_in_torch(w, mean_abs):
    """weight_quant_kernel: scale = 1.0 / mean_abs (a Python float, so float64 then float32 in the kernel)."""
    scale = torch.tensor(1.0 / float(mean_abs), dtype=torch.float32)
    return torch.clamp(torch.floor(w * scale + 0.5), -1, 1) / scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_onebitllms_activation_rule(seed):
    x = np.concatenate([activations(seed), ties_row(512)])
    theirs = onebitllms_activation_kernel_in_torch(torch.from_numpy(x)).numpy()
    ours = fake_quantize_activations(x, "onebitllms")
    assert np.array_equal(theirs, ours)
    xq_even, _ = absmax_int8(ties_row(512))
    xq_up, _ = absmax_int8(ties_row(512), "onebitllms")
    assert (xq_up != xq_even).sum() > 0
    assert np.all(xq_up - xq_even >= 0) and np.all(xq_up - xq_even <= 1)   # ties go up, never down


def test_half_up_rounds_like_floor_x_plus_half_in_float32():
    q = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.49999997, 126.5], np.float32)
    assert round_codes(q, "half_up").tolist() == torch.floor(torch.from_numpy(q) + 0.5).tolist()
    assert round_codes(q, "half_up").tolist() == [-2, -1, 0, 1, 2, 3, 1, 0, 127]   # 0.49999997 goes up too
    assert round_codes(q, "even").tolist() == [-2, -2, -0, 0, 2, 2, 0, -0, 126]


def test_onebitllms_weight_rule():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((128, 256)) * 0.02).astype(np.float32)
    gamma = absmean_scale(w)
    w[0, :8] = gamma * np.float32(0.5)                                   # at the threshold: up, not even
    w[1, :8] = -gamma * np.float32(0.5)
    inv = np.float32(1.0 / float(gamma))
    theirs = onebitllms_weight_kernel_in_torch(torch.from_numpy(w), gamma).numpy()
    codes = ternary_codes(w, gamma, "onebitllms")
    assert np.array_equal(theirs, codes.astype(np.float32) / inv)
    assert np.all(codes[0, :8] == 1) and np.all(codes[1, :8] == 0)          # +0.5 up, -0.5 up to 0
    assert np.all(ternary_codes(w, gamma)[0, :8] == 0)                    # ties to even: 0


# ============================================================== BitLinear with numerics
def test_bitnet_gpu_uses_a_bf16_scale_and_a_float32_epilogue_rounded_to_bf16():
    """microsoft/BitNet gpu/, transcribed in torch: quant_input compiled keeps 127 / m and x * s in float32
    but returns s as bf16, and the decode kernel computes bf16(float32(acc) / s_bf16 * ws) from that
    bf16 s (its quant_input was run compiled on the CPU: s equal to bf16 of the float32 s in 64 of 64
    rows, codes equal rint(x * bf16(s)) on all 163,840; examples/case_study_bitnet_gpu.py --compiled)."""
    rng = np.random.default_rng(4)
    x = bf16_values(rng.standard_normal((5, 256)).astype(np.float32))     # the model's activations are bf16
    codes, gamma = absmean_ternary(rng.standard_normal((64, 256)).astype(np.float32))
    out = bitlinear_int(x, codes, gamma, "bitnet-gpu")
    xt = torch.from_numpy(x)
    s_t = (127 / xt.abs().amax(-1, keepdim=True).clamp(min=1e-5)).to(torch.bfloat16)   # float32 chain, bf16 s
    xq_t = (xt * s_t.float()).round().clamp(-128, 127)
    acc_t = xq_t @ torch.from_numpy(codes.astype(np.float32)).T                       # exact integers
    y_t = (acc_t / s_t.float() * float(gamma)).to(torch.bfloat16)
    assert np.array_equal(out.s, s_t.float().numpy()[:, 0])
    assert np.array_equal(out.xq, xq_t.numpy().astype(np.int8))
    assert np.array_equal(out.acc, acc_t.numpy().astype(np.int32))
    assert np.array_equal(out.y, y_t.float().numpy())
    base = bitlinear_int(x, codes, gamma)                                   # refbitnet's float32 s differs
    assert not np.array_equal(out.s, base.s)


def test_autobitlinear_bf16_within_one_bf16_ulp():
    """AutoBitLinear (offline) in a bf16 model vs bitlinear_fake_quant(..., "transformers-bf16"): its
    ActQuant equals ours bit for bit (above); the bf16 matmul accumulates in float32 in torch's order,
    so y agrees to one bf16 ulp, with most elements equal."""
    rng = np.random.default_rng(6)
    k, n = 512, 128
    x = (rng.standard_normal((8, k)) * 3).astype(np.float32)
    codes, gamma = absmean_ternary(rng.standard_normal((n, k)).astype(np.float32))
    gamma = bf16_values(gamma)
    layer = bitnet.AutoBitLinear(k, n, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(codes.astype(np.float32)).to(torch.bfloat16))
        layer.weight_scale.fill_(float(gamma))
        theirs = layer(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    ours = bitlinear_fake_quant(x, codes, gamma, "transformers-bf16")
    ulp = np.abs(theirs.view(np.int32) - ours.view(np.int32))
    assert ulp.max() <= 1 and (ulp == 0).mean() > 0.9
    assert not np.array_equal(ours, bitlinear_fake_quant(x, codes, gamma))   # bf16 is not float32


# ============================================================== the dataclass
def test_numerics_values_and_presets():
    assert NUMERICS["torch"] == Numerics() and Numerics().is_default
    with pytest.raises(RefBitNetError, match="ties: expected one of"):
        Numerics(ties="half_away")
    with pytest.raises(RefBitNetError, match="numerics: expected a Numerics"):
        absmax_int8(np.ones((1, 4), np.float32), "bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        NUMERICS["torch"].ties = "half_up"
    x = activations(3)
    for name, num in NUMERICS.items():                                   # presets by name or value agree
        assert np.array_equal(absmax_int8(x, name)[0], absmax_int8(x, num)[0]), name


def test_general_path_equals_default_path():
    """The default numerics take a short path kept bit-identical to refbitnet's model; the general path
    with the same choices (forced by a Numerics equal in value but not is_default) gives the same bits."""
    class Same(Numerics):
        @property
        def is_default(self):
            return False
    x = np.concatenate([activations(8), ties_row(512)])
    same = Same()
    assert np.array_equal(absmax_int8(x, same)[0], absmax_int8(x)[0])
    assert np.array_equal(absmax_int8(x, same)[1], absmax_int8(x)[1])
    w = x[:, :256] * np.float32(0.01)
    assert np.array_equal(ternary_codes(w, absmean_scale(w), same), ternary_codes(w, absmean_scale(w)))
