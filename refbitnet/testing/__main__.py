"""python -m refbitnet.testing dump ...: reference tensors as .safetensors for projects in any language.

    python -m refbitnet.testing dump activations --model DIR_OR_GGUF --ids 128000,791,4062 --out ref.safetensors
    python -m refbitnet.testing dump golden --layout i2_s --shape 64x256 --tokens 4 --out golden.safetensors

See refbitnet.testing.dump for what each file holds.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RefBitNetError
from ..quant import NUMERICS


def _ids(text: str):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, found {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _shape(text: str):
    parts = text.lower().split("x")
    try:
        n, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK, e.g. 64x256, found {text!r}") from None
    return n, k


def parser() -> argparse.ArgumentParser:
    from .layouts import LAYOUTS
    p = argparse.ArgumentParser(prog="python -m refbitnet.testing",
                                description="refbitnet as an oracle for projects in any language")
    sub = p.add_subparsers(dest="command", required=True)
    dump = sub.add_parser("dump", help="write reference tensors to a .safetensors file")
    kinds = dump.add_subparsers(dest="kind", required=True)
    act = kinds.add_parser("activations",
                           help="every trace tensor and each projection's xq, s, acc for token ids")
    act.add_argument("--model", default=None,
                     help="a model directory or .gguf file (default: the shipped model)")
    act.add_argument("--ids", type=_ids, required=True, help="comma-separated token ids, e.g. 128000,791,4062")
    act.add_argument("--no-integers", action="store_true", help="leave out the .xq/.s/.acc intermediates")
    act.add_argument("--out", required=True, help="the .safetensors file to write")
    gold = kinds.add_parser("golden", help="golden vectors for one BitLinear: packed, x, xq, s, acc, y")
    gold.add_argument("--layout", choices=LAYOUTS, required=True)
    gold.add_argument("--shape", type=_shape, required=True, help="N x K of the weight, e.g. 64x256")
    gold.add_argument("--tokens", type=int, default=4, help="rows of x (default 4: normal, ties, outlier, zeros)")
    gold.add_argument("--seed", type=int, default=0)
    gold.add_argument("--numerics", choices=tuple(NUMERICS), default="torch")
    gold.add_argument("--out", required=True, help="the .safetensors file to write")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .dump import dump_activations, dump_golden
    try:
        if args.kind == "activations":
            t = dump_activations(args.out, args.model, args.ids, integers=not args.no_integers)
            print(f"wrote {len(t)} tensors for {len(args.ids)} tokens to {args.out}")
        else:
            if args.tokens < 1:
                raise RefBitNetError(f"tokens: expected at least 1, found {args.tokens}")
            n, k = args.shape
            g = dump_golden(args.out, args.layout, n, k, tokens=args.tokens, seed=args.seed,
                            numerics=args.numerics)
            print(f"wrote golden vectors of one {args.layout} BitLinear [{n}, {k}], {args.tokens} tokens "
                  f"({g['packed'].nbytes} packed bytes) to {args.out}")
    except (RefBitNetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
