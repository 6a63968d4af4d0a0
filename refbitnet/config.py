"""The model configuration: the sizes of a BitNet b1.58 transformer, read from a HF ``config.json``.

Dimension legend (used in shape comments across refbitnet; 2B4T values in brackets):

    S    tokens in the current block (prompt length at prefill, 1 per decode step)
    T    tokens attended to (cache length after appending the block)
    D    hidden_size                 [2560]
    F    intermediate_size           [6912]   width of the feed-forward block
    L    num_hidden_layers           [30]
    H    num_attention_heads         [20]
    KVH  num_key_value_heads         [5]      query head h reads KV head h // (H // KVH)
    HD   head_dim = D // H           [128]
    V    vocab_size                  [128256]

Field names are Hugging Face's, so ``Config.from_json("config.json")`` reads the released file and
``to_dict()`` writes one transformers reads back. One trap: ``transformers.BitNetConfig()`` defaults
``tie_word_embeddings`` to False and ``max_position_embeddings`` to 2048, while the released 2B4T says
True and 4096. This class defaults to the released values, and ``to_dict`` always writes both keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .errors import ConfigError

ARCHITECTURES = ("BitNetForCausalLM", "BitnetForCausalLM")   # the second: older converters' spelling
RELEASE_QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                               "quantization_mode": "offline"}
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


# The seven projections of a decoder layer in checkpoint order, as (name, module) in
# "model.layers.{i}.{module}.{name}.weight", and its four norms ((name, None): directly under the layer).
# This is the one table of them; projection_shapes(config) gives each one's [N out, K in].
PROJECTIONS = (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"),
               ("o_proj", "self_attn"), ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"))
NORMS = (("input_layernorm", None), ("post_attention_layernorm", None),
         ("attn_sub_norm", "self_attn"), ("ffn_sub_norm", "mlp"))


def tensor_name(i: int, name: str, module: str | None = None, suffix: str = "weight") -> str:
    """Checkpoint tensor name: tensor_name(3, "q_proj", "self_attn") -> model.layers.3.self_attn.q_proj.weight."""
    mid = f"{module}.{name}" if module else name
    return f"model.layers.{i}.{mid}.{suffix}"


def projection_shapes(config: "Config") -> dict[str, tuple[int, int]]:
    """Projection name -> (N out, K in) of one layer: q [H*HD, D], k/v [KVH*HD, D], o [D, H*HD],
    gate/up [F, D], down [D, F]."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


@dataclass(frozen=True)
class Config:
    """Sizes and constants of one BitNet b1.58 model. Construct directly, or with from_json / from_dict."""

    hidden_size: int                         # D
    intermediate_size: int                   # F
    num_hidden_layers: int                   # L
    num_attention_heads: int                 # H
    num_key_value_heads: int                 # KVH
    vocab_size: int                          # V
    max_position_embeddings: int = 4096      # longest context (positions 0 .. max-1)
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    tie_word_embeddings: bool = True         # LM head = embedding (2B4T); False needs lm_head.weight
    hidden_act: str = "relu2"
    quantization_config: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        for key in _SIZE_KEYS + ("max_position_embeddings",):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config {key}: expected a positive integer, found {value!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"config {key}: expected a positive number (finite), found {value!r}")
        if self.hidden_act != "relu2":
            raise ConfigError(f"config hidden_act: expected 'relu2' (BitNet b1.58), found {self.hidden_act!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config tie_word_embeddings: expected true/false, found {self.tie_word_embeddings!r}")
        d, h, kvh = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if d % h:
            raise ConfigError(f"config: hidden_size {d} is not divisible by num_attention_heads {h}")
        if h % kvh:
            raise ConfigError(f"config: num_attention_heads {h} is not divisible by num_key_value_heads {kvh}")
        if (d // h) % 2:
            raise ConfigError(f"config: head_dim = hidden_size / num_attention_heads = {d // h} must be even "
                              f"(RoPE rotates pairs i, i + head_dim/2)")
        # The packed layout stores 4 output rows per byte and the kernel layout 4 input columns per byte.
        for name, n in (("hidden_size", d), ("intermediate_size", self.intermediate_size),
                        ("num_key_value_heads * head_dim", kvh * (d // h))):
            if n % 4:
                raise ConfigError(f"config: {name} = {n} must be a multiple of 4 (2-bit packing puts 4 weights "
                                  f"in a byte)")
        for key in ("bos_token_id",):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ConfigError(f"config {key}: expected a token id in [0, {self.vocab_size}), found {value!r}")
        for eos in self.eos_ids:
            if not (isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < self.vocab_size):
                raise ConfigError(f"config eos_token_id: expected token ids in [0, {self.vocab_size}), "
                                  f"found {self.eos_token_id!r}")

    # -- derived sizes ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """HD = D // H."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (H // KVH); query head h reads KV head h // kv_groups."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_parameters(self) -> int:
        """Parameter count: embedding (+ untied head), 7 projections and 4 norms per layer, final norm.
        2B4T: 328,335,360 + 30 x 69,468,160 + 30 x 14,592 + 2,560 = 2,412,820,480 (docs/SPEC.md §1)."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        projections = d * d * 2 + 2 * kv * d + 3 * f * d          # q, o; k, v; gate, up, down
        norms = 3 * d + f
        tables = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return tables + self.num_hidden_layers * (projections + norms) + d

    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (config.json allows an int, a list or null)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, (list, tuple)):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    # -- reading and writing config.json -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """Build from a HF config dict; ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        archs = d.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not any(a in ARCHITECTURES for a in archs):
                raise ConfigError(f"{source}: architectures: expected one of {list(ARCHITECTURES)}, found {archs!r}")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "bitnet":
            raise ConfigError(f"{source}: model_type: expected 'bitnet', found {model_type!r}")
        missing = [k for k in _SIZE_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        head_dim = d.get("head_dim")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        sizes_are_ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads))
        if head_dim is not None and sizes_are_ints and head_dim != hidden // heads:   # else __post_init__ says why
            raise ConfigError(f"{source}: head_dim: expected hidden_size / num_attention_heads = "
                              f"{hidden // heads}, found {head_dim!r}")
        # RoPE: older files say rope_theta; transformers 5 writes rope_parameters {rope_type, rope_theta}.
        rope_theta = d.get("rope_theta")
        rope_parameters = d.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type: expected 'default', found {rope_type!r}")
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling: expected null (BitNet uses plain RoPE), "
                              f"found {d['rope_scaling']!r}")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias: expected false (BitNet has no biases), found true")
        kwargs = {k: d[k] for k in _SIZE_KEYS}
        for key in ("max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
                    "tie_word_embeddings", "hidden_act", "quantization_config"):
            if key in d:
                kwargs[key] = d[key]
        if rope_theta is not None:
            kwargs["rope_theta"] = rope_theta
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path) -> "Config":
        """Read a HF ``config.json``."""
        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isfile(path):   # a FIFO would block, /dev/zero never end
            raise ConfigError(f"{path}: expected a regular file (a HF config.json), found "
                              f"{'a directory' if os.path.isdir(path) else 'a FIFO, device or socket'}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (expected a HF config.json)") from None
        except (ValueError, RecursionError) as e:     # bad UTF-8, bad JSON, a 5000-digit number, deep nesting
            raise ConfigError(f"{path}: expected JSON, found invalid content ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict:
        """A HF-style config dict (what ``config.json`` of the released model holds)."""
        d = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            d[f.name] = value
        d.update({"num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                  "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
                  "use_cache": True})
        return d

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: BitNet b1.58 2B4T (microsoft/bitnet-b1.58-2B-4T), docs/SPEC.md §1.
BITNET_2B4T = Config(
    hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
    num_key_value_heads=5, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
    rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True,
    quantization_config=dict(RELEASE_QUANTIZATION_CONFIG))
