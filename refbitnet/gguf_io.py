"""GGUF interchange: read bitnet.cpp (I2_S) and llama.cpp (TQ1_0, TQ2_0) files, write I2_S and TQ2_0 files.

What the two runtimes expect (SPEC §5, and their converters):

    runtime      arch name        projections         embedding   norms   tied LM head
    bitnet.cpp   "bitnet-b1.58"   I2_S  (type id 36)  F16         F32     yes, no output.weight
    llama.cpp    "bitnet"         TQ2_0 (35) / TQ1_0 (34)  F16    F32     yes, no output.weight

Tensor names (GGUF -> the released HF names refbitnet uses)::

    token_embd.weight            model.embed_tokens.weight                 [V, D]
    output_norm.weight           model.norm.weight                         [D]
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
that holds a nonzero code, and we read it back as the per-tensor scale. Writing rounds the float32
scale to fp16 once: the relative error is at most 2**-11 (half an fp16 ulp) for scales in fp16's normal
range [6.1e-5, 65504]; smaller scales lose precision (fp16 subnormals) and larger ones are refused.
Embeddings are written as F16: bf16 values with |x| >= 2**-14 convert exactly; smaller ones are
rounded to the fp16 subnormal grid (absolute error <= 2**-25).

Public API: ``load_gguf(path) -> Model`` (with the file's tokenizer), ``gguf_to_tensors(path) ->
(Config, tensors)``, ``save_gguf(model or model dir, path, layout=...)``, ``write_gguf(path, config,
tensors, ...)``, ``read_gguf(path) -> GGUFFile`` (metadata, tensor table, raw bytes), ``describe(path)``;
command line ``python -m refbitnet.gguf_io info FILE`` / ``export MODEL_DIR OUT.gguf --layout i2_s``.

Reading uses our own small GGUF parser rather than ``gguf.GGUFReader``: the reader in the ``gguf``
package does not know type id 36 (I2_S) and fails on it, and we want every malformed file to raise a
:class:`~refbitnet.errors.GGUFError` that names the file, tensor and offset. Writing uses
``gguf.GGUFWriter`` (I2_S tensors are added by raw type id).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .bf16 import bf16_to_f32, f32_to_bf16
from .config import Config
from .errors import GGUFError

# ---- GGML tensor types refbitnet reads -------------------------------------------------------------
F32, F16, BF16 = 0, 1, 30
TQ1_0, TQ2_0 = 34, 35
I2_S = 36                      # bitnet.cpp's ggml fork only
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", I2_S: "I2_S"}
TERNARY_TYPES = (I2_S, TQ1_0, TQ2_0)
LAYOUT_TYPES = {"i2_s": I2_S, "tq2_0": TQ2_0, "tq1_0": TQ1_0}

# general.file_type (llama_ftype) written for each layout: bitnet.cpp's MOSTLY_I2_S is 40 in its fork.
FILE_TYPES = {"i2_s": 40, "tq1_0": 36, "tq2_0": 37}
ARCH_BY_LAYOUT = {"i2_s": "bitnet-b1.58", "tq2_0": "bitnet", "tq1_0": "bitnet"}
# bitnet.cpp's llama.cpp fork runs "bitnet-25" files with the same graph as "bitnet-b1.58".
BITNET_ARCHS = ("bitnet-b1.58", "bitnet-25", "bitnet")

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 16         # arrays of arrays: real files use one level

# ---- names -------------------------------------------------------------------------------------------
PROJECTIONS = {  # gguf suffix -> HF name inside model.layers.{i}
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NORMS = {
    "attn_norm": "input_layernorm", "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_norm": "post_attention_layernorm", "ffn_sub_norm": "mlp.ffn_sub_norm",
}


def projection_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """gguf projection suffix -> [N out, K in] for one layer."""
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    return {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
            "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if not a BitNet tensor)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdecimal() and parts[3] == "weight":
        hf = PROJECTIONS.get(parts[2]) or LAYER_NORMS.get(parts[2])
        if hf is not None:
            return f"model.layers.{int(parts[1])}.{hf}.weight"
    return None


# =====================================================================================================
# Reading: a small, bounds-checked GGUF parser
# =====================================================================================================
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_SCALAR_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                  6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry in a GGUF file. shape is in numpy order ([N, K] for a projection), the reverse
    of GGUF's ne[] list; offset is absolute in the file; nbytes is what the type and shape imply."""
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


def tensor_nbytes(type_id: int, shape: tuple[int, ...], name: str = "tensor", path: str = "GGUF") -> int:
    """Bytes a tensor of this GGML type and numpy shape occupies; GGUFError for types refbitnet cannot read."""
    n = math.prod(shape)
    row = shape[-1] if shape else 1
    if type_id == F32:
        return 4 * n
    if type_id in (F16, BF16):
        return 2 * n
    if type_id in (TQ1_0, TQ2_0):
        if row % 256:
            raise GGUFError(f"{path}: tensor {name!r} of type {TYPE_NAMES[type_id]}: row length {row} is not "
                            f"a multiple of the 256-element block")
        return (n // 256) * (54 if type_id == TQ1_0 else 66)
    if type_id == I2_S:
        if n % 4:
            raise GGUFError(f"{path}: tensor {name!r} of type I2_S: {n} elements is not a multiple of 4")
        return n // 4 + 32            # 2-bit codes, then 32 bytes whose first 4 are the float32 scale
    known = _ggml_type_name(type_id)
    if known is not None:
        raise GGUFError(f"{path}: tensor {name!r} has type {known} ({type_id}); refbitnet reads "
                        f"F32, F16, BF16, I2_S, TQ1_0 and TQ2_0 tensors")
    raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type id {type_id} (expected one of "
                    f"{sorted(TYPE_NAMES)}: {', '.join(TYPE_NAMES[t] for t in sorted(TYPE_NAMES))})")


def _ggml_type_name(type_id: int) -> str | None:
    try:
        import gguf
        return gguf.GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return None


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> value; arrays of numbers as numpy arrays, strings as str)
    and ``tensors`` (name -> :class:`GGUFTensor`). Tensor bytes are read lazily from a memory map."""

    def __init__(self, path, metadata: dict[str, Any], tensors: dict[str, GGUFTensor], version: int,
                 data: np.ndarray):
        self.path = os.fspath(path)
        self.metadata = metadata
        self.tensors = tensors
        self.version = version
        self._data = data            # uint8 memmap of the whole file

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array (a view of the memory map)."""
        t = self._tensor(name)
        return self._data[t.offset:t.offset + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        """A float tensor in numpy shape: F32 as a float32 view, F16 widened to float32 (exact), BF16 as
        its bits (uint16; widen with refbitnet.bf16.bf16_to_f32). Ternary tensors: use raw()."""
        t = self._tensor(name)
        raw = self.raw(name)
        if t.type_id == F32:
            return raw.view("<f4").reshape(t.shape)
        if t.type_id == F16:
            return raw.view("<f2").reshape(t.shape).astype(np.float32)
        if t.type_id == BF16:
            return raw.view("<u2").reshape(t.shape)
        raise GGUFError(f"{self.path}: tensor {name!r}: expected a float tensor (F32, F16, BF16), "
                        f"found {t.type_name}")

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def _tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, arch={self.get('general.architecture')!r}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


class _Cursor:
    """Reads little-endian values from a bytes-like buffer, raising GGUFError past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"but the file has {self.size} bytes")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " length")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what + " element type")
            count = self.scalar("<Q", what + " element count")
            if etype in _SCALAR_DTYPES:
                dtype = np.dtype(_SCALAR_DTYPES[etype]).newbyteorder("<")
                raw = self.take(count * dtype.itemsize, f"{what} ({count} elements)")
                return np.frombuffer(raw, dtype=dtype).copy()
            if etype == _STRING:
                if count > self.size - self.pos:      # every string needs at least 8 bytes
                    raise GGUFError(f"{self.path}: truncated file: {what} claims {count} strings at offset "
                                    f"{self.pos}, more than the file holds")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _ARRAY:
                if count > self.size - self.pos:
                    raise GGUFError(f"{self.path}: truncated file: {what} claims {count} arrays")
                if depth >= MAX_ARRAY_NESTING:        # a hostile file must not exhaust Python's stack
                    raise GGUFError(f"{self.path}: {what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
                return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise GGUFError(f"{self.path}: {what}: unknown array element type {etype}")
        raise GGUFError(f"{self.path}: {what}: unknown metadata value type {vtype}")


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table, and check every tensor's data lies inside
    the file without overlapping another. Raises GGUFError on anything malformed."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise GGUFError(f"{path}: empty file (expected a GGUF file)")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise GGUFError(f"{path}: file not found (expected a GGUF file)") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory (expected a GGUF file)") from None
    data = np.frombuffer(mm, dtype=np.uint8)
    cur = _Cursor(memoryview(mm), path)

    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: expected magic b'GGUF', found {magic!r}")
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise GGUFError(f"{path}: big-endian GGUF file; refbitnet reads little-endian files only")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    if n_tensors > size or n_kv > size:
        raise GGUFError(f"{path}: corrupt header: {n_tensors} tensors, {n_kv} metadata entries in a "
                        f"{size}-byte file")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"type of metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.scalar("<I", f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:          # 0 dimensions is a scalar (ggml reads it as [1])
            raise GGUFError(f"{path}: tensor {name!r}: expected at most {MAX_DIMS} dimensions, found {n_dims}")
        ne = [cur.scalar("<Q", f"dimension of tensor {name!r}") for _ in range(n_dims)]
        type_id = cur.scalar("<I", f"type of tensor {name!r}")
        rel = cur.scalar("<Q", f"offset of tensor {name!r}")
        if any(d == 0 or d > size * 8 for d in ne):
            raise GGUFError(f"{path}: tensor {name!r}: implausible dimensions {ne}")
        infos.append((name, tuple(reversed(ne)), type_id, rel))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment: expected a power of two, found {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, type_id, rel in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        nbytes = tensor_nbytes(type_id, shape, name, path)
        if rel % alignment:
            raise GGUFError(f"{path}: tensor {name!r}: data offset {rel} is not a multiple of the "
                            f"alignment {alignment}")
        offset = data_start + rel
        if offset + nbytes > size:
            raise GGUFError(f"{path}: truncated file or wrong size: tensor {name!r} ({TYPE_NAMES[type_id]}, "
                            f"shape {list(shape)}) needs {nbytes} bytes at offset {offset}, but the file "
                            f"ends at {size}")
        tensors[name] = GGUFTensor(name, shape, type_id, offset, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(f"{path}: tensor {a.name!r} ({a.type_name}, shape {list(a.shape)}) needs {a.nbytes} "
                            f"bytes but tensor {b.name!r} starts {b.offset - a.offset} bytes after it: "
                            f"its byte size does not match its shape")
        # Writers (gguf-py, llama.cpp) place each tensor at the aligned end of the previous one, and
        # ggml's reader insists on it: a larger gap means a type or shape that claims too few bytes
        # (e.g. an F32 norm relabelled F16 would read half its data).
        if b.offset - (a.offset + a.nbytes) >= alignment:
            raise GGUFError(f"{path}: tensor {a.name!r} ({a.type_name}, shape {list(a.shape)}) needs {a.nbytes} "
                            f"bytes but tensor {b.name!r} starts {b.offset - a.offset} bytes after it: "
                            f"a gap of at least the alignment {alignment}; its type or shape does not match its data")
    if ordered and ordered[0].offset - data_start >= alignment:
        raise GGUFError(f"{path}: tensor {ordered[0].name!r}: the data section starts {ordered[0].offset - data_start} "
                        f"bytes before the first tensor (expected less than the alignment {alignment})")
    return GGUFFile(path, metadata, tensors, version, data)


# =====================================================================================================
# GGUF -> refbitnet (Config + tensors in the released HF naming)
# =====================================================================================================
def decode_ternary(gf: GGUFFile, name: str) -> tuple[np.ndarray, np.float32]:
    """A ternary tensor -> (codes int8 [N, K], per-tensor scale float32).

    I2_S carries one scale. TQ1_0/TQ2_0 carry an fp16 d per 256-block; all blocks holding a nonzero code
    must agree (BitNet has one scale per tensor), otherwise GGUFError.
    """
    from . import layouts

    t = gf._tensor(name)
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
    return codes, _per_tensor_scale(codes, d, f"{gf.path}: tensor {name!r} ({t.type_name})")


def _per_tensor_scale(codes: np.ndarray, d: np.ndarray, what: str) -> np.float32:
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
            raise GGUFError(f"{gf.path}: {arch}.{suffix}: expected {'a number' if kind is float else 'an integer'}, "
                            f"found {value!r}")
        return kind(value)

    d = key("embedding_length")
    n_head = key("attention.head_count")
    if d <= 0 or n_head <= 0:
        raise GGUFError(f"{gf.path}: expected positive embedding_length and head_count, found {d} and {n_head}")
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
        raise GGUFError(f"{gf.path}: cannot tell the vocabulary size (no {arch}.vocab_size, no token_embd.weight)")
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


def expected_tensor_names(config: Config) -> list[str]:
    """GGUF tensor names of a BitNet b1.58 model (tied embedding: no output.weight)."""
    names = ["token_embd.weight", "output_norm.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"blk.{i}.{s}.weight" for s in list(LAYER_NORMS) + list(PROJECTIONS)]
    return names


def gguf_to_tensors(source) -> tuple[Config, dict[str, np.ndarray]]:
    """Read a BitNet GGUF file (path or GGUFFile) into (Config, tensors in the released HF naming).

    Projections come out as the released packed layout (uint8 [N/4, K], SPEC §4) with a float32 [1]
    ``weight_scale``; the embedding as it is stored (float16, float32, or bf16 bits as uint16: a view of
    the memory-mapped file, never widened as a whole); norms as float32.
    """
    from . import layouts

    gf = source if isinstance(source, GGUFFile) else read_gguf(source)
    config = gguf_config(gf)
    per_layer = len(LAYER_NORMS) + len(PROJECTIONS)
    if config.num_hidden_layers * per_layer > len(gf.tensors):     # before listing millions of names
        raise GGUFError(f"{gf.path}: block_count {config.num_hidden_layers} needs {per_layer} tensors per layer, "
                        f"but the file has {len(gf.tensors)} tensors in all")
    expected = expected_tensor_names(config)
    if not config.tie_word_embeddings:
        expected.append("output.weight")
    found = set(gf.tensors)
    missing = [n for n in expected if n not in found]
    # llama.cpp's "bitnet" graph multiplies a projection's output by an optional one-element
    # "blk.{i}.{proj}.scale" tensor (some converters store weight_scale there): folded into the scale.
    optional_scales = {f"blk.{i}.{s}.scale" for i in range(config.num_hidden_layers) for s in PROJECTIONS}
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
    proj_shapes = projection_shapes(config)
    for i in range(config.num_hidden_layers):
        for s in LAYER_NORMS:
            shapes[f"blk.{i}.{s}.weight"] = (config.intermediate_size,) if s == "ffn_sub_norm" else (d,)
        for s, nk in proj_shapes.items():
            shapes[f"blk.{i}.{s}.weight"] = nk

    tensors: dict[str, np.ndarray] = {}
    for name in expected:
        t = gf.tensors[name]
        if t.shape != shapes[name]:
            raise GGUFError(f"{gf.path}: tensor {name!r}: expected shape {list(shapes[name])}, "
                            f"found {list(t.shape)}")
        hf = gguf_to_hf_name(name)
        is_projection = name.split(".")[2] in PROJECTIONS if name.startswith("blk.") else False
        if is_projection:
            if t.type_id not in TERNARY_TYPES:
                raise GGUFError(f"{gf.path}: tensor {name!r}: expected a ternary type (I2_S, TQ1_0, TQ2_0), "
                                f"found {t.type_name}")
            codes, scale = decode_ternary(gf, name)
            extra_scale = name[: -len("weight")] + "scale"
            if extra_scale in gf.tensors:
                e = gf.tensors[extra_scale]
                if e.type_id != F32 or int(np.prod(e.shape)) != 1:
                    raise GGUFError(f"{gf.path}: tensor {extra_scale!r}: expected one F32 value, found "
                                    f"{e.type_name} shape {list(e.shape)}")
                factor = np.float32(gf.raw(extra_scale).view("<f4")[0])
                if not (np.isfinite(factor) and factor > 0):
                    raise GGUFError(f"{gf.path}: tensor {extra_scale!r}: expected a positive scale, found {factor}")
                scale = np.float32(scale * factor)
            tensors[hf] = layouts.pack_hf(codes)
            tensors[hf + "_scale"] = np.array([scale], dtype=np.float32)
        else:
            if t.type_id not in (F32, F16, BF16):
                raise GGUFError(f"{gf.path}: tensor {name!r}: expected F32, F16 or BF16, found {t.type_name}")
            if name in ("token_embd.weight", "output.weight"):
                raw = gf.raw(name)
                tensors[hf] = raw.view({F32: "<f4", F16: "<f2", BF16: "<u2"}[t.type_id]).reshape(t.shape)
            else:
                arr = gf.array(name)
                tensors[hf] = bf16_to_f32(arr) if arr.dtype == np.uint16 else np.asarray(arr, dtype=np.float32)
            _check_finite(tensors[hf], f"{gf.path}: tensor {name!r} ({t.type_name})")
    return config, tensors


def _check_finite(a: np.ndarray, what: str, rows: int = 8192) -> None:
    """GGUFError at the first row holding a NaN or inf (checked a block of rows at a time)."""
    for r in range(0, a.shape[0], rows):
        block = a[r:r + rows]
        block = bf16_to_f32(block) if block.dtype == np.uint16 else block
        if not np.isfinite(block).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(block))[0])
            where = (where[0] + r,) + where[1:]
            raise GGUFError(f"{what}: expected finite values, found {block[tuple([where[0] - r, *where[1:]])]} "
                            f"at index {where}")


# Llama-3's pre-tokenizer split (tokenizer.ggml.pre = "llama-bpe"), as in its tokenizer.json.
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                      r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_json_from_metadata(metadata: Mapping[str, Any], source: str = "GGUF") -> dict:
    """Rebuild a HF tokenizer.json (as a dict) from GGUF tokenizer keys of a byte-level BPE vocabulary
    (tokenizer.ggml.model "gpt2"). All tokens form the BPE vocabulary; CONTROL tokens are also special
    added tokens, USER_DEFINED ones plain added tokens. pre "llama-bpe" gets Llama-3's split regex,
    anything else GPT-2's byte-level regex."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model is {model!r}; refbitnet rebuilds byte-level BPE "
                        f"('gpt2') vocabularies only")
    try:
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]
        merges = list(metadata.get("tokenizer.ggml.merges", []))
    except KeyError as e:
        raise GGUFError(f"{source}: missing tokenizer key {e}") from None
    except (TypeError, ValueError) as e:       # e.g. tokens given as one int, token types as strings
        raise GGUFError(f"{source}: tokenizer.ggml.* keys have the wrong types ({type(e).__name__}: {e})") from None
    if not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens: expected an array of strings, found "
                        f"{type(next(t for t in tokens if not isinstance(t, str))).__name__} items")
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    # Every token is in the BPE vocabulary under its id (tokenizers would renumber an added token that is
    # not, when ids have gaps); CONTROL / USER_DEFINED tokens are also added tokens, matched before BPE.
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        vocab.setdefault(tok, i)
        if kind in (3, 4):                                         # CONTROL, USER_DEFINED
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == 3})
    llama3 = metadata.get("tokenizer.ggml.pre") == "llama-bpe"
    if llama3:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    else:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                               "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": llama3, "vocab": vocab, "merges": merges}}


def gguf_tokenizer(gf: GGUFFile):
    """The file's tokenizer as a refbitnet Tokenizer, or None if the file has none.

    Raises TokenizerError if the vocabulary lacks the specials refbitnet's Tokenizer needs."""
    if "tokenizer.ggml.tokens" not in gf.metadata:
        return None
    from tokenizers import Tokenizer as HFTokenizer
    from .tokenizer import Tokenizer
    tj = tokenizer_json_from_metadata(gf.metadata, gf.path)
    try:
        backend = HFTokenizer.from_str(json.dumps(tj))
    except Exception as e:               # tokenizers raises a bare Exception on a bad vocabulary
        raise GGUFError(f"{gf.path}: cannot build a tokenizer from its tokenizer.ggml keys: {e}") from None
    return Tokenizer(backend, source=f"{gf.path} (tokenizer.ggml.*)")


def _exact_bf16(table: np.ndarray, what: str, rows: int = 8192) -> np.ndarray:
    """float16/float32 [V, D] -> bf16 bits uint16, converted a block of rows at a time; GGUFError if a
    value is not exactly a bf16 value (an F16 file made from the bf16 release converts exactly)."""
    bits = np.empty(table.shape, dtype=np.uint16)
    for r in range(0, table.shape[0], rows):
        block = np.asarray(table[r:r + rows], dtype=np.float32)
        bits[r:r + rows] = f32_to_bf16(block)
        if not np.array_equal(bf16_to_f32(bits[r:r + rows]), block):
            raise GGUFError(f"{what} holds values bf16 cannot represent; backend='numba' reads the LM head "
                            f"as bf16 (use backend='numpy')")
    return bits


def load_gguf(path, *, numerics: str = "int", backend: str = "numpy", tokenizer: bool = True):
    """Load a bitnet.cpp (I2_S) or llama.cpp (TQ1_0/TQ2_0) BitNet b1.58 GGUF file as a refbitnet Model.

    With tokenizer=True the file's vocabulary becomes ``model.tokenizer`` (None if the file has none,
    or if it lacks <|begin_of_text|>, <|end_of_text|>, <|eot_id|>)."""
    from .checkpoint import model_from_tensors
    from .errors import TokenizerError

    gf = read_gguf(path)
    config, tensors = gguf_to_tensors(gf)
    tok = None
    if tokenizer:
        try:
            tok = gguf_tokenizer(gf)
        except TokenizerError:
            tok = None
    if backend == "numba":           # the Numba LM head reads bf16 bits; F16/F32 tables convert if exact
        for hf in ("model.embed_tokens.weight", "lm_head.weight"):
            if hf in tensors and tensors[hf].dtype != np.uint16:
                tensors[hf] = _exact_bf16(tensors[hf], f"{os.fspath(path)}: {hf}")
    return model_from_tensors(config, tensors, source=os.fspath(path), numerics=numerics, backend=backend,
                              tokenizer=tok)


# =====================================================================================================
# refbitnet -> GGUF
# =====================================================================================================
FP16_MAX = 65504.0


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


def tokenizer_metadata(tokenizer_file, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer keys (Llama-3 style byte-level BPE, ``tokenizer.ggml.model = "gpt2"``) from a HF
    tokenizer.json. Ids the file does not define up to vocab_size become "[PAD{id}]" (USER_DEFINED),
    as llama.cpp's converter writes them."""
    path = os.fspath(tokenizer_file)
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        if model.get("type") != "BPE":
            raise GGUFError(f"{path}: expected a BPE tokenizer, found model type {model.get('type')!r}")
        vocab: dict[str, int] = model["vocab"]
        merges = model.get("merges", [])
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise GGUFError(f"{path}: model.vocab: expected an object of token -> integer id")
    except FileNotFoundError:
        raise GGUFError(f"{path}: tokenizer file not found") from None
    except GGUFError:
        raise
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:   # ValueError: bad JSON
        raise GGUFError(f"{path}: not a HF tokenizer.json ({type(e).__name__}: {e})") from None
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size                                         # NORMAL
    for tok, i in vocab.items():
        if 0 <= i < vocab_size:
            tokens[i] = tok
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if 0 <= i < vocab_size:
            tokens[i] = added["content"]
            types[i] = 3 if added.get("special") else 4                 # CONTROL / USER_DEFINED
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i], types[i] = f"[PAD{i}]", 4
    if max(vocab.values(), default=-1) >= vocab_size:
        raise GGUFError(f"{path}: tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                        f"vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    by_name = {t: i for i, t in enumerate(tokens)}
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(tj, path),
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    for key, name in (("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>"), ("eot", "<|eot_id|>")):
        if name in by_name:
            meta[f"tokenizer.ggml.{key}_token_id"] = by_name[name]
    return meta


def _pre_tokenizer_name(tj: dict, path: str) -> str:
    """tokenizer.ggml.pre for a tokenizer.json: "llama-bpe" (Llama-3's split regex + byte-level) or
    "gpt-2" (plain byte-level with GPT-2's regex, what refbitnet's trainer makes). Anything else would
    be split differently by llama.cpp, so it is refused."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any((p.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT_REGEX for p in parts):
        return "llama-bpe"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is neither Llama-3's nor GPT-2's byte-level "
                    f"split; llama.cpp and bitnet.cpp would tokenize text differently")


# The chat format of SPEC §6 as a Jinja template (what llama.cpp's server and bitnet.cpp apply).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
                 "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")


def write_gguf(path, config: Config, tensors: Mapping[str, np.ndarray], *, layout: str = "i2_s",
               tokenizer_file=None, name: str = "refbitnet", embedding_type: str = "f16") -> None:
    """Write a BitNet b1.58 model given as (Config, tensors in the released HF naming) as GGUF.

    layout "i2_s": bitnet.cpp (arch "bitnet-b1.58", projections I2_S); "tq2_0" / "tq1_0": llama.cpp
    (arch "bitnet"). Norms F32. embedding_type "f16" (default, what the official bitnet.cpp file uses;
    exact for bf16 values with |x| >= 2**-14, absolute error <= 2**-25 below), "bf16" (exact; both
    runtimes' ggml read BF16 rows) or "f32". tensors: what ``model_from_tensors`` takes (packed uint8
    [N/4, K] projections with ``.weight_scale``; embedding and norms as bf16 bits or float).
    tokenizer_file: a HF tokenizer.json to embed (runtimes need it; refbitnet's reader does not).
    """
    import gguf
    from . import layouts

    if layout not in LAYOUT_TYPES:
        raise GGUFError(f"layout: expected one of {list(LAYOUT_TYPES)}, found {layout!r}")
    if embedding_type not in ("f16", "bf16", "f32"):
        raise GGUFError(f"embedding_type: expected 'f16', 'bf16' or 'f32', found {embedding_type!r}")
    if not config.tie_word_embeddings:
        raise GGUFError("write_gguf: only tied-embedding models (tie_word_embeddings=True) are supported")
    block = 128 if layout == "i2_s" else 256        # elements per block; blocks may not straddle rows
    for key in ("hidden_size", "intermediate_size"):
        if getattr(config, key) % block:
            raise GGUFError(f"layout {layout!r}: every projection's input width must be a multiple of its "
                            f"{block}-element block, found {key} = {getattr(config, key)}")
    arch = ARCH_BY_LAYOUT[layout]
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(name)
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
    if arch == "bitnet":                           # as llama.cpp's BitnetModel converter writes
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(1.0)
    w.add_file_type(FILE_TYPES[layout])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
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

    def need(hf):
        if hf not in tensors:
            raise GGUFError(f"write_gguf: missing tensor {hf!r}")
        return tensors[hf]

    embed = np.asarray(need("model.embed_tokens.weight"))                       # [V, D]
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise GGUFError(f"model.embed_tokens.weight: expected shape {[config.vocab_size, config.hidden_size]}, "
                        f"found {list(embed.shape)}")
    w.add_tensor("token_embd.weight", _convert_table(embed, embedding_type),
                 raw_dtype=gguf.GGMLQuantizationType.BF16 if embedding_type == "bf16" else None)
    w.add_tensor("output_norm.weight", _as_f32(need("model.norm.weight")))
    qtype = LAYOUT_TYPES[layout]
    for i in range(config.num_hidden_layers):
        for suffix, hf_norm in LAYER_NORMS.items():
            w.add_tensor(f"blk.{i}.{suffix}.weight", _as_f32(need(f"model.layers.{i}.{hf_norm}.weight")))
        for suffix, (n, k) in projection_shapes(config).items():
            hf = f"model.layers.{i}.{PROJECTIONS[suffix]}.weight"
            packed = need(hf)
            if packed.dtype != np.uint8 or packed.shape != (n // 4, k):
                raise GGUFError(f"{hf}: expected packed uint8 [{n // 4}, {k}], found {packed.dtype} "
                                f"{list(packed.shape)}")
            codes = layouts.unpack_hf(np.asarray(packed))                       # [N, K] int8
            scale = _scale_of(tensors, hf)
            if layout == "i2_s":
                data = layouts.pack_i2s(codes, scale)
            else:
                if not (6.103515625e-05 <= scale <= FP16_MAX):
                    raise GGUFError(f"{hf}_scale = {scale:g}: outside fp16's normal range; {layout} stores "
                                    f"it as an fp16 block scale")
                data = (layouts.pack_tq2_0 if layout == "tq2_0" else layouts.pack_tq1_0)(codes, scale)
            # Added by raw type id (the gguf package has no I2_S); int8 view so the writer keeps the
            # element shape [N, K] instead of treating the array as a byte shape.
            w.add_tensor(f"blk.{i}.{suffix}.weight", np.asarray(data, dtype=np.uint8).view(np.int8),
                         raw_shape=(n, k), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_gguf(source, path, *, layout: str = "i2_s", tokenizer_file=None, name: str = "refbitnet",
              embedding_type: str = "f16") -> None:
    """Export a refbitnet Model, a model directory (packed release or bf16 master; what refbitnet.load
    reads) or a (Config, tensors) pair as a GGUF file for bitnet.cpp (layout "i2_s") or llama.cpp
    ("tq2_0", "tq1_0"). The model's tokenizer.json is embedded unless tokenizer_file says otherwise."""
    from .model import Model

    if isinstance(source, tuple) and len(source) == 2:
        config, tensors = source
    else:
        if not isinstance(source, Model):
            from .checkpoint import load_model_dir
            source = load_model_dir(source)
        config, tensors = source.config, source.release_tensors()
        if tokenizer_file is None and source.tokenizer is not None:
            candidate = getattr(source.tokenizer, "path", None)
            tokenizer_file = candidate if candidate is not None and os.path.isfile(candidate) else None
    write_gguf(path, config, tensors, layout=layout, tokenizer_file=tokenizer_file, name=name,
               embedding_type=embedding_type)


# =====================================================================================================
# Command line: python -m refbitnet.gguf_io {info,export}
# =====================================================================================================
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

    from .errors import RefBitNetError

    parser = argparse.ArgumentParser(prog="python -m refbitnet.gguf_io",
                                     description="BitNet b1.58 GGUF files for bitnet.cpp (I2_S) and llama.cpp (TQ2_0/TQ1_0)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarize a GGUF file")
    info.add_argument("file")
    export = sub.add_parser("export", help="write a model directory (refbitnet.load reads it) as GGUF")
    export.add_argument("model_dir")
    export.add_argument("out")
    export.add_argument("--layout", choices=sorted(LAYOUT_TYPES), default="i2_s",
                        help="i2_s for bitnet.cpp (default), tq2_0 / tq1_0 for llama.cpp")
    export.add_argument("--embedding-type", choices=["f16", "bf16", "f32"], default="f16")
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


if __name__ == "__main__":
    raise SystemExit(main())
