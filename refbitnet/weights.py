"""The model's parameters as the release stores them, and the one place release-named tensors are checked.

``model_weights(config, tensors)`` turns {checkpoint name: array} into ``ModelWeights``: projections stay
2-bit packed in the Hugging Face layout (uint8 [N/4, K], memory-mapped when they come from a file), the
embedding stays bf16 bits (uint16 [V, D]); nothing is widened to float32 as a whole. Every name, shape,
dtype and value range is checked here once, with errors naming the source and the tensor, so the forward
pass (refbitnet.model) and the fast path (refbitnet.runtime) trust what they are given.

The weight_scale convention. 2B4T's checkpoint (``quantization_config.linear_class: "autobitlinear"``)
stores weight_scale = mean|W| and its output is MULTIPLIED by it. transformers' legacy ``BitLinear`` (a
``quantization_config`` without ``linear_class``, or ``"bitlinear"``; what onebitllms writes) DIVIDES by
the stored value. refbitnet computes ``y = acc / s * weight_scale`` for both: a divide-convention file's
stored scales are replaced at load by their float32 reciprocals (within one float32 rounding of the
legacy ``acc / (s * stored)``), and ``ModelWeights.scale_convention`` says which the file declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .bf16 import bf16_to_f32, f32_to_bf16
from .config import NORMS, PROJECTIONS, Config, projection_shapes, tensor_name
from .errors import CheckpointError, ConfigError, RefBitNetError, RefBitNetTypeError
from .layouts import pack_hf, unpack_hf
from .quant import absmean_ternary

SCALE_CONVENTIONS = ("multiply", "divide")


@dataclass
class TernaryWeight:
    """One projection as the release stores it: codes packed in the HF layout, one float32 scale.

    packed: uint8 [N/4, K] (maybe memory-mapped); weight_scale: float32 scalar that the output is multiplied by.
    """
    packed: np.ndarray
    weight_scale: np.float32

    @property
    def shape(self):
        """(N, K) of the unpacked codes."""
        return (self.packed.shape[0] * 4, self.packed.shape[1])

    def codes(self) -> np.ndarray:
        """Ternary codes int8 [N, K], unpacked on every call (not kept: memory stays at 2 bits per weight)."""
        return unpack_hf(np.asarray(self.packed))


@dataclass
class LayerWeights:
    """One decoder layer. Norm weights float32 ([D] except ffn_sub_norm [F]); projections ternary."""
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    attn_sub_norm: np.ndarray
    ffn_sub_norm: np.ndarray
    q_proj: TernaryWeight            # [H*HD, D]
    k_proj: TernaryWeight            # [KVH*HD, D]
    v_proj: TernaryWeight            # [KVH*HD, D]
    o_proj: TernaryWeight            # [D, H*HD]
    gate_proj: TernaryWeight         # [F, D]
    up_proj: TernaryWeight           # [F, D]
    down_proj: TernaryWeight         # [D, F]

    def ternary(self, name: str) -> TernaryWeight:
        """The projection by its checkpoint name ("q_proj" ... "down_proj")."""
        return getattr(self, name)


@dataclass
class ModelWeights:
    """All parameters. embed_tokens (and lm_head if untied) [V, D] as bf16 bits uint16 (or float16/32);
    norm float32 [D]; layers a list of LayerWeights."""
    embed_tokens: np.ndarray
    layers: list
    norm: np.ndarray
    lm_head: np.ndarray | None = None
    source_format: str = "packed"        # "packed" (uint8 + weight_scale) or "bf16-master" (quantized at load)
    scale_convention: str = "multiply"   # what the file's weight_scale meant (see the module docstring)

    @property
    def output_table(self) -> np.ndarray:
        """The LM head matrix [V, D]: the embedding when tied (2B4T)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def release_tensors(self) -> dict:
        """The weights as release-format tensors by checkpoint name (what refbitnet.save writes): projections
        uint8 [N/4, K] + weight_scale float32 [1] (multiply convention); tables as stored; norms float32."""
        t = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            t["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for norm, module in NORMS:
                t[tensor_name(i, norm, module)] = getattr(layer, norm)
            for proj, module in PROJECTIONS:
                w = layer.ternary(proj)
                t[tensor_name(i, proj, module)] = w.packed
                t[tensor_name(i, proj, module, "weight_scale")] = np.array([w.weight_scale], dtype=np.float32)
        return t


def scale_convention(quantization_config, source: str = "config") -> str:
    """"multiply" or "divide": what a packed checkpoint's weight_scale means, from its quantization_config
    (see the module docstring). A packed checkpoint must declare one: no quantization_config is refused."""
    if quantization_config is None:
        raise ConfigError(f"{source}: quantization_config: expected one (a packed checkpoint's weight_scale is "
                          f"multiplied with linear_class 'autobitlinear' and divided with the legacy 'bitlinear'), "
                          f"found none")
    linear_class = quantization_config.get("linear_class")
    if linear_class == "autobitlinear":
        return "multiply"
    if linear_class in (None, "bitlinear"):
        return "divide"
    raise ConfigError(f"{source}: quantization_config.linear_class: expected 'autobitlinear' (weight_scale "
                      f"multiplies) or 'bitlinear' / absent (it divides), found {linear_class!r}")


def model_weights(config: Config, tensors: Mapping, *, source: str = "tensors",
                  convention: str = "multiply") -> ModelWeights:
    """Check release-named tensors against config and turn them into ModelWeights.

    tensors: {name: array}. Projections either packed (uint8 [N/4, K] + "<proj>.weight_scale" of one
    value: float32, float16, or bf16 bits as uint16) or master (float [N, K], or bf16 bits uint16 [N, K]:
    quantized here with absmean, gamma rounded to bf16 as the packed export stores it). Embedding /
    lm_head: bf16 bits uint16 (kept as given, e.g. memory-mapped) or float16/float32 [V, D]. Norms: bf16
    bits or float [D] ([F] for ffn_sub_norm), widened to float32. convention: what a packed weight_scale
    means, "multiply" (2B4T) or "divide" (legacy BitLinear; see scale_convention()).
    Raises CheckpointError naming source, tensor, expected and found on any mismatch.
    """
    if not isinstance(config, Config):
        raise RefBitNetTypeError(f"config: expected a refbitnet Config, found {type(config).__name__}")
    if not isinstance(tensors, Mapping):
        raise RefBitNetTypeError(f"tensors: expected a mapping of name -> array, found {type(tensors).__name__}")
    if convention not in SCALE_CONVENTIONS:
        raise RefBitNetError(f"convention: expected one of {SCALE_CONVENTIONS}, found {convention!r}")
    cfg = config
    d, f_size, v_size = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = projection_shapes(cfg)
    used = set()

    def get(name, what):
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name}: missing (expected {what})")
        used.add(name)
        a = tensors[name]
        if not isinstance(a, np.ndarray):
            raise CheckpointError(f"{source}: tensor {name}: expected a numpy array, found {type(a).__name__}")
        return a

    def table(name):
        a = get(name, f"[{v_size}, {d}] bf16")
        _expect(source, name, a, (v_size, d), (np.uint16, np.float16, np.float32), "bf16 (uint16 bits) or float")
        return _finite_bf16_bits(source, name, a) if a.dtype == np.uint16 else _finite(source, name, a)

    def vector(name, size):
        a = get(name, f"[{size}] bf16")
        _expect(source, name, a, (size,), (np.uint16, np.float16, np.float32), "bf16 (uint16 bits) or float")
        return _finite(source, name, bf16_to_f32(np.asarray(a)) if a.dtype == np.uint16 else a.astype(np.float32))

    # The format is what layer 0's q_proj is; every projection must then agree.
    first = tensor_name(0, "q_proj", "self_attn")
    if first not in tensors:
        raise CheckpointError(f"{source}: tensor {first}: missing (expected the first projection)")
    packed_format = np.asarray(tensors[first]).dtype == np.uint8

    def packed_projection(name, n, k):
        a = get(name, f"uint8 [{n // 4}, {k}] (packed format)")
        _expect(source, name, a, (n // 4, k), (np.uint8,), "uint8 (packed format, like layer 0 q_proj)")
        _check_packed_codes(source, name, a)
        scale_name = name[: -len("weight")] + "weight_scale"
        s = get(scale_name, "one weight_scale value")
        if s.size != 1 or s.ndim > 1 or s.dtype not in (np.uint16, np.float16, np.float32):
            raise CheckpointError(f"{source}: tensor {scale_name}: expected shape [1] bf16/float, found "
                                  f"shape {list(s.shape)} dtype {s.dtype}")
        scale = bf16_to_f32(np.asarray(s).reshape(1)) if s.dtype == np.uint16 else np.asarray(s, np.float32)
        scale = np.float32(scale.reshape(()))
        if not (np.isfinite(scale) and scale > 0):
            raise CheckpointError(f"{source}: tensor {scale_name}: expected a positive finite scale, found {scale}")
        if convention == "divide":
            scale = np.float32(1.0) / scale
            if not np.isfinite(scale):
                raise CheckpointError(f"{source}: tensor {scale_name}: a divide-convention scale {s!r} has no "
                                      f"finite float32 reciprocal")
        return TernaryWeight(a, scale)

    def master_projection(name, n, k):
        a = get(name, f"[{n}, {k}] bf16 (bf16-master format, like layer 0 q_proj)")
        _expect(source, name, a, (n, k), (np.uint16, np.float16, np.float32),
                "bf16 (uint16 bits) or float (bf16-master format, like layer 0 q_proj)")
        w = bf16_to_f32(np.asarray(a)) if a.dtype == np.uint16 else np.asarray(a, dtype=np.float32)  # [N, K]
        try:
            codes, gamma = absmean_ternary(w)
        except RefBitNetError as e:
            raise CheckpointError(f"{source}: tensor {name}: {e}") from None
        weight_scale = bf16_to_f32(f32_to_bf16(np.array([gamma], dtype=np.float32)))[0]   # as the export stores it
        return TernaryWeight(pack_hf(codes), np.float32(weight_scale))

    projection = packed_projection if packed_format else master_projection
    embed_tokens = table("model.embed_tokens.weight")
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = table("lm_head.weight")
    elif "lm_head.weight" in tensors:
        used.add("lm_head.weight")       # tied: the embedding is the head (transformers ignores it too)
    layers = []
    for i in range(cfg.num_hidden_layers):
        norms = {norm: vector(tensor_name(i, norm, module), f_size if norm == "ffn_sub_norm" else d)
                 for norm, module in NORMS}
        projs = {proj: projection(tensor_name(i, proj, module), *shapes[proj]) for proj, module in PROJECTIONS}
        layers.append(LayerWeights(**norms, **projs))
    norm = vector("model.norm.weight", d)
    unexpected = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) for a config with {cfg.num_hidden_layers} layers "
                              f"(tie_word_embeddings={cfg.tie_word_embeddings}): {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    return ModelWeights(embed_tokens, layers, norm, lm_head,
                        source_format="packed" if packed_format else "bf16-master",
                        scale_convention=convention if packed_format else "multiply")


def _expect(source, name, a, shape, dtypes, dtype_text):
    if a.dtype not in dtypes:
        raise CheckpointError(f"{source}: tensor {name}: expected dtype {dtype_text}, found {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{source}: tensor {name}: expected shape {list(shape)} (from the config), "
                              f"found {list(a.shape)}")


def _finite(source, name, a):
    if not np.isfinite(a).all():
        raise CheckpointError(f"{source}: tensor {name}: expected finite values, found NaN or inf")
    return a


def _finite_bf16_bits(source, name, bits):
    """Reject bf16 NaN / inf (all exponent bits set), a block of rows at a time, each read from the file for
    a memory-mapped table (read_rows), so validating leaves none of its pages resident."""
    rows = max(1, (1 << 22) // max(1, bits.shape[1]))
    for r0 in range(0, bits.shape[0], rows):
        block = read_rows(bits, r0, min(bits.shape[0], r0 + rows))
        bad = (block & np.uint16(0x7F80)) == np.uint16(0x7F80)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise CheckpointError(f"{source}: tensor {name}: expected finite values, found bf16 bits "
                                  f"0x{int(block[r, c]):04x} (NaN or inf) at [{r0 + r}, {c}]")
    return bits


def _check_packed_codes(source, name, packed):
    """Reject a 2-bit field equal to 3 (no encoder writes it; unpacking would give the weight +2)."""
    if packed.size == 0:
        return
    p_all = read_private(packed)          # a file read for a memmap: validating leaves no pages resident
    rows = max(1, (1 << 22) // max(1, packed.shape[1]))
    for r0 in range(0, packed.shape[0], rows):
        p = p_all[r0:r0 + rows]
        bad = p & (p >> 1) & np.uint8(0x55)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise CheckpointError(f"{source}: tensor {name}: expected 2-bit codes in {{0, 1, 2}}, found byte "
                                  f"0x{int(p[r, c]):02x} (a field equal to 3) at [{r0 + r}, {c}]")


def _whole_file_mapping(a: np.ndarray) -> bool:
    """Whether a is an np.memmap as opened (not a view: a view keeps its parent's filename and offset)."""
    import mmap
    return isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and bool(a.filename)


def read_rows(a: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows r0 .. r1-1 of a C-contiguous a in fresh memory. For a whole np.memmap this is a file read
    (np.fromfile), which, unlike reading through the mapping, does not leave the pages counted in this
    process's memory."""
    if _whole_file_mapping(a):
        row = a.size // a.shape[0] if a.shape[0] else 0
        return np.fromfile(a.filename, dtype=a.dtype, count=(r1 - r0) * row,
                           offset=a.offset + r0 * row * a.itemsize).reshape((r1 - r0,) + a.shape[1:])
    return np.array(a[r0:r1])


def read_private(a: np.ndarray) -> np.ndarray:
    """An array's values in fresh memory (read_rows of all its rows; a copy for an array already in memory)."""
    return read_rows(a, 0, a.shape[0]) if a.ndim else np.array(a)


def in_memory(a: np.ndarray) -> np.ndarray:
    """a itself if it is in this process's memory; for a whole np.memmap, its values read from the file into
    fresh memory (read_private), which NumPy backs with transparent huge pages where it is 4 MiB or more."""
    return read_private(a) if _whole_file_mapping(a) else a
