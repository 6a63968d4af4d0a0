"""Case study: transformers' BitNet layers, float32 and bf16, checked with refbitnet's oracle and its numerics.

    python examples/case_study_transformers.py                               # the transformers installed here
    python examples/case_study_transformers.py --transformers ~/src/transformers/src   # your checkout

--transformers is the folder that holds the ``transformers`` package (a checkout's ``src`` or a
site-packages folder); without it the installed one is used. torch must be installed. The script runs
transformers' own classes from ``transformers.integrations.bitnet`` eagerly (TORCHDYNAMO_DISABLE=1:
they are wrapped in torch.compile, which may keep bf16 intermediates in float32).

What it checks, with refbitnet.quant.NUMERICS naming the numerics each class computes:

1. ``ActQuant`` (AutoBitLinear's activation fake-quant) in float32 and bf16 against
   ``fake_quantize_activations`` with "torch" and "transformers-bf16", on activations with exact .5 ties,
   an outlier channel and an all-zero row: bit for bit;
2. ``WeightQuant`` (online weights) against ``ternary_codes(..., weight_round="reciprocal")`` given torch's
   gamma: bit for bit; then with refbitnet's own gamma (NumPy's summation order): how many codes and
   scales differ, and whether the code differences are benign boundary flips;
3. the legacy ``BitLinear.activation_quant`` (a checkpoint without linear_class) in a bf16 model against
   "transformers-legacy-bf16": codes and scales bit for bit; the legacy layer DIVIDES by its stored
   weight_scale, checked as refbitnet's multiply by the reciprocal;
4. ``AutoBitLinear`` (offline, the release's class) in bf16 for 2B4T's projection shapes against
   ``reference_bitlinear(..., numerics="transformers-bf16", form="fake-quant")``: the distance in bf16 ulps
   (torch's bf16 matmul accumulates in its own order, so bits are not promised).

Exit status: 0 when every bit-for-bit check holds and the bf16 layers agree within their stated bounds
(AutoBitLinear 1 bf16 ulp; the legacy layer 2, and bit for bit against its own bf16 epilogue computed from
refbitnet's integers), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from refbitnet.quant import (NUMERICS, Numerics, absmean_scale, bf16_values,  # noqa: E402
                             fake_quantize_activations, ternary_codes)
from refbitnet.testing import (compare_int8_codes, compare_tensor, compare_ternary_codes,  # noqa: E402
                               quantize_activations, quantize_weights, reference_bitlinear)
from refbitnet.testing.dump import hard_activations  # noqa: E402

SHAPES = {"q/o_proj": (2560, 2560), "k/v_proj": (640, 2560), "gate/up_proj": (6912, 2560),
          "down_proj": (2560, 6912)}

#: --small: the same four roles at a tenth of the size (K a multiple of 256), for a quick run and the tests.
SMALL_SHAPES = {"q/o_proj": (256, 512), "k/v_proj": (64, 512), "gate/up_proj": (768, 512), "down_proj": (256, 768)}


def load(path):
    if path is not None:
        if not os.path.isfile(os.path.join(path, "transformers", "integrations", "bitnet.py")):
            print(f"error: --transformers {path}: expected the folder holding transformers/integrations/bitnet.py",
                  file=sys.stderr)
            sys.exit(2)
        sys.path.insert(0, os.path.abspath(path))
    try:
        import torch
        transformers = importlib.import_module("transformers")
        bitnet = importlib.import_module("transformers.integrations.bitnet")
    except ImportError as e:
        print(f"error: {e}; install torch and transformers or pass --transformers", file=sys.stderr)
        sys.exit(2)
    return torch, transformers, bitnet


def line(label, ok, text):
    print(f"  {'OK  ' if ok else 'DIFF'} {label}: {text}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transformers", default=None, help="folder holding the transformers package")
    p.add_argument("--small", action="store_true", help="shapes a tenth of 2B4T's (a quick run)")
    args = p.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else SHAPES
    torch, transformers, bitnet = load(args.transformers)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"transformers {transformers.__version__} from {os.path.dirname(transformers.__file__)}, "
          f"torch {torch.__version__}")
    ok = True
    x = np.concatenate([hard_activations(6, 2560, seed=s) for s in range(4)])          # [24, 2560]

    print("\n1. ActQuant (AutoBitLinear's activations), 24 tokens x 2560 with ties, outliers, zero rows")
    theirs = bitnet.ActQuant.apply(torch.from_numpy(x)).numpy()
    c = compare_tensor("ActQuant f32", fake_quantize_activations(x), theirs, mode="exact")
    ok &= line("float32 vs numerics 'torch'", c.ok, f"{c.n_differ} of {c.n_total} differ")
    xb = torch.from_numpy(x).to(torch.bfloat16)
    theirs = bitnet.ActQuant.apply(xb)
    c = compare_tensor("ActQuant bf16", fake_quantize_activations(xb.float().numpy(), "transformers-bf16"), theirs,
                       mode="exact")
    ok &= line("bf16 vs numerics 'transformers-bf16'", c.ok, f"{c.n_differ} of {c.n_total} differ")
    c32 = compare_tensor("ActQuant bf16 vs f32 rules", fake_quantize_activations(xb.float().numpy()), theirs,
                         mode="exact")
    print(f"       (refbitnet's float32 numerics on the same bf16 input: {c32.n_differ} of {c32.n_total} values "
          f"differ: ActQuant returns xq / s rounded to bf16)")

    print("\n2. WeightQuant (online weights) for 2B4T's shapes")
    rng = np.random.default_rng(0)
    for name, (n, k) in shapes.items():
        w = torch.from_numpy((rng.standard_normal((n, k)) * 0.02).astype(np.float32)).to(torch.bfloat16)
        wf = w.float().numpy()
        wq = bitnet.WeightQuant.apply(w).float().numpy()
        gamma_t = np.float32(w.float().abs().mean().clamp(min=1e-5).item())
        inv = np.float32(1) / gamma_t
        codes = ternary_codes(wf, gamma_t, "transformers-bf16")
        same = np.array_equal(wq, bf16_values(codes.astype(np.float32) / inv))
        ok &= line(f"{name:13s} rule w * fl(1/gamma) with torch's gamma", same,
                   "bit for bit" if same else "differs")
        gamma_np = absmean_scale(wf)
        ulps = abs(int(gamma_np.view(np.int32)) - int(gamma_t.view(np.int32)))
        their_codes = np.rint(wq * inv).astype(np.int8)
        check = compare_ternary_codes(name, wf, their_codes, numerics=Numerics(weight_round="reciprocal"))
        div = compare_ternary_codes(name, wf, their_codes, gamma=gamma_t)
        print(f"       gamma NumPy vs torch: {ulps} ulp apart; codes with refbitnet's gamma: "
              f"{check.detail or 'equal'}; dividing instead (refbitnet's default): {div.detail or 'equal'}")

    print("\n3. legacy BitLinear (no linear_class) in a bf16 model")
    layer = bitnet.BitLinear(2560, 640, False, dtype=torch.bfloat16)
    q, scale = layer.activation_quant(xb)
    xq, s = quantize_activations(xb, "transformers-legacy-bf16")
    c1 = compare_tensor("xq", xq, q, mode="exact")
    c2 = compare_tensor("s", s, scale[:, 0], mode="exact")
    ok &= line("activation_quant vs 'transformers-legacy-bf16'", c1.ok and c2.ok,
               f"codes {c1.n_differ} of {c1.n_total} differ, scales {c2.n_differ} of {c2.n_total}")
    f32 = compare_int8_codes("xq", xb, q)
    print(f"       (refbitnet's float32 rules on the same input: {f32.detail})")
    codes, gamma = quantize_weights(rng.standard_normal((640, 2560)).astype(np.float32))
    stored = np.float32(bf16_values(np.float32(1) / gamma))                # a divide-convention file's scale
    from transformers.integrations.bitnet import pack_weights
    with torch.no_grad():
        layer.weight.copy_(pack_weights(torch.from_numpy(codes.astype(np.int64)).clone()))
        layer.weight_scale.fill_(float(stored))
        y_t = layer(xb)
    ref = reference_bitlinear(xb, codes, weight_scale=np.float32(1) / stored,
                              numerics="transformers-legacy-bf16")
    # their epilogue, from refbitnet's integers: F.linear in bf16 rounds acc to bf16, then
    # y / (weight_scale * s) with the product and the quotient each rounded to bf16
    acc_b = bf16_values(ref.acc.astype(np.float32))
    y_legacy = bf16_values(acc_b / bf16_values(stored * ref.s[:, None]))
    c = compare_tensor("y", y_legacy, y_t, mode="exact")
    ok &= line("forward vs bf16(bf16(acc) / bf16(weight_scale * s)) from refbitnet's acc, s", c.ok,
               f"{c.n_differ} of {c.n_total} differ")
    c = compare_tensor("y", ref.y, y_t, mode="ulp", dtype="bfloat16", ulps=2)
    ok &= line("forward vs refbitnet's float32 epilogue with 1 / weight_scale, rounded to bf16", c.ok,
               f"max {c.max_ulp} bf16 ulp (bound 2: three bf16 roundings against one), "
               f"{c.n_differ} of {c.n_total} not bit-equal")

    print("\n4. AutoBitLinear (offline, the release's class) in bf16, 8 tokens")
    for name, (n, k) in shapes.items():
        xk = hard_activations(8, k, seed=n)
        codes, gamma = quantize_weights(rng.standard_normal((n, k)).astype(np.float32))
        gamma = bf16_values(gamma)
        lin = bitnet.AutoBitLinear(k, n, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(codes.astype(np.float32)).to(torch.bfloat16))
            lin.weight_scale.fill_(float(gamma))
            y_t = lin(torch.from_numpy(xk).to(torch.bfloat16))
        ref = reference_bitlinear(xk, codes, weight_scale=gamma, numerics="transformers-bf16",
                                  form="fake-quant")
        c = compare_tensor(name, ref.y, y_t, mode="ulp", dtype="bfloat16", ulps=1)
        ok &= line(f"{name:13s} [{n}, {k}]", c.ok, f"max {c.max_ulp} bf16 ulp, {c.n_differ} of {c.n_total} "
                                                    f"not bit-equal (bound 1 ulp: torch's accumulation order)")
    print()
    for name in ("transformers-bf16", "transformers-legacy-bf16"):
        print(f"preset {name}: {NUMERICS[name]}")
    print("verdict: " + ("transformers' BitNet quantizers are refbitnet's numerics presets bit for bit; the bf16 "
                         "layers agree within their bounds" if ok else "DIFFERENCES FOUND (see DIFF lines)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
