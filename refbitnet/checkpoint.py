"""Hugging Face model directories in and out: safetensors read memory-mapped, the release layout written.

Reading (``load_model_dir``, ``refbitnet.load``): a directory with ``config.json``, ``model.safetensors``
(or shards listed in ``model.safetensors.index.json``) and optionally ``tokenizer.json``. Two formats:

- "packed": the released ``microsoft/bitnet-b1.58-2B-4T`` layout (docs/SPEC.md §4). Projections are uint8
  [N/4, K] (four output-row blocks per byte) with a ``<proj>.weight_scale`` [1] that the output is
  MULTIPLIED by. Used as stored: no float copy of any projection.
- "bf16-master": ``bitnet-b1.58-2B-4T-bf16``: projections as real-valued bf16 [N, K]. Quantized here
  with absmean (docs/SPEC.md §3) one tensor at a time; gamma is rounded to bf16, as the packed export stores
  it, so a master and its packed export give identical logits.

numpy has no bfloat16 and safetensors' numpy API refuses it, so the header is parsed here and each
tensor is an ``np.memmap`` of its bytes (bf16 as uint16 bits). The header is checked before any
tensor is touched: length, JSON, dtypes, every offset inside the file, byte sizes matching shapes.

Writing (``save_checkpoint``, ``save_model``): the packed release layout with the release's
``quantization_config``; bf16 everywhere the release has bf16 (a value that bf16 cannot hold exactly,
e.g. a float32 GGUF scale, is written as float32 so saving never changes a model).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .bf16 import bf16_to_f32, f32_to_bf16
from .config import RELEASE_QUANTIZATION_CONFIG, Config
from .errors import CheckpointError, ConfigError, RefBitNetError, RefBitNetTypeError
from .api import Model
from .generation_config import GenerationDefaults
from .tokenizer import load_tokenizer
from .config import PROJECTIONS
from .weights import model_weights, scale_convention

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# safetensors dtype name -> numpy dtype the bytes are viewed as (BF16 as its uint16 bits)
_ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
              "U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
_MAX_HEADER = 100 * 1024 * 1024        # safetensors' own limit on the JSON header
_MAX_DIMS = 32                          # numpy allows 64; no checkpoint tensor has more than a few


# ============================================================================ safetensors, by hand

def read_safetensors(path) -> dict:
    """Open a .safetensors file: {name: read-only np.memmap (bf16 as uint16)} after checking the header.

    Raises CheckpointError naming the file (and tensor) on a missing or truncated file, a bad header,
    an unknown dtype, offsets outside the data, or a byte size that does not match the shape.
    """
    path = os.fspath(path)
    try:
        _check_not_special(path)
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated: expected an 8-byte header length, found a "
                                      f"{file_size}-byte file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER or 8 + header_len > file_size:
                raise CheckpointError(f"{path}: truncated or not safetensors: header length {header_len} "
                                      f"bytes, but the file has {file_size} bytes")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: expected a file, found a directory") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:      # bad UTF-8, bad JSON, a 5000-digit number, deep nesting
        raise CheckpointError(f"{path}: header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header: expected a JSON object, found {type(header).__name__}")
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = []                              # (begin, end, name, dtype, shape), all checked first
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: header entry needs dtype, shape, data_offsets; found {info!r}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype: expected one of {sorted(_ST_DTYPES)}, "
                                  f"found {dtype_name!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape: expected a list of at most {_MAX_DIMS} non-negative ints, "
                                  f"found {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets: expected [begin, end] with 0 <= begin <= end, "
                                  f"found {offsets!r}")
        dtype = np.dtype(_ST_DTYPES[dtype_name])
        expected = math.prod(shape) * dtype.itemsize          # Python ints: a hostile shape cannot wrap
        begin, end = offsets
        if end - begin != expected:
            raise CheckpointError(f"{where}: expected {expected} bytes for {dtype_name} {shape}, "
                                  f"found data_offsets {offsets} ({end - begin} bytes)")
        if end > data_size:
            raise CheckpointError(f"{where}: truncated file: data_offsets end at byte {end} of the data, "
                                  f"but the file holds {data_size} data bytes")
        entries.append((begin, end, name, dtype, tuple(shape)))
    # As the safetensors format requires: the tensors tile the data exactly, no overlap, hole or tail
    # (a shifted header length or a duplicated name would otherwise read other tensors' bytes).
    position, previous = 0, "the start of the data"
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets start at byte {begin}, expected {position} "
                                  f"(right after {previous}): tensors {'overlap' if begin < position else 'leave a hole'}")
        position, previous = end, f"tensor {name}"
    if position != data_size:
        raise CheckpointError(f"{path}: the tensors end at data byte {position}, but the file holds {data_size} "
                              f"data bytes (trailing bytes or a wrong header length)")
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        if begin == end:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    return tensors


def _check_not_special(path) -> None:
    """Refuse a named pipe, device or socket (open() of a FIFO waits forever, /dev/zero never ends)."""
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise CheckpointError(f"{path}: expected a regular file, found a FIFO, device or socket")


def write_safetensors(path, entries) -> None:
    """Write a .safetensors file. entries: list of (name, dtype_name, shape, data), dtype_name a safetensors
    dtype ("BF16" data is uint16 bits). data is an array, or a callable returning an array or an iterator of
    arrays (chunks, concatenated in C order), called when its turn comes, so tensors can be produced one
    at a time. Writes to a temporary file and renames it into place."""
    path = os.fspath(path)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype_name, shape, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype_name]).itemsize
        header[name] = {"dtype": dtype_name, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)                      # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype_name, shape, data in entries:
            dtype = np.dtype(_ST_DTYPES[dtype_name])
            begin, end = header[name]["data_offsets"]
            produced = data() if callable(data) else data
            chunks = [produced] if isinstance(produced, np.ndarray) else produced
            written = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != dtype:
                    raise RefBitNetTypeError(f"{path}: tensor {name}: expected {dtype_name} data as {dtype}, "
                                             f"found {chunk.dtype}")
                f.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
            if written != end - begin:
                raise RefBitNetError(f"{path}: tensor {name}: expected {end - begin} bytes for shape {list(shape)}, "
                                     f"found {written}")
    os.replace(tmp, path)


def read_checkpoint_tensors(directory) -> dict:
    """All tensors of a model directory: model.safetensors, or the shards named by model.safetensors.index.json."""
    directory = Path(directory)
    index_path = directory / SAFETENSORS_INDEX
    single = directory / SAFETENSORS_FILE
    if single.exists() or not index_path.exists():
        if not single.exists():
            raise CheckpointError(f"{single}: file not found (expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                                  f"in {directory})")
        return read_safetensors(single)
    _check_not_special(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, RecursionError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object, found invalid content "
                              f"({type(e).__name__}: {e})") from None
    tensors, shards = {}, {}
    for name, shard in weight_map.items():
        if shard not in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise CheckpointError(f"{index_path}: weight_map[{name!r}]: expected a file name in the directory, "
                                      f"found {shard!r}")
            shards[shard] = read_safetensors(directory / shard)
        if name not in shards[shard]:
            raise CheckpointError(f"{directory / shard}: tensor {name}: listed in {SAFETENSORS_INDEX} but not in the file")
        tensors[name] = shards[shard][name]
    return tensors


# ============================================================================ files -> Model

def model_from_tensors(config: Config, tensors: Mapping, *, source: str, numerics: str = "int",
                       backend: str = "auto", tokenizer=None, convention: str = "multiply",
                       generation_defaults=None) -> Model:
    """A Model from release-named tensors (see refbitnet.weights.model_weights); source names them in
    errors (a path, "gguf:..."); convention: what a packed weight_scale means ("multiply" or "divide")."""
    weights = model_weights(config, tensors, source=source, convention=convention)
    return Model(config, weights, numerics=numerics, backend=backend, tokenizer=tokenizer, source=source,
                 generation_defaults=generation_defaults)


def load_model_dir(directory, numerics: str = "int", backend: str = "auto") -> Model:
    """Load a Hugging Face model directory (config.json, model.safetensors or shards, tokenizer.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a model directory (config.json, {SAFETENSORS_FILE}), "
                              f"found {'a file' if directory.exists() else 'nothing'}")
    config = Config.from_json(directory / CONFIG_FILE)
    _check_quantization_config(directory / CONFIG_FILE, config)
    tensors = read_checkpoint_tensors(directory)
    convention = "multiply"
    first = np.asarray(tensors.get("model.layers.0.self_attn.q_proj.weight", np.empty(0, np.float32)))
    if first.dtype == np.uint8:                 # packed: its weight_scale means what the config declares
        convention = scale_convention(config.quantization_config, str(directory / CONFIG_FILE))
    tokenizer = load_tokenizer(directory, config)          # None without tokenizer.json
    return model_from_tensors(config, tensors, source=str(directory), numerics=numerics, backend=backend,
                              tokenizer=tokenizer, convention=convention,
                              generation_defaults=GenerationDefaults.from_dir(directory))


def _check_quantization_config(path, config):
    q = config.quantization_config
    if q is None:
        return
    if not isinstance(q, dict) or q.get("quant_method") != "bitnet":
        raise ConfigError(f"{path}: quantization_config: expected quant_method 'bitnet', found {q!r}")
    if q.get("use_rms_norm"):
        raise ConfigError(f"{path}: quantization_config.use_rms_norm: expected false (2B4T has no norm inside "
                          f"BitLinear), found {q['use_rms_norm']!r}")


# ============================================================================ writing the release layout

def save_checkpoint(directory, config: Config, weights: Mapping, tokenizer_file=None) -> None:
    """Write latent float weights (HF names, projections [N, K]) as a packed release checkpoint.

    Each projection: codes, gamma = absmean_ternary(W); stored as pack_hf(codes) uint8 [N/4, K] and
    weight_scale = bf16(gamma) [1]. Embedding and norms are stored as bf16. Also writes config.json
    (with the release quantization_config) and copies tokenizer_file to tokenizer.json if given.
    """
    from .layouts import pack_hf
    from .quant import absmean_ternary
    if not isinstance(config, Config):
        raise RefBitNetTypeError(f"config: expected a refbitnet Config, found {type(config).__name__}")
    proj_suffixes = tuple(f".{p}.weight" for p, _ in PROJECTIONS)
    tensors = {}
    for name, w in weights.items():
        w = np.asarray(w)
        if w.dtype.kind != "f":
            raise RefBitNetTypeError(f"weights[{name!r}]: expected a float array, found dtype {w.dtype}")
        if name.endswith(proj_suffixes):
            if w.ndim != 2 or w.shape[0] % 4:
                raise CheckpointError(f"weights[{name!r}]: expected a projection [N, K] with N % 4 == 0, "
                                      f"found shape {list(w.shape)}")
            codes, gamma = absmean_ternary(w)
            tensors[name] = pack_hf(codes)                                          # [N/4, K] uint8
            tensors[name[: -len("weight")] + "weight_scale"] = f32_to_bf16(np.array([gamma], np.float32))
        else:
            tensors[name] = f32_to_bf16(w.astype(np.float32))
    model_weights(config, tensors, source="weights")          # validate names and shapes before writing
    _write_model_dir(directory, config, tensors, tokenizer_file)


def save_model(model: Model, directory) -> None:
    """Write a Model in the packed release layout (config.json, model.safetensors, tokenizer.json)."""
    if not isinstance(model, Model):
        raise RefBitNetTypeError(f"model: expected a refbitnet Model, found {type(model).__name__}")
    tensors = {}
    for name, a in model.release_tensors().items():
        a = np.asarray(a) if not isinstance(a, np.memmap) else a
        if a.dtype == np.float32:
            bits = f32_to_bf16(a)
            if np.array_equal(bf16_to_f32(bits), a):          # exactly a bf16 value: store as the release does
                a = bits
        tensors[name] = a
    _write_model_dir(directory, model.config, tensors)
    if model.tokenizer is not None:        # tokenizer.json (the file read, byte for byte) + its specials/template
        model.tokenizer.save_pretrained(directory)
    model.generation_defaults.save(directory)         # generation_config.json, if the model has one


def _write_model_dir(directory, config, tensors, tokenizer_file=None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype_names = {np.dtype(np.uint16): "BF16", np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32",
                   np.dtype(np.float16): "F16"}
    entries = [(name, dtype_names[a.dtype], a.shape, a) for name, a in sorted(tensors.items())]
    write_safetensors(directory / SAFETENSORS_FILE, entries)
    config.replace(quantization_config=dict(RELEASE_QUANTIZATION_CONFIG)).to_json(directory / CONFIG_FILE)
    if tokenizer_file is not None:
        if Path(tokenizer_file).resolve() != (directory / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
