"""GGUF interchange: read and write BitNet b1.58 files with I2_S, TQ1_0 or TQ2_0 projections.

One idea per module:

    reader.py          a bounds-checked GGUF parser (GGUFFile, read_gguf, tensor_nbytes); knows no BitNet
    mapping.py         BitNet in GGUF: arch names and the graph each engine builds for them, tensor
                       names <-> checkpoint names, the Config, ternary tensors -> released codes and
                       scales (gguf_to_tensors, load_gguf)
    tables.py          embedding / output head in F32, F16, BF16, Q8_0, Q6_K, Q4_K -> refbitnet's table
    tokenizer_meta.py  tokenizer.json <-> tokenizer.ggml.* metadata
    writer.py          write_gguf / save_gguf (gguf.GGUFWriter; I2_S added by raw type id)
    cli.py             python -m refbitnet.gguf info FILE | export MODEL_DIR OUT.gguf --layout i2_s

Public API: ``load_gguf(path) -> Model`` (with the file's tokenizer), ``gguf_to_tensors(path) ->
(Config, tensors)``, ``save_gguf(model or model dir, path, layout=...)``, ``write_gguf(path, config,
tensors, ...)``, ``read_gguf(path) -> GGUFFile`` (metadata, tensor table, raw bytes), ``describe(path)``.
Exports are named ``bitnet-b1.58`` (2B4T's graph in bitnet.cpp and ik_llama.cpp); ``arch="bitnet"``
(the name upstream llama.cpp loads, with a SiLU-gated FFN) warns with ``EngineGraphWarning``.
"""

from .cli import describe, main
from .mapping import EngineGraphWarning, decode_ternary, engine_graphs, gguf_config, gguf_to_tensors, load_gguf
from .reader import GGUFFile, GGUFTensor, read_gguf, tensor_nbytes
from .tokenizer_meta import tokenizer_json_from_metadata, tokenizer_metadata
from .writer import save_gguf, write_gguf

__all__ = ["load_gguf", "save_gguf", "write_gguf", "read_gguf", "gguf_to_tensors", "gguf_config",
           "decode_ternary", "describe", "main", "GGUFFile", "GGUFTensor", "tensor_nbytes",
           "EngineGraphWarning", "engine_graphs",
           "tokenizer_metadata", "tokenizer_json_from_metadata"]
