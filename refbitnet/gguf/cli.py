"""Command line: ``python -m refbitnet.gguf info FILE`` and ``export MODEL_DIR OUT.gguf --layout ...``."""

from __future__ import annotations

import os

from ..errors import GGUFError
from .mapping import gguf_config
from .reader import read_gguf
from .writer import EMBEDDING_TYPES, LAYOUT_TYPES, save_gguf


def describe(path) -> str:
    """A short human-readable summary of a GGUF file: architecture, sizes, tensor types."""
    gf = read_gguf(path)
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    lines = [f"{gf.path}: GGUF v{gf.version}, {len(gf.metadata)} metadata keys, {len(gf.tensors)} tensors "
             f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})",
             f"architecture: {gf.get('general.architecture')!r}"]
    try:
        lines.append(f"config: {gguf_config(gf)}")
    except GGUFError as e:
        lines.append(f"not a BitNet b1.58 file: {e}")
    if "tokenizer.ggml.tokens" in gf.metadata:
        lines.append(f"tokenizer: {gf.get('tokenizer.ggml.model')!r}, pre {gf.get('tokenizer.ggml.pre')!r}, "
                     f"{len(gf.metadata['tokenizer.ggml.tokens'])} tokens")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import sys

    from ..errors import RefBitNetError

    parser = argparse.ArgumentParser(prog="python -m refbitnet.gguf",
                                     description="BitNet b1.58 GGUF files for bitnet.cpp (I2_S) and llama.cpp "
                                                 "(TQ2_0/TQ1_0)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarize a GGUF file")
    info.add_argument("file")
    export = sub.add_parser("export", help="write a model directory (refbitnet.load reads it) as GGUF")
    export.add_argument("model_dir")
    export.add_argument("out")
    export.add_argument("--layout", choices=sorted(LAYOUT_TYPES), default="i2_s",
                        help="i2_s for bitnet.cpp (default), tq2_0 / tq1_0 for llama.cpp")
    export.add_argument("--embedding-type", choices=list(EMBEDDING_TYPES), default="f16")
    export.add_argument("--tokenizer", help="tokenizer.json to embed (default: the model directory's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.file))
        else:
            save_gguf(args.model_dir, args.out, layout=args.layout, tokenizer_file=args.tokenizer,
                      embedding_type=args.embedding_type)
            print(describe(args.out))
    except RefBitNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:               # OUT is a directory, in a missing directory, not writable, disk full
        where = e.filename if e.filename is not None else (args.out if args.command == "export" else args.file)
        print(f"error: {os.fspath(where)}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
