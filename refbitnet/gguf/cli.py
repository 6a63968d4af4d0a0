"""Command line: ``python -m refbitnet.gguf info FILE`` and ``export MODEL_DIR OUT.gguf --layout ...``."""

from __future__ import annotations

import os

from ..errors import GGUFError
from .mapping import ARCH_2B4T, BITNET_ARCHS, EngineGraphWarning, engine_graphs, gguf_config
from .reader import read_gguf
from .writer import EMBEDDING_TYPES, LAYOUT_TYPES, save_gguf


def describe(path) -> str:
    """A short human-readable summary of a GGUF file: architecture and the graph it selects in each
    engine, sizes, tensor types."""
    gf = read_gguf(path)
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    lines = [f"{gf.path}: GGUF v{gf.version}, {len(gf.metadata)} metadata keys, {len(gf.tensors)} tensors "
             f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})",
             f"architecture: {gf.get('general.architecture')!r}"]
    arch = gf.get("general.architecture")
    if arch in BITNET_ARCHS:
        lines[-1] += ", which selects in each engine:"
    if arch in BITNET_ARCHS:
        types = {t.type_id for t in gf.tensors.values()}
        lines += [f"  {engine:13s} {what}" for engine, what in engine_graphs(arch, types).items()]
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
    import warnings

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
                        help="i2_s (default; bitnet.cpp, ik_llama.cpp), tq2_0 / tq1_0 (also llama.cpp's ggml)")
    export.add_argument("--embedding-type", choices=list(EMBEDDING_TYPES), default="f16")
    export.add_argument("--arch", choices=list(BITNET_ARCHS), default=ARCH_2B4T,
                        help=f"general.architecture (default {ARCH_2B4T}: 2B4T's graph in bitnet.cpp and "
                             f"ik_llama.cpp; 'bitnet' loads in upstream llama.cpp, which then computes a "
                             f"SiLU-gated FFN, not 2B4T)")
    export.add_argument("--tokenizer", help="tokenizer.json to embed (default: the model directory's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.file))
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EngineGraphWarning)
                save_gguf(args.model_dir, args.out, layout=args.layout, tokenizer_file=args.tokenizer,
                          embedding_type=args.embedding_type, arch=args.arch)
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            print(describe(args.out))
    except RefBitNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:               # OUT is a directory, in a missing directory, not writable, disk full
        where = e.filename if e.filename is not None else (args.out if args.command == "export" else args.file)
        print(f"error: {os.fspath(where)}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
