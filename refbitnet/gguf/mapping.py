"""BitNet b1.58 in GGUF: architecture names, tensor names, the Config, and ternary tensors -> refbitnet.

Tensor names (GGUF -> the released HF names refbitnet uses, refbitnet.config.tensor_name)::

    token_embd.weight            model.embed_tokens.weight                 [V, D]
    output_norm.weight           model.norm.weight                         [D]
    output.weight                lm_head.weight (untied models only)       [V, D]
    blk.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight   [D]
    blk.{i}.attn_q / attn_k / attn_v / attn_output .weight
                                 model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    blk.{i}.attn_sub_norm.weight model.layers.{i}.self_attn.attn_sub_norm.weight   [D]
    blk.{i}.ffn_norm.weight      model.layers.{i}.post_attention_layernorm.weight  [D]
    blk.{i}.ffn_gate / ffn_up / ffn_down .weight
                                 model.layers.{i}.mlp.{gate,up,down}_proj.weight
    blk.{i}.ffn_sub_norm.weight  model.layers.{i}.mlp.ffn_sub_norm.weight          [F]

No Q/K permutation: llama.cpp's converters permute the rows of q/k for the "llama" architecture (its RoPE
pairs element i with i+1), but neither bitnet.cpp's 2B4T converter (convert-ms-to-gguf-bitnet.py, the
permute calls are commented out) nor llama.cpp's BitnetModel permutes: both runtimes rotate BitNet with
the NeoX pairing (i with i + HD/2), the pairing of the HF checkpoint. So rows are copied as they are.

Scales. I2_S stores one float32 per tensor after the codes: that is the weight_scale, exactly.
TQ1_0/TQ2_0 store an fp16 ``d`` per 256-element block; a BitNet tensor has the same d in every block
that holds a nonzero code, and it is read back as the per-tensor scale.
"""

from __future__ import annotations

import os

import numpy as np

from ..bf16 import bf16_to_f32
from ..config import NORMS, PROJECTIONS, Config, projection_shapes, tensor_name
from ..errors import GGUFError
from .reader import BF16, F16, F32, I2_S, TERNARY_TYPES, TQ1_0, TQ2_0, GGUFFile, read_gguf, type_name
from .tables import check_finite, exact_bf16, float_table

# ---- names -------------------------------------------------------------------------------------------
# GGUF's per-layer suffix (blk.{i}.{suffix}.weight) for each of refbitnet.config's projections and norms.
GGUF_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
GGUF_NORMS = {"input_layernorm": "attn_norm", "attn_sub_norm": "attn_sub_norm",
              "post_attention_layernorm": "ffn_norm", "ffn_sub_norm": "ffn_sub_norm"}
# suffix -> (name, module) as in refbitnet.config.PROJECTIONS / NORMS
_PROJECTION_BY_SUFFIX = {GGUF_PROJECTIONS[name]: (name, module) for name, module in PROJECTIONS}
_NORM_BY_SUFFIX = {GGUF_NORMS[name]: (name, module) for name, module in NORMS}

# ---- architecture names and the graph each engine builds for them -------------------------------------
# general.architecture picks the compute graph in an engine, whatever the tensors hold. Three names
# carry BitNet weights, and they select two different graphs (read from the engines' sources:
# bitnet.cpp 3rdparty/llama.cpp/src/llama.cpp build_bitnet / build_bitnet_158, ik_llama.cpp
# src/llama-build-context.cpp the same two, upstream llama.cpp src/models/bitnet.cpp):
#   "bitnet"                    the 2024 BitNet models: SubLN norms, but a SiLU-gated FFN,
#                               silu(gate) * up. Not 2B4T's function.
#   "bitnet-b1.58", "bitnet-25" 2B4T's graph: SubLN norms and a ReLU²-gated FFN, relu(gate)² * up.
# Upstream llama.cpp knows only "bitnet" (its converter maps BitNetForCausalLM onto it) and refuses
# the other two names; its ggml also has no I2_S (type 36).
BITNET_ARCHS = ("bitnet-b1.58", "bitnet-25", "bitnet")
ARCH_2B4T = "bitnet-b1.58"            # what refbitnet writes unless asked otherwise
ENGINES = ("bitnet.cpp", "ik_llama.cpp", "llama.cpp")
GRAPH_2B4T = "ReLU²-gated FFN with SubLN: 2B4T's graph"
GRAPH_SILU = "SiLU-gated FFN with SubLN: the 2024 BitNet graph, not 2B4T's function"
ARCH_GRAPHS = {          # arch -> engine -> the graph it builds (None: the engine refuses the name)
    "bitnet-b1.58": {"bitnet.cpp": GRAPH_2B4T, "ik_llama.cpp": GRAPH_2B4T, "llama.cpp": None},
    "bitnet-25": {"bitnet.cpp": GRAPH_2B4T, "ik_llama.cpp": GRAPH_2B4T, "llama.cpp": None},
    "bitnet": {"bitnet.cpp": GRAPH_SILU, "ik_llama.cpp": GRAPH_SILU, "llama.cpp": GRAPH_SILU},
}
UNKNOWN_TYPES = {"llama.cpp": {I2_S}}   # tensor types an engine's ggml cannot load


class EngineGraphWarning(UserWarning):
    """A file is written under an architecture name whose engine graph is not 2B4T's function."""


def engine_graphs(arch: str, type_ids=()) -> dict[str, str]:
    """engine -> what it does with a file of this architecture and these tensor types, in words."""
    out = {}
    for engine in ENGINES:
        graph = ARCH_GRAPHS.get(arch, {}).get(engine)
        unknown = sorted(set(type_ids) & UNKNOWN_TYPES.get(engine, set()))
        if graph is None:
            out[engine] = f"refuses the file: architecture {arch!r} is unknown to it"
        elif unknown:
            names = ", ".join(f"{type_name(t)} (type {t})" for t in unknown)
            out[engine] = f"refuses the file: tensor type {names} is unknown to it"
        else:
            out[engine] = graph
    return out


def layer_projections(config: Config, i: int) -> list[tuple[str, str, tuple[int, int]]]:
    """Layer i's projections in checkpoint order: (GGUF name, checkpoint name, [N out, K in])."""
    shapes = projection_shapes(config)
    return [(f"blk.{i}.{GGUF_PROJECTIONS[name]}.weight", tensor_name(i, name, module), shapes[name])
            for name, module in PROJECTIONS]


def layer_norms(config: Config, i: int) -> list[tuple[str, str, int]]:
    """Layer i's norms: (GGUF name, checkpoint name, width): F for ffn_sub_norm (it normalizes the
    FFN's hidden activations), D for the others."""
    return [(f"blk.{i}.{GGUF_NORMS[name]}.weight", tensor_name(i, name, module),
             config.intermediate_size if name == "ffn_sub_norm" else config.hidden_size)
            for name, module in NORMS]


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if not a BitNet tensor)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdecimal() and parts[3] == "weight":
        found = _PROJECTION_BY_SUFFIX.get(parts[2]) or _NORM_BY_SUFFIX.get(parts[2])
        if found is not None:
            return tensor_name(int(parts[1]), *found)
    return None


def expected_tensor_names(config: Config) -> list[str]:
    """GGUF tensor names of a BitNet b1.58 model (tied embedding: no output.weight)."""
    names = ["token_embd.weight", "output_norm.weight"]
    for i in range(config.num_hidden_layers):
        names += [g for g, _, _ in layer_norms(config, i)] + [g for g, _, _ in layer_projections(config, i)]
    return names


# ---- ternary tensors ---------------------------------------------------------------------------------
def decode_ternary(gf: GGUFFile, name: str) -> tuple[np.ndarray, np.float32]:
    """A ternary tensor -> (codes int8 [N, K], per-tensor scale float32).

    I2_S carries one scale. TQ1_0/TQ2_0 carry an fp16 d per 256-block; all blocks holding a nonzero code
    must agree (BitNet has one scale per tensor), otherwise GGUFError.
    """
    from .. import layouts

    t = gf.tensor(name)
    if len(t.shape) != 2:
        raise GGUFError(f"{gf.path}: tensor {name!r}: expected 2 dimensions, found shape {list(t.shape)}")
    raw = gf.raw(name)
    try:
        if t.type_id == I2_S:
            codes, scale = layouts.unpack_i2s(raw, t.shape)
            if not np.isfinite(scale) or scale < 0 or (scale == 0 and codes.any()):
                raise GGUFError(f"{gf.path}: tensor {name!r} (I2_S): expected a positive finite scale, "
                                f"found {scale}")
            return codes, np.float32(scale) if scale > 0 else np.float32(1.0)   # all-zero tensor: any scale
        if t.type_id == TQ2_0:
            codes, d = layouts.unpack_tq2_0(raw, t.shape)
        elif t.type_id == TQ1_0:
            codes, d = layouts.unpack_tq1_0(raw, t.shape)
        else:
            raise GGUFError(f"{gf.path}: tensor {name!r}: expected a ternary type (I2_S, TQ1_0, TQ2_0), "
                            f"found {t.type_name}")
    except GGUFError:
        raise
    except ValueError as e:            # RefBitNetError from the layout decoders (e.g. code 3)
        raise GGUFError(f"{gf.path}: tensor {name!r} ({t.type_name}): {e}") from None
    return codes, per_tensor_scale(codes, d, f"{gf.path}: tensor {name!r} ({t.type_name})")


def per_tensor_scale(codes: np.ndarray, d: np.ndarray, what: str) -> np.float32:
    """The one scale shared by every block with a nonzero code (codes [N, K], d [N, K/256])."""
    n, k = codes.shape
    used = (codes.reshape(n, k // 256, 256) != 0).any(axis=-1)       # [N, K/256]
    scales = np.unique(np.asarray(d, dtype=np.float32)[used])
    if scales.size == 0:                       # an all-zero tensor: the scale does not matter
        return np.float32(1.0)
    if scales.size > 1:
        raise GGUFError(f"{what}: blocks carry {scales.size} different scales (from {scales.min():g} to "
                        f"{scales.max():g}); BitNet b1.58 has one scale per tensor")
    if not (np.isfinite(scales[0]) and scales[0] > 0):
        raise GGUFError(f"{what}: expected a positive finite block scale, found {scales[0]}")
    return np.float32(scales[0])


# ---- the Config --------------------------------------------------------------------------------------
def gguf_config(gf: GGUFFile) -> Config:
    """Build the Config from a BitNet GGUF file's metadata; refuses other architectures."""
    arch = gf.get("general.architecture")
    if arch not in BITNET_ARCHS:
        raise GGUFError(f"{gf.path}: general.architecture is {arch!r}, not BitNet b1.58 "
                        f"(expected one of {list(BITNET_ARCHS)})")

    def key(suffix, default=None, required=True, kind=int):
        value = gf.get(f"{arch}.{suffix}", default)
        if value is None:
            if required:
                raise GGUFError(f"{gf.path}: missing metadata key {arch}.{suffix}")
            return None
        if isinstance(value, np.ndarray):
            raise GGUFError(f"{gf.path}: {arch}.{suffix}: per-layer values are not supported (BitNet b1.58 "
                            f"layers are all alike), found an array of {value.size}")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            wanted = "a number" if kind is float else "an integer"
            raise GGUFError(f"{gf.path}: {arch}.{suffix}: expected {wanted}, found {value!r}")
        return kind(value)

    d = key("embedding_length")
    n_head = key("attention.head_count")
    if d <= 0 or n_head <= 0:
        raise GGUFError(f"{gf.path}: expected positive embedding_length and head_count, found {d} and {n_head}")
    act = gf.get(f"{arch}.hidden_activation")
    if act is not None and act != "relu2":
        raise GGUFError(f"{gf.path}: {arch}.hidden_activation: expected 'relu2' (BitNet b1.58's squared ReLU), "
                        f"found {act!r}")
    rope_dim = key("rope.dimension_count", required=False)
    if rope_dim is not None and rope_dim != d // n_head:
        raise GGUFError(f"{gf.path}: {arch}.rope.dimension_count is {rope_dim}; refbitnet rotates the whole "
                        f"head (expected embedding_length / head_count = {d // n_head})")
    embd = gf.tensors.get("token_embd.weight")
    vocab = key("vocab_size", required=False)
    if vocab is None:
        tokens = gf.get("tokenizer.ggml.tokens")
        vocab = embd.shape[0] if embd is not None else (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise GGUFError(f"{gf.path}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                        f"no token_embd.weight)")
    special = {}
    for k in ("bos", "eos", "eot"):
        value = gf.get(f"tokenizer.ggml.{k}_token_id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise GGUFError(f"{gf.path}: tokenizer.ggml.{k}_token_id: expected an integer, found {value!r}")
        special[k] = value
    if special["eos"] is not None and special["eot"] not in (None, special["eos"]):
        special["eos"] = [special["eos"], special["eot"]]        # both end generation (see write_gguf)
    cfg = dict(
        hidden_size=d, intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=n_head, num_key_value_heads=key("attention.head_count_kv", n_head),
        vocab_size=int(vocab), max_position_embeddings=key("context_length"),
        rope_theta=_f32_value(key("rope.freq_base", 10000.0, required=False, kind=float)),
        rms_norm_eps=_f32_value(key("attention.layer_norm_rms_epsilon", kind=float)),
        bos_token_id=special["bos"], eos_token_id=special["eos"],
        tie_word_embeddings="output.weight" not in gf.tensors)
    try:
        return Config(**cfg)
    except ValueError as e:
        raise GGUFError(f"{gf.path}: metadata does not describe a valid BitNet b1.58 model: {e}") from None


def _f32_value(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


# ---- GGUF -> refbitnet -------------------------------------------------------------------------------
def gguf_to_tensors(source) -> tuple[Config, dict[str, np.ndarray]]:
    """Read a BitNet GGUF file (path or GGUFFile) into (Config, tensors in the released HF naming).

    Projections come out as the released packed layout (uint8 [N/4, K], docs/SPEC.md §4) with a float32 [1]
    ``weight_scale``; norms as float32; the embedding (and an untied output head) as
    refbitnet.gguf.tables.float_table gives it: F32/F16/BF16 as stored (a view of the memory-mapped
    file, never widened as a whole), Q8_0/Q6_K/Q4_K dequantized by the gguf package into bf16 bits.
    """
    from .. import layouts

    gf = source if isinstance(source, GGUFFile) else read_gguf(source)
    config = gguf_config(gf)
    per_layer = len(NORMS) + len(PROJECTIONS)
    if config.num_hidden_layers * per_layer > len(gf.tensors):     # before listing millions of names
        raise GGUFError(f"{gf.path}: block_count {config.num_hidden_layers} needs {per_layer} tensors per "
                        f"layer, but the file has {len(gf.tensors)} tensors in all")
    expected = expected_tensor_names(config)
    if not config.tie_word_embeddings:
        expected.append("output.weight")
    found = set(gf.tensors)
    missing = [n for n in expected if n not in found]
    # llama.cpp's "bitnet" graph multiplies a projection's output by an optional one-element
    # "blk.{i}.{proj}.scale" tensor (some converters store weight_scale there): folded into the scale.
    optional_scales = {g[:-len("weight")] + "scale" for i in range(config.num_hidden_layers)
                       for g, _, _ in layer_projections(config, i)}
    extra = sorted(found - set(expected) - optional_scales)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)")
        raise GGUFError(f"{gf.path}: tensor set is not that of a BitNet b1.58 model with "
                        f"{config.num_hidden_layers} layers: {'; '.join(parts)}")

    d, v = config.hidden_size, config.vocab_size
    shapes = {"token_embd.weight": (v, d), "output.weight": (v, d), "output_norm.weight": (d,)}
    projections = set()
    for i in range(config.num_hidden_layers):
        shapes.update({g: (width,) for g, _, width in layer_norms(config, i)})
        shapes.update({g: nk for g, _, nk in layer_projections(config, i)})
        projections.update(g for g, _, _ in layer_projections(config, i))

    tensors: dict[str, np.ndarray] = {}
    for name in expected:
        t = gf.tensors[name]
        if t.shape != shapes[name]:
            raise GGUFError(f"{gf.path}: tensor {name!r}: expected shape {list(shapes[name])}, "
                            f"found {list(t.shape)}")
        hf = gguf_to_hf_name(name)
        if name in projections:
            if t.type_id not in TERNARY_TYPES:
                raise GGUFError(f"{gf.path}: tensor {name!r}: expected a ternary type (I2_S, TQ1_0, TQ2_0), "
                                f"found {t.type_name}")
            codes, scale = decode_ternary(gf, name)
            scale = _fold_scale_tensor(gf, name[: -len("weight")] + "scale", scale)
            tensors[hf] = layouts.pack_hf(codes)
            tensors[hf + "_scale"] = np.array([scale], dtype=np.float32)
        elif name in ("token_embd.weight", "output.weight"):
            tensors[hf] = float_table(gf, name)                  # [V, D] float32 / float16 / bf16 bits
            check_finite(tensors[hf], f"{gf.path}: tensor {name!r} ({t.type_name})")
        else:
            if t.type_id not in (F32, F16, BF16):
                raise GGUFError(f"{gf.path}: tensor {name!r}: expected F32, F16 or BF16, found {t.type_name}")
            arr = gf.array(name)
            tensors[hf] = bf16_to_f32(arr) if arr.dtype == np.uint16 else np.asarray(arr, dtype=np.float32)
            check_finite(tensors[hf], f"{gf.path}: tensor {name!r} ({t.type_name})")
    return config, tensors


def _fold_scale_tensor(gf: GGUFFile, name: str, scale: np.float32) -> np.float32:
    """scale times the file's one-element F32 tensor ``name`` if it has one."""
    if name not in gf.tensors:
        return scale
    e = gf.tensors[name]
    if e.type_id != F32 or int(np.prod(e.shape)) != 1:
        raise GGUFError(f"{gf.path}: tensor {name!r}: expected one F32 value, found "
                        f"{e.type_name} shape {list(e.shape)}")
    factor = np.float32(gf.raw(name).view("<f4")[0])
    if not (np.isfinite(factor) and factor > 0):
        raise GGUFError(f"{gf.path}: tensor {name!r}: expected a positive scale, found {factor}")
    return np.float32(scale * factor)


def load_gguf(path, *, numerics: str = "int", backend: str = "auto", tokenizer: bool = True):
    """Load a BitNet b1.58 GGUF file (I2_S, TQ1_0 or TQ2_0 projections) as a refbitnet Model.

    numerics and backend as refbitnet.load. The Numba LM head reads bf16 bits: with backend "numba" an
    F16/F32 table is converted to bf16 if every value is a bf16 value (GGUFError otherwise); with "auto"
    it is converted when exact and kept as it is otherwise. With tokenizer=True the file's vocabulary
    becomes ``model.tokenizer`` (None if the file has none, or if it lacks <|begin_of_text|>,
    <|end_of_text|>, <|eot_id|>)."""
    from ..checkpoint import model_from_tensors
    from ..errors import TokenizerError
    from .tokenizer_meta import gguf_tokenizer

    gf = read_gguf(path)
    config, tensors = gguf_to_tensors(gf)
    tok = None
    if tokenizer:
        try:
            tok = gguf_tokenizer(gf)
        except TokenizerError:
            tok = None
    if backend == "numba" or (backend == "auto" and numerics == "int"):
        for hf in ("model.embed_tokens.weight", "lm_head.weight"):
            if hf in tensors and tensors[hf].dtype != np.uint16:
                try:
                    tensors[hf] = exact_bf16(tensors[hf], f"{os.fspath(path)}: {hf}")
                except GGUFError:
                    if backend == "numba":
                        raise
    return model_from_tensors(config, tensors, source=os.fspath(path), numerics=numerics, backend=backend,
                              tokenizer=tok)
