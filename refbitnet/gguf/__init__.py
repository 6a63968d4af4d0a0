"""GGUF interchange: read bitnet.cpp (I2_S) and llama.cpp (TQ1_0, TQ2_0) files, write all three.

One idea per module:

    reader.py          a bounds-checked GGUF parser (GGUFFile, read_gguf, tensor_nbytes); knows no BitNet
    mapping.py         BitNet in GGUF: arch names, tensor names <-> checkpoint names, the Config,
                       ternary tensors -> released codes and scales (gguf_to_tensors, load_gguf)
    tokenizer_meta.py  tokenizer.json <-> tokenizer.ggml.* metadata
    writer.py          write_gguf / save_gguf (gguf.GGUFWriter; I2_S added by raw type id)
    cli.py             python -m refbitnet.gguf info FILE | export MODEL_DIR OUT.gguf --layout i2_s

Public API: ``load_gguf(path) -> Model`` (with the file's tokenizer), ``gguf_to_tensors(path) ->
(Config, tensors)``, ``save_gguf(model or model dir, path, layout=...)``, ``write_gguf(path, config,
tensors, ...)``, ``read_gguf(path) -> GGUFFile`` (metadata, tensor table, raw bytes), ``describe(path)``.
"""

from .cli import describe, main
from .mapping import decode_ternary, gguf_config, gguf_to_tensors, load_gguf
from .reader import GGUFFile, GGUFTensor, read_gguf, tensor_nbytes
from .tokenizer_meta import tokenizer_json_from_metadata, tokenizer_metadata
from .writer import save_gguf, write_gguf

__all__ = ["load_gguf", "save_gguf", "write_gguf", "read_gguf", "gguf_to_tensors", "gguf_config",
           "decode_ternary", "describe", "main", "GGUFFile", "GGUFTensor", "tensor_nbytes",
           "tokenizer_metadata", "tokenizer_json_from_metadata"]
