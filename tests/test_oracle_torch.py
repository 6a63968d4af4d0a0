"""Every oracle function that takes arrays takes torch tensors too (bf16, int8, requiring grad, views),
and refbitnet.testing never imports torch unless it is given a tensor."""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
torch = pytest.importorskip("torch")

from refbitnet import testing as oracle  # noqa: E402
from refbitnet.errors import RefBitNetError, RefBitNetTypeError  # noqa: E402
from refbitnet.quant import Numerics  # noqa: E402

from test_oracle import CONFIG, IDS, files, latent_weights, reference  # noqa: E402,F401


def test_numpy_users_do_not_import_torch():
    code = ("import sys, numpy as np\n"
            "from refbitnet import testing as o\n"
            "c, g = o.quantize_weights(np.random.default_rng(0).standard_normal((16, 32)).astype('f4'))\n"
            "out = o.reference_bitlinear(np.ones((2, 32), 'f4'), o.encode(c, 'bitnet_gpu'), 'bitnet_gpu',"
            " weight_scale=g)\n"
            "assert o.compare_tensor('y', out.y, out.y, mode='exact').ok\n"
            "assert o.compare_int8_codes('xq', np.ones((2, 32), 'f4'), out.xq).ok\n"
            "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 256)) * 0.1).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    return w, x


def test_quantizers_take_tensors(layer):
    w, x = layer
    wt = torch.from_numpy(w).requires_grad_(True)                        # a parameter in training
    codes, gamma = oracle.quantize_weights(wt)
    assert np.array_equal(codes, oracle.quantize_weights(w)[0]) and gamma == oracle.quantize_weights(w)[1]
    xb = torch.from_numpy(x).to(torch.bfloat16)
    xq, s = oracle.quantize_activations(xb)
    xq_np, s_np = oracle.quantize_activations(xb.float().numpy())
    assert np.array_equal(xq, xq_np) and np.array_equal(s, s_np)
    assert np.array_equal(oracle.quantize_activations(xb, "transformers-bf16")[1],
                          oracle.quantize_activations(xb.float().numpy(), "transformers-bf16")[1])


def test_layouts_take_tensors(layer):
    w, _ = layer
    codes, gamma = oracle.quantize_weights(w)
    ct = torch.from_numpy(codes)
    for layout in oracle.LAYOUTS:
        data = oracle.encode(ct, layout, scale=torch.tensor(float(gamma)))
        assert np.array_equal(data, oracle.encode(codes, layout, scale=gamma)), layout
        back, _ = oracle.decode(torch.from_numpy(np.ascontiguousarray(data)), layout, shape=codes.shape)
        assert np.array_equal(back, codes), layout
    assert np.array_equal(oracle.pack_bitnet_gpu(ct), oracle.pack_bitnet_gpu(codes))
    packed = torch.from_numpy(oracle.pack_bitnet_gpu(codes))
    assert np.array_equal(oracle.unpack_bitnet_gpu(packed), codes)
    assert np.array_equal(oracle.unpack_bitnet_gpu(packed[:16]), codes[:16])     # a view


def test_reference_bitlinear_takes_tensors(layer):
    w, x = layer
    codes, gamma = oracle.quantize_weights(w)
    packed = torch.from_numpy(oracle.encode(codes, "hf"))
    base = oracle.reference_bitlinear(x, codes, weight_scale=gamma)
    out = oracle.reference_bitlinear(torch.from_numpy(x), packed, "hf", weight_scale=torch.tensor([float(gamma)]))
    for part in ("y", "acc", "xq", "s"):
        assert np.array_equal(getattr(out, part), getattr(base, part)), part
    xb = torch.from_numpy(x).to(torch.bfloat16)
    wsb = torch.tensor([float(gamma)], dtype=torch.bfloat16)
    out_b = oracle.reference_bitlinear(xb, packed, "hf", weight_scale=wsb, numerics="bitnet-gpu")
    assert out_b.y.dtype == np.float32 and np.array_equal(out_b.y, out_b.y.astype(np.float32))
    fq = oracle.reference_bitlinear(xb, packed, "hf", weight_scale=wsb, numerics="transformers-bf16",
                                    form="fake-quant")
    # the same bf16 inputs through the integer form with a float32 scale (bitnet-gpu's scale is bf16, so
    # its codes may differ from transformers' at a boundary)
    out_b32 = oracle.reference_bitlinear(xb, packed, "hf", weight_scale=wsb, numerics=Numerics(dtype="bfloat16"))
    assert np.array_equal(fq.acc, out_b32.acc)


def test_compare_takes_bf16_tensors():
    """The crash the issue reports: a bf16 tensor into compare_tensor."""
    r = torch.linspace(-3, 3, 64)
    c = r.to(torch.bfloat16)
    check = oracle.compare_tensor("y", r, c)                             # format taken from the bf16 side
    assert check.ok and "bfloat16" not in check.detail
    ulp = oracle.compare_tensor("y", r.to(torch.bfloat16), c, mode="ulp")
    assert ulp.ok and ulp.max_ulp == 0
    off = c.clone()
    off[5] = torch.nextafter(off[5:6].float(), torch.tensor([10.0])).to(torch.bfloat16)[0] + 0.02
    bad = oracle.compare_tensor("y", c, off, mode="ulp")
    assert not bad.ok and bad.max_ulp >= 1 and "(bfloat16)" in bad.detail
    report = oracle.compare_activations({"logits": r.numpy()}, {"logits": c}, print_fn=None)
    assert report.checks[0].n_total == 64


def test_codes_comparisons_take_tensors(layer):
    w, x = layer
    xq, _ = oracle.quantize_activations(x)
    assert oracle.compare_int8_codes("xq", torch.from_numpy(x), torch.from_numpy(xq)).ok
    codes, _ = oracle.quantize_weights(w)
    assert oracle.compare_ternary_codes("w", torch.from_numpy(w), torch.from_numpy(codes)).ok


def test_reference_activations_take_tensor_ids(files, reference):        # noqa: F811
    model = oracle.load_reference_model(files["i2_s"])
    trace = oracle.reference_activations(model, torch.from_numpy(IDS))
    assert all(np.array_equal(trace[n], reference[n]) for n in reference)
    candidate = {n: torch.from_numpy(v) for n, v in reference.items()}
    assert oracle.compare_activations(reference, candidate, print_fn=None, mode="exact").ok


def test_unreadable_tensors_are_clear_errors():
    with pytest.raises(RefBitNetError, match="meta device"):
        oracle.quantize_activations(torch.empty((2, 8), device="meta"))
    with pytest.raises(RefBitNetTypeError, match="expected a real float or integer tensor"):
        oracle.compare_tensor("z", np.ones(2), torch.ones(2, dtype=torch.complex64))
    with pytest.raises(RefBitNetTypeError):
        oracle.quantize_activations(torch.ones((2, 8), dtype=torch.int8))


def test_every_public_function_takes_tensors(layer, files, reference):      # noqa: F811
    """One call per public function of refbitnet.testing with torch tensors for every array argument;
    a new public function must be added here."""
    w, x = layer
    T = torch.from_numpy
    codes, gamma = oracle.quantize_weights(w)
    c, g = T(codes), torch.tensor(float(gamma))
    model = oracle.load_reference_model(files["i2_s"])
    xq, _ = oracle.quantize_activations(x)
    calls = {
        "encode": lambda: oracle.encode(c, "kernel"),
        "decode": lambda: oracle.decode(T(oracle.encode(codes, "hf")), "hf"),
        "reference_bitlinear": lambda: oracle.reference_bitlinear(T(x), c, weight_scale=g),
        "quantize_weights": lambda: oracle.quantize_weights(T(w)),
        "quantize_activations": lambda: oracle.quantize_activations(T(x)),
        "load_reference_model": lambda: model,
        "reference_activations": lambda: oracle.reference_activations(model, T(IDS)),
        "trace_names": lambda: oracle.trace_names(2),
        "compare_tensor": lambda: oracle.compare_tensor("x", T(x), T(x).to(torch.bfloat16)),
        "compare_int8_codes": lambda: oracle.compare_int8_codes("xq", T(x), T(xq)),
        "compare_ternary_codes": lambda: oracle.compare_ternary_codes("w", T(w), c, gamma=g),
        "ulp_distance": lambda: oracle.ulp_distance(T(x), T(x)),
        "compare_activations": lambda: oracle.compare_activations(reference, {"logits": T(reference["logits"])},
                                                                  print_fn=None),
        "assert_activations_match": lambda: oracle.assert_activations_match(
            reference, {"logits": T(reference["logits"])}, print_fn=None),
        "as_array": lambda: oracle.as_array(T(x)),
        "pack_bitnet_gpu": lambda: oracle.pack_bitnet_gpu(c),
        "unpack_bitnet_gpu": lambda: oracle.unpack_bitnet_gpu(T(oracle.pack_bitnet_gpu(codes))),
    }
    for layout in ("hf", "kernel", "i2s", "tq2_0", "tq1_0"):
        pack, unpack = getattr(oracle, f"pack_{layout}"), getattr(oracle, f"unpack_{layout}")
        if layout in ("hf", "kernel"):
            calls[f"pack_{layout}"] = lambda pack=pack: pack(c)
            calls[f"unpack_{layout}"] = lambda pack=pack, unpack=unpack: unpack(T(pack(codes)))
        else:
            calls[f"pack_{layout}"] = lambda pack=pack: pack(c, g)
            calls[f"unpack_{layout}"] = lambda pack=pack, unpack=unpack: unpack(T(pack(codes, gamma)), T(
                np.array(codes.shape)).tolist())
    public = {n for n in oracle.__all__ if callable(getattr(oracle, n)) and not isinstance(getattr(oracle, n), type)}
    assert public == set(calls), public ^ set(calls)
    for name, call in calls.items():
        call()
