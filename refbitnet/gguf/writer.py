"""refbitnet -> GGUF: write a BitNet b1.58 model as a file bitnet.cpp (I2_S) or llama.cpp (TQ2_0,
TQ1_0) loads.

What the engines read (docs/SPEC.md §5, and their converters)::

    layout   projections          engines that know the type           embedding   norms   LM head
    i2_s     I2_S  (type id 36)   bitnet.cpp, ik_llama.cpp             F16         F32     tied
    tq2_0    TQ2_0 (35)           bitnet.cpp, ik_llama.cpp, llama.cpp  F16         F32     tied
    tq1_0    TQ1_0 (34)           bitnet.cpp, ik_llama.cpp, llama.cpp  F16         F32     tied

Every layout is written with the architecture name "bitnet-b1.58", the name under which engines build
2B4T's graph (ReLU²-gated FFN). The name "bitnet", the only one upstream llama.cpp loads, selects a
SiLU-gated FFN in every engine (refbitnet.gguf.mapping.ARCH_GRAPHS): such a file loads there and
computes another function, so it is written only when asked (arch="bitnet"), with a warning.

Scales. I2_S keeps the float32 weight_scale exactly. TQ1_0/TQ2_0 store it as an fp16 block scale:
writing rounds it to fp16 once, a relative error of at most 2**-11 (half an fp16 ulp) for scales in
fp16's normal range [6.1e-5, 65504]; smaller scales would lose precision (fp16 subnormals) and larger
ones do not fit, so both are refused. A bf16 scale (what the release stores) in that range is exactly
an fp16 value.

Embeddings are written as F16 by default (the official bitnet.cpp file's type): bf16 values with
|x| >= 2**-14 convert exactly; smaller ones round to the fp16 subnormal grid (absolute error <= 2**-25).
"bf16" writes the release's bits unchanged.

Writing uses ``gguf.GGUFWriter``; I2_S tensors are added by raw type id (the gguf package has no I2_S).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ..bf16 import bf16_to_f32, f32_to_bf16
from ..config import Config
from ..errors import GGUFError
from .mapping import ARCH_2B4T, BITNET_ARCHS, GRAPH_2B4T, EngineGraphWarning, engine_graphs, layer_norms, \
    layer_projections
from .reader import I2_S, TQ1_0, TQ2_0
from .tokenizer_meta import CHAT_TEMPLATE, tokenizer_metadata

LAYOUT_TYPES = {"i2_s": I2_S, "tq2_0": TQ2_0, "tq1_0": TQ1_0}
# general.file_type (llama_ftype) written for each layout: bitnet.cpp's MOSTLY_I2_S is 40 in its fork.
FILE_TYPES = {"i2_s": 40, "tq1_0": 36, "tq2_0": 37}
EMBEDDING_TYPES = ("f16", "bf16", "f32")
HIDDEN_ACTIVATION = "relu2"              # config.json's hidden_act of BitNet b1.58
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14


def write_gguf(path, config: Config, tensors: Mapping[str, np.ndarray], *, layout: str = "i2_s",
               tokenizer_file=None, name: str = "refbitnet", embedding_type: str = "f16",
               arch: str = ARCH_2B4T, progress=None) -> None:
    """Write a BitNet b1.58 model given as (Config, tensors in the released HF naming) as GGUF.

    layout "i2_s" (projections I2_S: bitnet.cpp, ik_llama.cpp), "tq2_0" or "tq1_0" (also upstream
    llama.cpp's ggml). arch: "bitnet-b1.58" (default, 2B4T's graph in bitnet.cpp and ik_llama.cpp),
    "bitnet-25" (the same graph), or "bitnet" (upstream llama.cpp loads it, but every engine computes a
    SiLU-gated FFN for it: an EngineGraphWarning says so). Norms F32.
    embedding_type "f16" (default, what the official bitnet.cpp file uses; exact for bf16 values with
    |x| >= 2**-14, absolute error <= 2**-25 below), "bf16" (exact; the engines' ggml read BF16 rows)
    or "f32". tensors: what ``model_from_tensors`` takes (packed uint8
    [N/4, K] projections with ``.weight_scale``; embedding and norms as bf16 bits or float).
    tokenizer_file: a HF tokenizer.json to embed (runtimes need it; refbitnet's reader does not).
    progress: None or a callable progress(done, total, name), called after each tensor is converted
    and once more when the file is written (total = tensors + 1).
    """
    import gguf

    if layout not in LAYOUT_TYPES:
        raise GGUFError(f"layout: expected one of {list(LAYOUT_TYPES)}, found {layout!r}")
    if arch not in BITNET_ARCHS:
        raise GGUFError(f"arch: expected one of {list(BITNET_ARCHS)}, found {arch!r}")
    if embedding_type not in EMBEDDING_TYPES:
        raise GGUFError(f"embedding_type: expected 'f16', 'bf16' or 'f32', found {embedding_type!r}")
    if not config.tie_word_embeddings:
        raise GGUFError("write_gguf: only tied-embedding models (tie_word_embeddings=True) are supported")
    block = 128 if layout == "i2_s" else 256        # elements per block; blocks may not straddle rows
    for key in ("hidden_size", "intermediate_size"):
        if getattr(config, key) % block:
            raise GGUFError(f"layout {layout!r}: every projection's input width must be a multiple of its "
                            f"{block}-element block, found {key} = {getattr(config, key)}")
    _warn_if_not_2b4t(arch)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(name)
    _add_hyperparameters(w, config, arch, layout)
    _add_tokenizer(w, config, tokenizer_file)

    def need(hf):
        if hf not in tensors:
            raise GGUFError(f"write_gguf: missing tensor {hf!r}")
        return tensors[hf]

    embed = np.asarray(need("model.embed_tokens.weight"))                       # [V, D]
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise GGUFError(f"model.embed_tokens.weight: expected shape {[config.vocab_size, config.hidden_size]}, "
                        f"found {list(embed.shape)}")
    per_layer = len(layer_norms(config, 0)) + len(layer_projections(config, 0))
    total = 2 + config.num_hidden_layers * per_layer + 1             # tensors, then the file written
    done = 0

    def add(gname, data, **kwargs):
        nonlocal done
        w.add_tensor(gname, data, **kwargs)
        done += 1
        if progress is not None:
            progress(done, total, gname)

    add("token_embd.weight", _convert_table(embed, embedding_type),
        raw_dtype=gguf.GGMLQuantizationType.BF16 if embedding_type == "bf16" else None)
    add("output_norm.weight", _as_f32(need("model.norm.weight")))
    for i in range(config.num_hidden_layers):
        for gname, hf, _ in layer_norms(config, i):
            add(gname, _as_f32(need(hf)))
        for gname, hf, (n, k) in layer_projections(config, i):
            data = _pack_projection(need(hf), _scale_of(tensors, hf), hf, n, k, layout)
            # Added by raw type id (the gguf package has no I2_S); int8 view so the writer keeps the
            # element shape [N, K] instead of treating the array as a byte shape.
            add(gname, np.asarray(data, dtype=np.uint8).view(np.int8), raw_shape=(n, k),
                raw_dtype=LAYOUT_TYPES[layout])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if progress is not None:
        progress(total, total, os.fspath(path))


def _warn_if_not_2b4t(arch: str) -> None:
    import warnings

    other = {e: g for e, g in engine_graphs(arch).items() if g != GRAPH_2B4T and not g.startswith("refuses")}
    if other:
        warnings.warn(EngineGraphWarning(
            f"arch {arch!r}: {', '.join(other)} compute a SiLU-gated FFN (silu(gate) * up) for this file, "
            f"not 2B4T's ReLU²-gated FFN (relu(gate)² * up): it loads and computes another function. "
            f"Write arch {ARCH_2B4T!r} for bitnet.cpp and ik_llama.cpp."), stacklevel=3)


def _add_hyperparameters(w, config: Config, arch: str, layout: str) -> None:
    """The {arch}.* keys the engines read, and the file type."""
    import gguf

    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_rope_dimension_count(config.head_dim)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    # The FFN activation, in the key llama.cpp defines for it ("{arch}.hidden_activation"; engines that do
    # not read it ignore it): says what the file computes, so an engine that honours it can build ReLU².
    w.add_string(f"{arch}.hidden_activation", HIDDEN_ACTIVATION)
    if arch == "bitnet":                           # as llama.cpp's BitnetModel converter writes
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(1.0)
    w.add_file_type(FILE_TYPES[layout])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w, config: Config, tokenizer_file) -> None:
    """Special token ids, and the tokenizer's keys and chat template if a tokenizer.json is given."""
    # Special ids: the tokenizer's named tokens if it has them, else the config's. GGUF has one eos id
    # (what the runtimes stop on); a second config eos id goes to eot, which llama.cpp also stops on,
    # and gguf_config reads the pair back as the eos_token_id list.
    eos_ids = config.eos_ids
    special = {"bos": config.bos_token_id, "eos": eos_ids[0] if eos_ids else None,
               "eot": eos_ids[1] if len(eos_ids) > 1 else None}
    if tokenizer_file is not None:
        meta = tokenizer_metadata(tokenizer_file, config.vocab_size)
        w.add_tokenizer_model(meta["tokenizer.ggml.model"])
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
        w.add_token_list(meta["tokenizer.ggml.tokens"])
        w.add_token_types(meta["tokenizer.ggml.token_type"])
        w.add_token_merges(meta["tokenizer.ggml.merges"])
        for key in special:
            special[key] = meta.get(f"tokenizer.ggml.{key}_token_id", special[key])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in special.items():
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)


def _pack_projection(packed: np.ndarray, scale: np.float32, hf: str, n: int, k: int, layout: str) -> np.ndarray:
    """Released packed codes uint8 [N/4, K] + scale -> the layout's bytes (1-D uint8)."""
    from .. import layouts

    if packed.dtype != np.uint8 or packed.shape != (n // 4, k):
        raise GGUFError(f"{hf}: expected packed uint8 [{n // 4}, {k}], found {packed.dtype} "
                        f"{list(packed.shape)}")
    codes = layouts.unpack_hf(np.asarray(packed))                       # [N, K] int8
    if layout == "i2_s":
        return layouts.pack_i2s(codes, scale)
    if not (FP16_MIN_NORMAL <= scale <= FP16_MAX):
        raise GGUFError(f"{hf}_scale = {scale:g}: outside fp16's normal range; {layout} stores it as an fp16 "
                        f"block scale")
    return (layouts.pack_tq2_0 if layout == "tq2_0" else layouts.pack_tq1_0)(codes, scale)


def _as_f32(a: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) or a float array -> float32."""
    a = np.asarray(a)
    return bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32)


def _scale_of(tensors: Mapping[str, np.ndarray], hf: str) -> np.float32:
    ws = np.asarray(tensors[hf + "_scale"])
    if ws.size != 1:
        raise GGUFError(f"{hf}_scale: expected one scale per tensor, found shape {ws.shape}")
    return np.float32(_as_f32(ws.reshape(1))[0])


def _convert_table(table: np.ndarray, kind: str, rows: int = 8192) -> np.ndarray:
    """Embedding [V, D] (bf16 bits or float) -> float16 / bf16 bits / float32, a block of rows at a time
    (the 2B4T table is 0.66 GB as bf16; no float32 copy of all of it is made for f16 or bf16)."""
    dtype = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32}[kind]
    if kind == "bf16" and table.dtype == np.uint16:
        return table
    out = np.empty(table.shape, dtype=dtype)
    for r in range(0, table.shape[0], rows):
        block = _as_f32(table[r:r + rows])
        if kind == "f16" and np.abs(block).max() > FP16_MAX:
            raise GGUFError("model.embed_tokens.weight: values beyond fp16's range (65504) cannot be written "
                            "as F16 (use embedding_type='bf16')")
        out[r:r + rows] = f32_to_bf16(block) if kind == "bf16" else block
    return out


def save_gguf(source, path, *, layout: str = "i2_s", tokenizer_file=None, name: str = "refbitnet",
              embedding_type: str = "f16", arch: str = ARCH_2B4T, progress=None) -> None:
    """Export a refbitnet Model, anything refbitnet.load reads (a model directory, packed release or
    bf16 master; a .gguf file; a hub id) or a (Config, tensors) pair as a GGUF file (layout, arch and
    progress: see write_gguf). The model's tokenizer is embedded unless tokenizer_file says otherwise
    (one rebuilt from a GGUF file's metadata too, written out to a temporary tokenizer.json)."""
    import tempfile

    if isinstance(source, tuple) and len(source) == 2:
        config, tensors = source
    else:
        if not hasattr(source, "release_tensors"):                      # not a Model: a path or hub id
            from ..loading import load
            source = load(source, backend="numpy")                      # only its tensors are needed
        config, tensors = source.config, source.release_tensors()
    with tempfile.TemporaryDirectory() as tmp:
        tok = getattr(source, "tokenizer", None)
        if tokenizer_file is None and tok is not None:
            candidate = getattr(tok, "path", None)
            if candidate is not None and os.path.isfile(candidate):
                tokenizer_file = candidate
            elif hasattr(tok, "save"):
                tokenizer_file = os.path.join(tmp, "tokenizer.json")
                tok.save(tokenizer_file)
        write_gguf(path, config, tensors, layout=layout, tokenizer_file=tokenizer_file, name=name,
                   embedding_type=embedding_type, arch=arch, progress=progress)
