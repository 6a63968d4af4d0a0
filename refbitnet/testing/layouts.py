"""Every packed layout of a ternary weight, in and out: ``encode`` / ``decode``, and microsoft/BitNet's
GPU format.

The layouts themselves live in :mod:`refbitnet.layouts` (and docs/SPEC.md §4-§5); this module gives them
one door by name, and defines ``pack_bitnet_gpu`` / ``unpack_bitnet_gpu``, a layout refbitnet never loads
but other projects pack. Arrays may be torch tensors (see ``arrays.as_array``).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from .. import layouts as _layouts
from ..errors import RefBitNetError
from ..quant import check_ternary_codes
from .arrays import as_array


def takes_tensors(fn):
    """fn with every argument passed through as_array (torch tensors in, by parameter name in errors)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            bound.arguments[name] = as_array(value, name)
        return fn(*bound.args, **bound.kwargs)
    return wrapper


# refbitnet.layouts' pack/unpack pairs, taking torch tensors too
pack_hf, unpack_hf = takes_tensors(_layouts.pack_hf), takes_tensors(_layouts.unpack_hf)
pack_kernel, unpack_kernel = takes_tensors(_layouts.pack_kernel), takes_tensors(_layouts.unpack_kernel)
pack_i2s, unpack_i2s = takes_tensors(_layouts.pack_i2s), takes_tensors(_layouts.unpack_i2s)
pack_tq2_0, unpack_tq2_0 = takes_tensors(_layouts.pack_tq2_0), takes_tensors(_layouts.unpack_tq2_0)
pack_tq1_0, unpack_tq1_0 = takes_tensors(_layouts.pack_tq1_0), takes_tensors(_layouts.unpack_tq1_0)

#: Layout names accepted by encode / decode / reference_bitlinear.
#:   "codes"  int8 [N, K] in {-1, 0, 1}, no packing (scale passed separately)
#:   "hf"     uint8 [N/4, K], the released model.safetensors (scale = the weight_scale tensor)
#:   "kernel" uint8 [N, K/4], row-major 4 codes per byte (refbitnet's Numba kernels)
#:   "i2_s"   bitnet.cpp GGUF type 36: N*K/4 code bytes + 32 bytes holding one float32 scale
#:   "tq2_0"  llama.cpp GGUF type 35: 66 bytes per 256 elements (fp16 scale per block)
#:   "tq1_0"  llama.cpp GGUF type 34: 54 bytes per 256 elements (fp16 scale per block)
#:   "bitnet_gpu" int8 [N, K/4], microsoft/BitNet's GPU kernel format (see pack_bitnet_gpu)
LAYOUTS = ("codes", "hf", "kernel", "i2_s", "tq2_0", "tq1_0", "bitnet_gpu")


def encode(codes: np.ndarray, layout: str, scale=None) -> np.ndarray:
    """Ternary codes int8 [N, K] -> the bytes of ``layout``. "i2_s", "tq2_0", "tq1_0" embed the scale
    (required); "codes", "hf", "kernel" do not (scale is ignored)."""
    _check_layout(layout)
    codes, scale = as_array(codes, "codes"), as_array(scale, "scale")
    if layout in ("i2_s", "tq2_0", "tq1_0"):
        if scale is None:
            raise RefBitNetError(f"scale: layout {layout!r} stores the weight scale; pass scale=")
        return {"i2_s": pack_i2s, "tq2_0": pack_tq2_0, "tq1_0": pack_tq1_0}[layout](codes, scale)
    if layout == "hf":
        return pack_hf(codes)
    if layout == "kernel":
        return pack_kernel(codes)
    if layout == "bitnet_gpu":
        return pack_bitnet_gpu(codes)
    return check_ternary_codes(codes).copy()


def decode(data: np.ndarray, layout: str, shape=None):
    """Bytes of ``layout`` -> (codes int8 [N, K], scale float32 or None).

    shape (N, K) is required for the 1-D GGUF layouts. The scale is None for layouts that do not
    store one. For TQ1_0/TQ2_0 it is the per-tensor scale: the fp16 block scale shared by every block
    holding a nonzero code (a file whose blocks disagree is not BitNet b1.58 and raises); the raw
    per-block scales are available from ``unpack_tq2_0`` / ``unpack_tq1_0``.
    """
    _check_layout(layout)
    data = as_array(data, "data")
    if layout in ("i2_s", "tq2_0", "tq1_0"):
        if shape is None:
            raise RefBitNetError(f"shape: layout {layout!r} is a flat byte string; pass shape=(N, K)")
        if layout == "i2_s":
            return unpack_i2s(data, shape)
        from ..gguf.mapping import per_tensor_scale as _per_tensor_scale
        codes, d = (unpack_tq2_0 if layout == "tq2_0" else unpack_tq1_0)(data, shape)
        return codes, _per_tensor_scale(codes, d, f"data ({layout})")
    if layout == "hf":
        return unpack_hf(data), None
    if layout == "kernel":
        return unpack_kernel(data), None
    if layout == "bitnet_gpu":
        return unpack_bitnet_gpu(data), None
    return check_ternary_codes(data, "data"), None


# ---- microsoft/BitNet's GPU format (gpu/pack_weight.py: convert_weight_int8_to_int2) ----------------
_GPU_TILE_N, _GPU_TILE_K = 16, 32


def _gpu_tile_map():
    """Where element (ii, jj) of a 16x32 permuted tile comes from in the source tile: (row, col) [16, 32]."""
    ii, jj = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    thread = ii * 2 + jj // 16
    return (thread // 16) * 8 + thread % 8, jj % 16 + 16 * ((thread % 16) // 8)


# Within each little-endian int32 (16 codes), code number `offset` (0..15, at bits 2*offset after the
# 4-per-byte compression) moves to bit (offset % 4) * 8 + (offset // 4) * 2.
_GPU_SHIFTS = np.array([(o % 4) * 8 + (o // 4) * 2 for o in range(16)], dtype=np.uint32)


def pack_bitnet_gpu(codes: np.ndarray) -> np.ndarray:
    """Ternary codes int8 [N, K] -> microsoft/BitNet's GPU weight format, int8 [N, K/4] (N % 16 == 0,
    K % 32 == 0). Three steps, as ``gpu/pack_weight.py`` does them:

    1. c = codes + 2 (so -1, 0, +1 -> 1, 2, 3; not + 1 as in every other layout);
    2. each 16x32 tile is permuted for the kernel's shared-memory loads: element (ii, jj) of the new
       tile is source element (row, col) with t = 2*ii + jj // 16, row = (t // 16)*8 + t % 8,
       col = jj % 16 + 16*((t % 16) // 8); tiles are stored [N/16, K/32, 16, 32];
    3. four consecutive codes per byte (bits 2k), then within each little-endian int32 the 16 codes
       are interleaved: code o moves to bit (o % 4)*8 + (o // 4)*2.

    The decode kernel computes int8 activations x (c - 2) exactly, then acc / s * weight_scale.
    """
    from ..layouts import _codes_2d
    codes = _codes_2d(as_array(codes, "codes"), n_multiple=_GPU_TILE_N, k_multiple=_GPU_TILE_K,
                      what="BitNet GPU layout: ")
    n, k = codes.shape
    rows, cols = _gpu_tile_map()                                                     # [16, 32] each
    c = (codes + np.int8(2)).astype(np.uint32)                                       # [N, K] in {1, 2, 3}
    tiles = c.reshape(n // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)                # [N/16, K/32, 16, 32]
    permuted = tiles[:, :, rows, cols]                                               # [N/16, K/32, 16, 32]
    words = permuted.reshape(-1, 16)                                                 # 16 codes per int32
    packed = np.bitwise_or.reduce(words << _GPU_SHIFTS, axis=1).astype("<u4")       # [N*K/16]
    return packed.view(np.int8).reshape(n, k // 4)


def unpack_bitnet_gpu(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_bitnet_gpu: int8 (or uint8) [N, K/4] -> ternary codes int8 [N, K]. A 2-bit field
    equal to 0 (which would decode to -2) raises."""
    packed = as_array(packed, "packed")
    if not isinstance(packed, np.ndarray) or packed.dtype not in (np.int8, np.uint8) or packed.ndim != 2:
        raise RefBitNetError(f"packed: expected an int8 array [N, K/4], found "
                             f"{getattr(packed, 'dtype', type(packed).__name__)} {getattr(packed, 'shape', '')}")
    n, k = packed.shape[0], packed.shape[1] * 4
    if n % _GPU_TILE_N or k % _GPU_TILE_K:
        raise RefBitNetError(f"packed: BitNet GPU layout: expected N % 16 == 0 and K % 32 == 0, found N={n}, K={k}")
    words = np.ascontiguousarray(packed).view("<u4").reshape(-1, 1)                  # [N*K/16, 1]
    c = ((words >> _GPU_SHIFTS) & np.uint32(3)).astype(np.int8)                      # [N*K/16, 16]
    if (c == 0).any():
        where = int(np.argwhere((c == 0).any(axis=1))[0][0])
        raise RefBitNetError(f"packed: BitNet GPU layout: expected codes 1, 2, 3 (-1, 0, +1 plus 2), found a "
                             f"field equal to 0 in int32 word {where}")
    permuted = c.reshape(n // 16, k // 32, 16, 32)
    rows, cols = _gpu_tile_map()
    tiles = np.empty_like(permuted)
    tiles[:, :, rows, cols] = permuted
    return (tiles.transpose(0, 2, 1, 3).reshape(n, k) - np.int8(2)).astype(np.int8)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise RefBitNetError(f"layout: expected one of {LAYOUTS}, found {layout!r}")
