"""Case study: gguf-py's TQ1_0 / TQ2_0 quantizers (llama.cpp's ternary types) checked with refbitnet's oracle.

    python examples/case_study_gguf_tq.py                                  # the gguf package installed here
    python examples/case_study_gguf_tq.py --gguf-py ~/src/llama.cpp/gguf-py  # your llama.cpp checkout

--gguf-py is the folder that holds the ``gguf`` package: a llama.cpp checkout's ``gguf-py`` or a
site-packages folder; without it the installed ``gguf`` is used. Nothing is copied from it: the script
imports it from where you have it.

What it checks, each against refbitnet.testing:

1. bytes: ``gguf.quants.quantize(W, TQ2_0 / TQ1_0)`` of already-ternary weights W = codes * gamma against
   ``encode(codes, "tq2_0" / "tq1_0", scale=gamma)``, with all-zero blocks (their d is 0), for 2B4T's
   four projection shapes; and ``gguf.quants.dequantize`` against ``decode``;
2. the quantizer's rule on latent (real-valued) weights: TQ's own quantizer takes one scale per
   256-element block, d = max|block|, and rounds W / d half away from zero, so its threshold is
   0.5 * max|block|; BitNet's absmean has one scale per tensor and the threshold 0.5 * mean|W|.
   ``compare_ternary_codes`` counts the codes that differ and classifies them. A converter must
   ternarize with absmean first (llama.cpp's BitNet converters do) and let TQ only pack.

Exit status: 0 when the packing agrees bit for bit (the rule difference of 2. is expected and reported),
1 when the packing differs, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from refbitnet.testing import compare_ternary_codes, decode, encode, quantize_weights  # noqa: E402

SHAPES = {"q/o_proj": (2560, 2560), "k/v_proj": (640, 2560), "gate/up_proj": (6912, 2560),
          "down_proj": (2560, 6912)}

#: --small: the same four roles at a tenth of the size (K a multiple of 256), for a quick run and the tests.
SMALL_SHAPES = {"q/o_proj": (256, 512), "k/v_proj": (64, 512), "gate/up_proj": (768, 512), "down_proj": (256, 768)}


def load_gguf(path):
    if path is not None:
        if not os.path.isfile(os.path.join(path, "gguf", "quants.py")):
            print(f"error: --gguf-py {path}: expected the folder holding gguf/quants.py (llama.cpp's gguf-py)",
                  file=sys.stderr)
            sys.exit(2)
        sys.path.insert(0, os.path.abspath(path))
    try:
        gguf = importlib.import_module("gguf")
        quants = importlib.import_module("gguf.quants")
    except ImportError as e:
        print(f"error: cannot import gguf ({e}); pip install gguf or pass --gguf-py", file=sys.stderr)
        sys.exit(2)
    return gguf, quants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf-py", default=None, help="folder holding the gguf package (llama.cpp/gguf-py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="shapes a tenth of 2B4T's (a quick run)")
    args = p.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else SHAPES
    gguf, quants = load_gguf(args.gguf_py)
    try:
        from importlib.metadata import version
        ver = version("gguf")
    except Exception:                                                    # a checkout without metadata
        ver = "unknown (not installed)"
    print(f"gguf from {os.path.dirname(gguf.__file__)} (version {ver}), numpy {np.__version__}")
    rng = np.random.default_rng(args.seed)
    ok = True

    print("\n1. packing already-ternary weights W = codes * gamma (all-zero blocks included)")
    types = gguf.GGMLQuantizationType
    for qtype, layout in ((types.TQ2_0, "tq2_0"), (types.TQ1_0, "tq1_0")):
        for name, (n, k) in shapes.items():
            latent = rng.standard_normal((n, k)).astype(np.float32) * 0.02
            codes, gamma = quantize_weights(latent)
            codes.reshape(-1, 256)[::7] = 0                              # every 7th block all zero
            w = codes.astype(np.float32) * gamma
            theirs = np.asarray(quants.quantize(w, qtype)).reshape(-1)
            ours = encode(codes, layout, scale=gamma)
            same = theirs.dtype == ours.dtype and np.array_equal(theirs, ours)
            back = np.asarray(quants.dequantize(theirs.reshape(n, -1), qtype)).reshape(n, k)
            ours_codes, d = decode(theirs, layout, shape=(n, k))
            deq_same = np.array_equal(back, ours_codes.astype(np.float32) * d)
            ok &= same and deq_same
            print(f"  {layout} {name:13s} [{n}, {k}]: bytes {'equal' if same else 'DIFFER'} "
                  f"({ours.nbytes} bytes), dequantize {'equal' if deq_same else 'DIFFERS'}, "
                  f"scale fp16 {float(d)!r} for gamma {float(gamma)!r}")

    print("\n2. the quantizer's own rule on latent weights (per-block absmax) vs BitNet's absmean")
    for name, (n, k) in shapes.items():
        latent = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        theirs = np.asarray(quants.quantize(latent, gguf.GGMLQuantizationType.TQ2_0)).reshape(-1)
        their_codes, _ = decode_blocks(theirs, n, k)
        check = compare_ternary_codes(name, latent, their_codes)
        zero_theirs, zero_ours = (their_codes == 0).mean(), (quantize_weights(latent)[0] == 0).mean()
        print(f"  {name:13s}: {check.n_differ} of {check.n_total} codes differ ({check.benign} benign boundary "
              f"flips, {check.real} real differences); zeros: TQ2_0 {zero_theirs:.1%}, absmean {zero_ours:.1%}")
    print("\nverdict: " + ("TQ1_0/TQ2_0 pack refbitnet's codes bit for bit; their quantizer is not BitNet's "
                           "(per-block absmax): ternarize with absmean first" if ok else "PACKING DIFFERS"))
    return 0 if ok else 1


def decode_blocks(data, n, k):
    """TQ2_0 codes with each block's own d (blocks of a latent tensor have different d, so decode()'s
    per-tensor scale does not apply)."""
    from refbitnet.testing import unpack_tq2_0
    return unpack_tq2_0(data, (n, k))


if __name__ == "__main__":
    sys.exit(main())
