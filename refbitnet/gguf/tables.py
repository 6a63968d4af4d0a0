"""The float tables of a GGUF file (token embedding, untied output head) as refbitnet holds them.

Engines and the hub write these [V, D] tables in many ggml types: F16 (bitnet.cpp's converter), BF16,
F32, and block-quantized types that ``llama-quantize`` picks for them (Q6_K by default for the output
head, Q8_0, Q4_K). What refbitnet makes of each:

    F32, F16, BF16       the file's values as stored: a view of the memory map (float32, float16,
                         or bf16 bits as uint16), never copied or widened as a whole
    Q8_0, Q6_K, Q4_K     dequantized with the ``gguf`` package's own code (gguf.quants.dequantize, the
                         reference implementation of ggml's formats) a block of rows at a time, each
                         value rounded once to bf16 (nearest, ties to even): a uint16 [V, D] table of
                         2 bytes per value, as the release stores it

Why bf16 for the quantized types: their values (an fp16 block scale times small integers) are in
general neither bf16 nor fp16 values, so some rounding is needed unless the table is kept in float32,
which doubles the 2B4T table (0.66 -> 1.3 GB). bf16 is what both backends read (the Numba LM head reads
only bf16 bits); its rounding adds at most half a bf16 ulp, |v| * 2**-8, to a dequantized value v: about
Q8_0's own worst case (amax / 254 in a 32-value block), a fraction of Q6_K's (amax / 62 in a 16-value
sub-block) and Q4_K's. tests/test_gguf_tables.py states each type's bound against a bf16 source and
checks it.
"""

from __future__ import annotations

import numpy as np

from ..bf16 import bf16_to_f32, f32_to_bf16
from ..errors import GGUFError
from .reader import BF16, BLOCK_TYPES, F16, F32, QUANTIZED_FLOAT_TYPES, TYPE_NAMES, GGUFFile

TABLE_TYPES = (F32, F16, BF16) + QUANTIZED_FLOAT_TYPES
ROWS_PER_BLOCK = 4096            # rows dequantized at a time: 40 MB of float32 at D = 2560


def float_table(gf: GGUFFile, name: str) -> np.ndarray:
    """Tensor ``name`` (a [V, D] table) as float32, float16 or bf16 bits (see the module docstring)."""
    t = gf.tensor(name)
    if t.type_id not in TABLE_TYPES:
        raise GGUFError(f"{gf.path}: tensor {name!r}: expected one of "
                        f"{', '.join(TYPE_NAMES[x] for x in TABLE_TYPES)}, found {t.type_name}")
    raw = gf.raw(name)
    if t.type_id in (F32, F16, BF16):
        return raw.view({F32: "<f4", F16: "<f2", BF16: "<u2"}[t.type_id]).reshape(t.shape)
    return dequantize_to_bf16(raw, t.type_id, t.shape, f"{gf.path}: tensor {name!r} ({t.type_name})")


def dequantize_to_bf16(raw: np.ndarray, type_id: int, shape: tuple[int, ...], what: str,
                       rows: int = ROWS_PER_BLOCK) -> np.ndarray:
    """Bytes of a block-quantized [R, C] tensor -> bf16 bits uint16 [R, C], dequantized by gguf.quants
    a block of rows at a time (no float32 copy of the whole table is made)."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise GGUFError(f"{what}: reading this type needs the 'gguf' package (pip install gguf)") from None
    n_rows, n_cols = shape
    block, block_bytes = BLOCK_TYPES[type_id]
    row_bytes = n_cols // block * block_bytes
    by_row = raw.reshape(n_rows, row_bytes)                               # [R, bytes per row]
    qtype = gguf.GGMLQuantizationType(type_id)
    out = np.empty(shape, dtype=np.uint16)
    for r in range(0, n_rows, rows):
        values = dequantize(np.ascontiguousarray(by_row[r:r + rows]), qtype)   # float32 [rows, C]
        if values.shape != (min(rows, n_rows - r), n_cols):               # a gguf version that disagrees
            raise GGUFError(f"{what}: gguf.quants.dequantize returned shape {values.shape} for rows "
                            f"{r}..{r + rows} of {list(shape)}")
        out[r:r + rows] = f32_to_bf16(values)
    return out


def check_finite(a: np.ndarray, what: str, rows: int = 8192) -> None:
    """GGUFError at the first row holding a NaN or inf (checked a block of rows at a time)."""
    for r in range(0, a.shape[0], rows):
        block = a[r:r + rows]
        block = bf16_to_f32(block) if block.dtype == np.uint16 else block
        if not np.isfinite(block).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(block))[0])
            where = (where[0] + r,) + where[1:]
            raise GGUFError(f"{what}: expected finite values, found {block[tuple([where[0] - r, *where[1:]])]} "
                            f"at index {where}")


def exact_bf16(table: np.ndarray, what: str, rows: int = 8192) -> np.ndarray:
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
