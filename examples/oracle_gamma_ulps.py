"""Measure how far refbitnet's weight scale gamma = mean|W| (NumPy, float32 pairwise) is from torch's.

    python examples/oracle_gamma_ulps.py [--seeds 8]

Both sum the same |W| in float32 in different orders, so the two means may differ by a few ulps; the
codes for a given gamma are identical (tests/test_quant.py), so the distance matters only for the scale
itself and for weights within that distance of the 0.5 * gamma threshold. Prints a histogram of the
distance in ulps over the four projection shapes of 2B4T and a few small ones, for gaussian weights and
for heavy-tailed (Student t, 3 degrees of freedom) weights, and how many codes each difference flips.
docs/SPEC.md §3 quotes the result.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from refbitnet.quant import absmean_scale, ternary_codes  # noqa: E402

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912), (256, 256), (64, 512), (7, 13)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (its reduction order may depend on them)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    hist: collections.Counter = collections.Counter()
    flips = tensors = 0
    worst = (0, None)
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        for shape in SHAPES:
            for dist in ("gauss", "t3"):
                base = rng.standard_normal(shape) if dist == "gauss" else rng.standard_t(3, shape)
                w = (base * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
                ours = absmean_scale(w)
                theirs = np.float32(max(torch.from_numpy(w).abs().mean().item(), 1e-5))
                d = abs(int(ours.view(np.int32)) - int(theirs.view(np.int32)))
                hist[d] += 1
                tensors += 1
                if d:
                    flips += int((ternary_codes(w, ours) != ternary_codes(w, theirs)).sum())
                if d > worst[0]:
                    worst = (d, (shape, dist, seed))
    print(f"numpy {np.__version__}, torch {torch.__version__} ({args.threads} thread(s)), {tensors} tensors")
    print("ulps apart: " + ", ".join(f"{d}: {hist[d]}" for d in sorted(hist)))
    print(f"codes that differ between the two gammas: {flips}; worst: {worst[0]} ulp at {worst[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
