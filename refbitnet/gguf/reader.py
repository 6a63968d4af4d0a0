"""A small, bounds-checked GGUF reader: header, metadata, tensor table, and each tensor's bytes.

refbitnet parses GGUF itself rather than with ``gguf.GGUFReader``: that reader does not know type id
36 (I2_S, bitnet.cpp's fork only) and fails on it, and every malformed file must raise a
:class:`~refbitnet.errors.GGUFError` that names the file, the tensor and the offset. This module knows
nothing about BitNet; :mod:`refbitnet.gguf.mapping` turns a parsed file into a model.

A GGUF file (version 2 or 3, little-endian)::

    magic "GGUF" | u32 version | u64 tensor count | u64 metadata count
    metadata:     (string key, u32 value type, value) * count
    tensor table: (string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset) * count
    padding to general.alignment (default 32), then the tensors' data, each at its aligned offset

ne[] lists dimensions innermost first; refbitnet reports shapes in numpy order (the reverse).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GGUFError

# ---- GGML tensor types refbitnet reads -------------------------------------------------------------
F32, F16, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 8, 12, 14, 30
TQ1_0, TQ2_0 = 34, 35
I2_S = 36                      # bitnet.cpp's ggml fork only
TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K", BF16: "BF16",
              TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", I2_S: "I2_S"}
TERNARY_TYPES = (I2_S, TQ1_0, TQ2_0)
FLOAT_TYPES = (F32, F16, BF16)
QUANTIZED_FLOAT_TYPES = (Q8_0, Q6_K, Q4_K)   # what llama-quantize writes for embeddings and output heads
# Block types: type -> (elements per block, bytes per block), as ggml defines them (the gguf package's
# GGML_QUANT_SIZES holds the same numbers; a test checks they agree). A block never straddles a row, so
# a row's length must be a multiple of the block.
BLOCK_TYPES = {Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210), TQ1_0: (256, 54), TQ2_0: (256, 66)}

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 16         # arrays of arrays: real files use one level

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_SCALAR_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                  6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def type_name(type_id: int) -> str:
    """'Q6_K' for 14; the gguf package's name for types refbitnet does not read; 'type 99' otherwise."""
    return TYPE_NAMES.get(type_id) or _ggml_type_name(type_id) or f"type {type_id}"


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
        return type_name(self.type_id)


def tensor_nbytes(type_id: int, shape: tuple[int, ...], name: str = "tensor", path: str = "GGUF") -> int:
    """Bytes a tensor of this GGML type and numpy shape occupies; GGUFError for types refbitnet cannot read."""
    n = math.prod(shape)
    row = shape[-1] if shape else 1
    if type_id == F32:
        return 4 * n
    if type_id in (F16, BF16):
        return 2 * n
    if type_id in BLOCK_TYPES:
        block, block_bytes = BLOCK_TYPES[type_id]
        if row % block:
            raise GGUFError(f"{path}: tensor {name!r} of type {TYPE_NAMES[type_id]}: row length {row} is not "
                            f"a multiple of the {block}-element block")
        return (n // block) * block_bytes
    if type_id == I2_S:
        if n % 4:
            raise GGUFError(f"{path}: tensor {name!r} of type I2_S: {n} elements is not a multiple of 4")
        return n // 4 + 32            # 2-bit codes, then 32 bytes whose first 4 are the float32 scale
    known = _ggml_type_name(type_id)
    readable = ", ".join(TYPE_NAMES[t] for t in sorted(TYPE_NAMES))
    if known is not None:
        raise GGUFError(f"{path}: tensor {name!r} has type {known} ({type_id}); refbitnet reads {readable} "
                        f"tensors")
    raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type id {type_id} (expected one of "
                    f"{sorted(TYPE_NAMES)}: {readable})")


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
        t = self.tensor(name)
        return self._data[t.offset:t.offset + t.nbytes]

    def array(self, name: str) -> np.ndarray:
        """A float tensor in numpy shape: F32 as a float32 view, F16 widened to float32 (exact), BF16 as
        its bits (uint16; widen with refbitnet.bf16.bf16_to_f32). Other types: use raw()."""
        t = self.tensor(name)
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

    def tensor(self, name: str) -> GGUFTensor:
        """The table entry of tensor ``name``; GGUFError naming the file if there is none."""
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
    tensors = _place_tensors(path, size, infos, alignment, data_start)
    return GGUFFile(path, metadata, tensors, version, data)


def _place_tensors(path: str, size: int, infos, alignment: int, data_start: int) -> dict[str, GGUFTensor]:
    """The tensor table as GGUFTensors, after checking each tensor's bytes lie in the file, aligned,
    without overlaps or gaps that would mean a type or shape that does not match the data."""
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
                            f"a gap of at least the alignment {alignment}; its type or shape does not match "
                            f"its data")
    if ordered and ordered[0].offset - data_start >= alignment:
        raise GGUFError(f"{path}: tensor {ordered[0].name!r}: the data section starts "
                        f"{ordered[0].offset - data_start} bytes before the first tensor (expected less than "
                        f"the alignment {alignment})")
    return tensors
