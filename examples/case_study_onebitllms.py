"""Case study: onebitllms (tiiuae's BitNet training kit) checked with refbitnet's oracle and its numerics.

    python examples/case_study_onebitllms.py --onebitllms /path/to/site-packages/onebitllms
    python examples/case_study_onebitllms.py --onebitllms ~/src/onebitllms/src/onebitllms   # a checkout

--onebitllms is the folder of the ``onebitllms`` package (the one holding ``kernels/`` and ``utils/``).
Its modules are loaded from their files there (the package's ``__init__`` imports triton, which only
installs where CUDA does); nothing is copied from it and nothing is built.

What it checks, with refbitnet.quant.NUMERICS naming the numerics each piece computes:

1. ``utils/quantization_utils.py: _weight_quant``, what ``quantize_to_1bit`` writes into a checkpoint, on
   bf16 weights of 2B4T's shapes, against ``ternary_codes(..., "onebitllms-checkpoint")`` (bf16 torch:
   w * bf16(1 / bf16(mean|w|)), ties to even): codes and the stored scale bit for bit. The stored scale
   is 1 / mean|w| and the config it writes has no ``linear_class``: a DIVIDE-convention checkpoint.
2. on a CUDA GPU with triton: the training kernels ``activation_quant_triton`` and
   ``weight_quant_triton`` against the "onebitllms" numerics (floor(x * s + 0.5), 127.0 / absmax,
   w * (1 / mean|w|)) bit for bit, and against refbitnet's own (ties to even): the codes that differ,
   classified, on activations with exact .5 ties. Without a GPU the same lines, transcribed in torch,
   are run instead and labelled so.

Exit status: 0 when every check against the named numerics holds, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from refbitnet.quant import (absmax_int8, absmean_scale, bf16_values, fake_quantize_activations,  # noqa: E402
                             ternary_codes)
from refbitnet.testing import compare_int8_codes, compare_tensor, compare_ternary_codes  # noqa: E402
from refbitnet.testing.dump import hard_activations  # noqa: E402

SHAPES = {"q/o_proj": (2560, 2560), "k/v_proj": (640, 2560), "gate/up_proj": (6912, 2560),
          "down_proj": (2560, 6912)}

#: --small: the same four roles at a tenth of the size (K a multiple of 256), for a quick run and the tests.
SMALL_SHAPES = {"q/o_proj": (256, 512), "k/v_proj": (64, 512), "gate/up_proj": (768, 512), "down_proj": (256, 768)}


def load_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def line(label, ok, text):
    print(f"  {'OK  ' if ok else 'DIFF'} {label}: {text}")
    return ok


def torch_activation_kernel(torch, x):
    """finalize_and_quant_kernel's lines in torch float32 (the stand-in where no GPU is)."""
    m = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    scale = torch.full_like(m, 127.0) / m
    return (torch.clamp(torch.floor(x.float() * scale + 0.5), -128, 127) / scale).to(x.dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--onebitllms", required=True, help="folder of the onebitllms package (kernels/, utils/)")
    p.add_argument("--small", action="store_true", help="shapes a tenth of 2B4T's (a quick run)")
    args = p.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else SHAPES
    root = os.path.abspath(args.onebitllms)
    utils_path = os.path.join(root, "utils", "quantization_utils.py")
    if not os.path.isfile(utils_path):
        print(f"error: --onebitllms {root}: expected the package folder holding utils/quantization_utils.py",
              file=sys.stderr)
        return 2
    import torch
    version = "unknown"
    dist_info = [d for d in os.listdir(os.path.dirname(root)) if d.startswith("onebitllms-") and
                 d.endswith(".dist-info")]
    if dist_info:
        version = dist_info[0][len("onebitllms-"):-len(".dist-info")]
    gpu = torch.cuda.is_available()
    print(f"onebitllms {version} from {root}; torch {torch.__version__}; "
          f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'no CUDA GPU'}")
    ok = True

    print("\n1. quantize_to_1bit's _weight_quant (bf16 torch) vs numerics 'onebitllms-checkpoint'")
    utils = load_file(utils_path, "onebitllms_quantization_utils")
    rng = np.random.default_rng(0)
    for name, (n, k) in shapes.items():
        wb = torch.from_numpy((rng.standard_normal((n, k)) * 0.02).astype(np.float32)).to(torch.bfloat16)
        codes_t, scale_t = utils._weight_quant(wb.clone())
        wf = wb.float().numpy()
        gamma = absmean_scale(wf, "onebitllms-checkpoint")
        ours = ternary_codes(wf, gamma, "onebitllms-checkpoint")
        c = compare_tensor(name, ours, codes_t.float().numpy().astype(np.int8), mode="exact")
        stored = np.float32(scale_t.float().item())
        same_scale = stored == bf16_values(np.float32(1) / gamma)
        ok &= line(f"{name:13s} codes", c.ok, f"{c.n_differ} of {c.n_total} differ; "
                                              f"stored scale {float(stored)!r} "
                                              f"{'=' if same_scale else '!='} bf16(1 / {float(gamma)!r})")
        ok &= same_scale
        dflt = compare_ternary_codes(name, wf, codes_t.float().numpy().astype(np.int8), within=2.0 ** -8)
        print(f"       vs refbitnet's float32 absmean (within 2**-8 of the threshold, as the bf16 mean is "
              f"up to 2**-9 from float32's): {dflt.detail or 'equal'}")
    print("       -> the checkpoint stores 1 / mean|w| and no linear_class: multiply by it and the outputs are "
          "wrong by a factor mean|w|^2; read it with the divide convention")

    print("\n2. training kernels" + ("" if gpu else " (no CUDA GPU: their lines transcribed in torch)"))
    x = np.concatenate([hard_activations(8, 2560, seed=s) for s in range(4)])            # [32, 2560], ties
    if gpu:
        import triton  # noqa: F401
        act = load_file(os.path.join(root, "kernels", "activation_quant.py"), "onebitllms_activation_quant")
        wq = load_file(os.path.join(root, "kernels", "weight_quant.py"), "onebitllms_weight_quant")
        run_act = lambda t: act.activation_quant_triton(t[None].cuda().contiguous())[0].cpu()  # noqa: E731
    else:
        wq = None
        run_act = lambda t: torch_activation_kernel(torch, t)  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        xt = torch.from_numpy(x).to(dtype)
        theirs = run_act(xt).float().numpy()
        preset = "onebitllms" if dtype == torch.float32 else "onebitllms-bf16"
        from dataclasses import replace

        from refbitnet.quant import NUMERICS
        numerics = NUMERICS["onebitllms"] if dtype == torch.float32 else replace(NUMERICS["onebitllms"],
                                                                                 dtype="bfloat16")
        ours = fake_quantize_activations(xt.float().numpy(), numerics)
        s_ieee = np.float32(127) / np.maximum(np.abs(xt.float().numpy()).max(-1), np.float32(1e-5))
        codes_t = np.clip(np.rint(theirs * s_ieee[:, None]), -128, 127).astype(np.int8)  # their codes from xq / s
        codes = compare_tensor("xq", absmax_int8(xt.float().numpy(), numerics)[0], codes_t, mode="exact")
        values = compare_tensor("x_quant", ours, theirs, mode="ulp", dtype=str(dtype)[6:])
        # On the GPU the scale 127.0 / absmax is Triton's approximate division, an ulp or so from the IEEE
        # quotient, so a code whose x * s sits at a .5 tie may land one apart: benign by the oracle's
        # classification; anything else is a real difference. The transcription must match exactly.
        named = compare_int8_codes("xq", xt.float().numpy(), codes_t, numerics=numerics)
        passed = named.real == 0 if gpu else codes.ok
        ok &= line(f"activation_quant {str(dtype)[6:]:8s} vs '{preset}'", passed,
                   f"codes {codes.n_differ} of {codes.n_total} differ"
                   + (f" ({named.detail})" if codes.n_differ else "")
                   + f"; values xq / s {values.n_differ} differ, max {values.max_ulp} ulp")
        dflt = compare_int8_codes("xq", xt.float().numpy(), codes_t)
        print(f"       vs refbitnet's ties to even: {dflt.detail or 'equal'}")
    if gpu:
        print("       (on the GPU the values xq / s differ by ulps: Triton compiles float32 '/' to an approximate "
              "division, in 127.0 / absmax and in xq / scale; so a code at an exact .5 tie can land one apart "
              "(a benign boundary flip); every other code is the rule's)")
    if gpu:
        for name, (n, k) in shapes.items():
            w = torch.from_numpy((rng.standard_normal((n, k)) * 0.02).astype(np.float32))
            out = wq.weight_quant_triton(w.cuda()).cpu().numpy()
            codes_t = np.sign(out).astype(np.int8)
            inv = np.float32(1) / np.abs(out[out != 0]).max()                 # the kernel's scale, as stored
            ours = ternary_codes(w.numpy(), np.float32(1) / inv, "onebitllms")
            c = compare_ternary_codes(name, w.numpy(), codes_t, numerics="onebitllms")
            exact = compare_tensor(name, ours, codes_t, mode="exact")
            ok &= line(f"weight_quant {name:13s}", c.ok, f"with the kernel's scale: {exact.n_differ} of "
                                                         f"{exact.n_total} differ; with refbitnet's gamma: "
                                                         f"{c.detail or 'equal'}")
    print("\nverdict: " + ("onebitllms computes the numerics refbitnet names 'onebitllms' (ties half up) and "
                           "'onebitllms-checkpoint'" if ok else "DIFFERENCES FOUND (see DIFF lines)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
