"""Every packed layout of ternary weights refbitnet reads or writes: one pack/unpack pair per layout.

All layouts store a ternary weight w in {-1, 0, +1} as the 2-bit (or base-3) code c = w + 1 in
{0, 1, 2}. They differ in which element goes to which byte, and in where the scale lives.

| layout        | functions                    | bytes for [N, K]           | scale                          |
|---------------|------------------------------|----------------------------|--------------------------------|
| HF release    | pack_hf / unpack_hf          | [N/4, K] uint8             | separate ``weight_scale`` [1]  |
| kernel        | pack_kernel / unpack_kernel  | [N, K/4] uint8             | kept by the caller             |
| GGUF I2_S     | pack_i2s / unpack_i2s        | N*K/4 + 32, 1-D            | one float32 after the codes    |
| GGUF TQ2_0    | pack_tq2_0 / unpack_tq2_0    | 66 per 256 elements, 1-D   | fp16 per 256-element block     |
| GGUF TQ1_0    | pack_tq1_0 / unpack_tq1_0    | 54 per 256 elements, 1-D   | fp16 per 256-element block     |

Codes are always an int8 array [N, K] (N = out_features, K = in_features) with values in {-1, 0, 1}.
Every function validates its input and raises refbitnet.errors exceptions naming the argument, what
was expected and what was found; decoders reject the 2-bit field value 3, which no encoder writes.
"""

import numpy as np

from .checks import check_array
from .errors import RefBitNetError, RefBitNetTypeError
from .quant import check_ternary_codes

TQ_BLOCK = 256          # elements per TQ1_0 / TQ2_0 block (llama.cpp's QK_K)
TQ2_0_BLOCK_BYTES = 66  # 64 code bytes + fp16 d
TQ1_0_BLOCK_BYTES = 54  # 48 qs bytes (5 trits each) + 4 qh bytes (4 trits each) + fp16 d
I2S_BLOCK = 128         # elements per I2_S block (x86 bitnet.cpp; ARM builds use 64, see docs/SPEC.md §5)
I2S_TAIL_BYTES = 32     # after the codes: float32 scale, then 28 zero bytes of alignment

_FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- validation helpers

def _codes_2d(codes, name="codes", n_multiple=1, k_multiple=1, what=""):
    """Validate ternary codes [N, K] (int8, values in {-1,0,1}, N % n_multiple == 0, K % k_multiple == 0)."""
    codes = check_ternary_codes(codes, name)
    if codes.ndim != 2:
        raise RefBitNetError(f"{name}: expected a 2-D [N, K] array of ternary codes, found shape {codes.shape}")
    n, k = codes.shape
    if n == 0 or k == 0:
        raise RefBitNetError(f"{name}: expected a non-empty [N, K] array, found shape {codes.shape}")
    if n % n_multiple:
        raise RefBitNetError(f"{name}: {what}expected N (rows) divisible by {n_multiple}, found shape {codes.shape}")
    if k % k_multiple:
        raise RefBitNetError(f"{name}: {what}expected K (columns) divisible by {k_multiple}, found shape {codes.shape}")
    return codes


def _packed(packed, name, ndim):
    """Validate a non-empty uint8 array of the given rank."""
    return check_array(packed, name, np.uint8, ndim, nonempty=True)


def _shape_2d(shape, name="shape", k_multiple=1, what=""):
    """Validate a tensor shape (N, K) of positive ints with K % k_multiple == 0."""
    try:
        n, k = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise RefBitNetTypeError(f"{name}: expected a pair of ints (N, K), found {shape!r}") from None
    if any(int(d) != d for d in shape) or n <= 0 or k <= 0:
        raise RefBitNetError(f"{name}: expected two positive ints (N, K), found {tuple(shape)!r}")
    if k % k_multiple:
        raise RefBitNetError(f"{name}: {what}expected K divisible by {k_multiple}, found {(n, k)}")
    return n, k


def _scale(scale, name="scale", fp16=False):
    """A finite, non-negative scalar scale as float32 (and representable in fp16 if fp16)."""
    arr = np.asarray(scale)
    if arr.size != 1 or arr.dtype.kind not in "fiu":
        raise RefBitNetTypeError(f"{name}: expected one real number, found {scale!r}")
    value = float(arr.reshape(()))
    if not np.isfinite(value) or value < 0:
        raise RefBitNetError(f"{name}: expected a finite scale >= 0, found {value}")
    if fp16 and value > _FP16_MAX:
        raise RefBitNetError(f"{name}: expected a scale representable in fp16 (<= {_FP16_MAX}), found {value}")
    return np.float32(value)


def _fields(packed, name):
    """The four 2-bit fields of each byte, field i = bits 2i..2i+1: uint8 [..., 4]; rejects field value 3."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    fields = (packed[..., None] >> shifts) & np.uint8(3)                   # [..., 4]
    if (fields == 3).any():
        where = np.argwhere((fields == 3).any(axis=-1))[0]
        byte = int(packed[tuple(where)])
        raise RefBitNetError(f"{name}: expected 2-bit codes in {{0, 1, 2}}, found byte 0x{byte:02x} "
                             f"(a field equal to 3) at index {tuple(int(i) for i in where)}")
    return fields


def _check_len(data, expected, name, shape, layout):
    if data.size != expected:
        raise RefBitNetError(f"{name}: expected {expected} bytes of {layout} data for shape {shape}, "
                             f"found {data.size}")


# ----------------------------------------------------------------------------- HF release layout

def pack_hf(codes: np.ndarray) -> np.ndarray:
    """Pack ternary codes [N, K] into the Hugging Face release layout uint8 [N/4, K] (docs/SPEC.md §4).

    The output rows are cut into four blocks of R = N/4 rows; block i sits at bits 2i..2i+1::

        packed[r, c] = sum over i in 0..3 of (codes[i*R + r, c] + 1) << (2*i)

    Worked example, N = 4, K = 2 (R = 1)::

        codes = [[ 0, -1],          c = codes + 1 = [[1, 0],
                 [-1,  1],                           [0, 2],
                 [ 1,  0],                           [2, 1],
                 [ 1, -1]]                           [2, 0]]
        packed[0, 0] = 1 | 0<<2 | 2<<4 | 2<<6 = 0b10_10_00_01 = 0xA1
        packed[0, 1] = 0 | 2<<2 | 1<<4 | 0<<6 = 0b00_01_10_00 = 0x18

    This is what ``transformers.integrations.bitnet.pack_weights`` produces (for N divisible by 4,
    which every BitNet projection is; we reject other N because unpacking could not recover it).
    """
    codes = _codes_2d(codes, n_multiple=4, what="HF release layout: ")
    rows = codes.shape[0] // 4
    c = (codes + np.int8(1)).astype(np.uint8).reshape(4, rows, codes.shape[1])  # [4, N/4, K]
    return np.ascontiguousarray(c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6), dtype=np.uint8)  # [N/4, K]


def unpack_hf(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_hf: uint8 [N/4, K] -> int8 codes [N, K], codes[i*R + r, c] = field i of packed[r, c] - 1.

    Worked example: packed = [[0xA1, 0x18]] -> codes [[0, -1], [-1, 1], [1, 0], [1, -1]]
    (the example of pack_hf backwards). Equals ``transformers.integrations.bitnet.unpack_weights``.
    """
    packed = _packed(packed, "packed", 2)
    fields = _fields(packed, "packed")                                      # [N/4, K, 4]
    codes = np.moveaxis(fields, -1, 0).astype(np.int8) - np.int8(1)         # [4, N/4, K]
    return np.ascontiguousarray(codes.reshape(-1, packed.shape[1]))         # [N, K]


# ----------------------------------------------------------------------------- kernel layout

def pack_kernel(codes: np.ndarray) -> np.ndarray:
    """Pack ternary codes [N, K] row-major, four consecutive k per byte: uint8 [N, K/4], K % 4 == 0.

    Byte j of row n holds codes[n, 4j + i] + 1 at bits 2i (i = 0..3, lowest bits first)::

        packed[n, j] = sum over i in 0..3 of (codes[n, 4j + i] + 1) << (2*i)

    Worked example, one row, K = 8::

        codes[0] = [1, 0, -1, -1,   0, 0, 1, 1]    c = [2, 1, 0, 0,   1, 1, 2, 2]
        packed[0] = [2 | 1<<2 | 0<<4 | 0<<6,  1 | 1<<2 | 2<<4 | 2<<6] = [0x06, 0xA5]

    Why the Numba kernels read this layout (see refbitnet/kernels/v3_word_planes.py): each output row's codes are
    contiguous, so a kernel streams one row with unit stride, and reading the row as little-endian
    uint16 words gives 8 consecutive codes per word (word w holds k = 8w .. 8w+7, field t at bits
    2t). The kernel masks each field in place instead of shifting it down, and compensates by
    multiplying the matching activation by 4**(3 - t % 4) in an int16 "plane" built once per token;
    that makes the inner loop a run of int16 x int16 -> int32 multiply-adds (``vpmaddwd``), about a
    fifth of an instruction per weight. With codes c = w + 1 the kernel uses
    sum(w x) = sum(c x) - sum(x), so no per-weight subtraction is needed. (The HF layout interleaves
    four row blocks in one byte, which would force four rows to be processed in lockstep.)
    Word loads need an even number of bytes per row, i.e. K % 8 == 0; all BitNet widths are.
    """
    codes = _codes_2d(codes, k_multiple=4, what="kernel layout: ")
    n, k = codes.shape
    c = (codes + np.int8(1)).astype(np.uint8).reshape(n, k // 4, 4)        # [N, K/4, 4]
    return np.ascontiguousarray(c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6), dtype=np.uint8)  # [N, K/4]


def unpack_kernel(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_kernel: uint8 [N, K/4] -> int8 codes [N, K], codes[n, 4j + i] = field i of packed[n, j] - 1.

    Worked example: packed = [[0x06, 0xA5]] -> codes [[1, 0, -1, -1, 0, 0, 1, 1]].
    """
    packed = _packed(packed, "packed", 2)
    fields = _fields(packed, "packed")                                      # [N, K/4, 4]
    return np.ascontiguousarray((fields.astype(np.int8) - np.int8(1)).reshape(packed.shape[0], -1))  # [N, K]


# ----------------------------------------------------------------------------- GGUF I2_S (bitnet.cpp)

def pack_i2s(codes: np.ndarray, scale) -> np.ndarray:
    """Pack ternary codes [N, K] as GGUF I2_S (bitnet.cpp, x86): uint8 1-D [N*K/4 + 32].

    The row-major tensor is cut into blocks of 128 elements, 32 bytes each. Element j of a block
    (j = 32g + p, g = 0..3, p = 0..31) goes to byte p of the block at bit shift 6 - 2g, i.e. the
    first 32 elements fill the HIGH bits::

        byte[32b + p] = (c[128b + p] << 6) | (c[128b + 32 + p] << 4) | (c[128b + 64 + p] << 2) | c[128b + 96 + p]

    After the N*K/4 code bytes come 32 bytes: the scale as little-endian float32, then 28 zeros.
    bitnet.cpp's converter writes scale = max|W| of the dequantized weights W = codes * gamma,
    which is gamma itself (0 for an all-zero tensor); refbitnet stores the scale it is given.

    Worked example, a [1, 128] tensor with codes[0, 0] = +1, codes[0, 32] = -1, codes[0, 127] = +1
    and all other codes 0 (c = 1 everywhere else)::

        byte 0  = 2<<6 | 0<<4 | 1<<2 | 1 = 0x85      (elements 0, 32, 64, 96)
        byte 31 = 1<<6 | 1<<4 | 1<<2 | 2 = 0x56      (elements 31, 63, 95, 127)
        bytes 1..30 = 0x55; bytes 32..35 = float32 scale; bytes 36..63 = 0

    K must be divisible by 128 so that no block straddles two rows (bitnet.cpp's kernels need it).
    This is bitnet.cpp's x86 layout with ACT_PARALLEL, which include/gemm-config.h defines by default;
    its ARM build uses 64-element blocks of 16 bytes and a non-ACT_PARALLEL x86 build interleaves
    four rows per byte: neither reads the official file correctly.
    """
    codes = _codes_2d(codes, k_multiple=I2S_BLOCK, what="I2_S layout: ")
    scale = _scale(scale)
    c = (codes + np.int8(1)).astype(np.uint8).reshape(-1, 4, 32)           # [N*K/128, 4, 32]
    body = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]       # [N*K/128, 32]
    tail = np.zeros(I2S_TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return np.concatenate([body.astype(np.uint8).reshape(-1), tail])        # [N*K/4 + 32]


def unpack_i2s(data: np.ndarray, shape):
    """Inverse of pack_i2s: uint8 1-D [N*K/4 + 32] and shape (N, K) -> (codes int8 [N, K], scale float32).

    Worked example: the 64 bytes of pack_i2s's example with shape (1, 128) give back codes with
    +1 at column 0 and 127, -1 at column 32, 0 elsewhere, and the float32 scale from bytes 32..35.
    """
    data = _packed(data, "data", 1)
    n, k = _shape_2d(shape, k_multiple=I2S_BLOCK, what="I2_S layout: ")
    _check_len(data, n * k // 4 + I2S_TAIL_BYTES, "data", (n, k), "I2_S")
    body = data[: n * k // 4].reshape(-1, 32)                               # [N*K/128, 32]
    fields = _fields(body, "data")                                          # [N*K/128, 32, 4], field i at bits 2i
    groups = fields[..., ::-1]                                              # group g at shift 6 - 2g
    codes = np.moveaxis(groups, -1, 1).astype(np.int8) - np.int8(1)         # [N*K/128, 4, 32]
    scale = data[n * k // 4: n * k // 4 + 4].copy().view("<f4")[0]
    return np.ascontiguousarray(codes.reshape(n, k)), np.float32(scale)


# ----------------------------------------------------------------------------- llama.cpp TQ2_0 / TQ1_0

def _block_scales(codes, scale):
    """fp16 d per 256-element block, as llama.cpp's quantizer computes it from W = codes * scale:
    d = max|W| over the block, i.e. fp16(scale) for a block with a nonzero code and 0 for an all-zero block."""
    blocks = codes.reshape(-1, TQ_BLOCK)                                    # [N*K/256, 256]
    nonzero = (blocks != 0).any(axis=1)
    return np.where(nonzero, np.float16(scale), np.float16(0)).astype("<f2")  # [N*K/256]


def pack_tq2_0(codes: np.ndarray, scale) -> np.ndarray:
    """Pack ternary codes [N, K] as llama.cpp TQ2_0: uint8 1-D, 66 bytes per 256-element block.

    The row-major tensor is cut into 256-element blocks (K % 256 == 0, so blocks never straddle
    rows). A block is qs[64] then d (fp16, little-endian). Element 128h + 32l + m (h = 0..1,
    l = 0..3, m = 0..31) is in byte qs[32h + m] at bits 2l, LSB first, as c = w + 1::

        qs[32h + m] = sum over l in 0..3 of c[128h + 32l + m] << (2*l)

    d is what llama.cpp's ``quantize_row_tq2_0_ref`` (and gguf-py) write for W = codes * scale:
    the block's max|W|, i.e. fp16(scale), or 0 for an all-zero block. The value is d * w.

    Worked example, one block with codes[0] = +1, codes[32] = -1, codes[128] = +1, the rest 0::

        qs[0]  = 2 | 0<<2 | 1<<4 | 1<<6 = 0x52       (elements 0, 32, 64, 96)
        qs[32] = 2 | 1<<2 | 1<<4 | 1<<6 = 0x56       (elements 128, 160, 192, 224)
        every other qs byte = 0x55; then d = fp16(scale), e.g. 0.5 -> bytes 00 38
    """
    codes = _codes_2d(codes, k_multiple=TQ_BLOCK, what="TQ2_0 layout: ")
    scale = _scale(scale, fp16=True)
    c = (codes + np.int8(1)).astype(np.uint8).reshape(-1, 2, 4, 32)         # [B, h, l, m]
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)  # [B, 2, 32]
    d = _block_scales(codes, scale).view(np.uint8).reshape(-1, 2)           # [B, 2]
    return np.concatenate([qs.reshape(-1, 64).astype(np.uint8), d], axis=1).reshape(-1)  # [B * 66]


def unpack_tq2_0(data: np.ndarray, shape):
    """Inverse of pack_tq2_0: uint8 1-D and shape (N, K) -> (codes int8 [N, K], d float32 [N, K/256]).

    Worked example: the 66 bytes of pack_tq2_0's example with shape (1, 256) give codes with
    +1 at 0 and 128, -1 at 32, 0 elsewhere, and d = [[0.5]].
    """
    data = _packed(data, "data", 1)
    n, k = _shape_2d(shape, k_multiple=TQ_BLOCK, what="TQ2_0 layout: ")
    _check_len(data, n * k // TQ_BLOCK * TQ2_0_BLOCK_BYTES, "data", (n, k), "TQ2_0")
    blocks = data.reshape(-1, TQ2_0_BLOCK_BYTES)                            # [B, 66]
    fields = _fields(blocks[:, :64].reshape(-1, 2, 32), "data")             # [B, h, m, l]
    codes = np.moveaxis(fields, -1, 2).astype(np.int8) - np.int8(1)         # [B, h, l, m]
    d = blocks[:, 64:].copy().view("<f2").astype(np.float32)                # [B, 1]
    return np.ascontiguousarray(codes.reshape(n, k)), d.reshape(n, k // TQ_BLOCK)


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _trits_to_byte(c, weights):
    """Base-3 number sum(c[..., n, :] * weights[n]) (first trit most significant), scaled into a byte
    by ceil(q * 256 / 243) so that the n-th trit can be read back as ((byte * 3**n mod 256) * 3) >> 8."""
    q = np.tensordot(weights, c.astype(np.uint16), axes=([0], [-2]))       # [..., m]
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _byte_to_trits(q, count):
    """The first `count` trits (most significant first) of bytes q written by _trits_to_byte: uint8 [count, ...]."""
    pow3 = np.array([1, 3, 9, 27, 81][:count], dtype=np.uint8).reshape((count,) + (1,) * q.ndim)
    rotated = (q[None] * pow3).astype(np.uint8)                             # mod 256, as the C code's uint8
    return ((rotated.astype(np.uint16) * 3) >> 8).astype(np.uint8)           # [count, ...], values 0..2


def pack_tq1_0(codes: np.ndarray, scale) -> np.ndarray:
    """Pack ternary codes [N, K] as llama.cpp TQ1_0 (1.6875 bits per weight): 54 bytes per 256 elements.

    A block is qs[48], qh[4], d (fp16, little-endian); K % 256 == 0. Base-3 digits c = w + 1:

    - qs[m], m = 0..31, holds the 5 elements m + 32n (n = 0..4) of elements 0..159;
    - qs[32 + m], m = 0..15, holds the 5 elements 160 + m + 16n (n = 0..4) of elements 160..239;
    - qh[j], j = 0..3, holds the 4 elements 240 + j + 4n (n = 0..3) of elements 240..255.

    The digits form q = sum c_n * 3**(4 - n) (n = 0 most significant; qh's 4 digits are multiplied
    by 3 so they take the top four places), and the byte stored is ceil(q * 256 / 243). Trit n is
    then recovered without division: t_n = (((byte * 3**n) mod 256) * 3) >> 8. d is as in TQ2_0
    (fp16(scale), or 0 for an all-zero block). This is llama.cpp's ``quantize_row_tq1_0_ref``.

    Worked example: digits (2, 1, 0, 1, 2) (w = +1, 0, -1, 0, +1) give
    q = 2*81 + 1*27 + 0*9 + 1*3 + 2*1 = 194 and byte = ceil(194 * 256 / 243) = 205. Reading back:
    205*3 >> 8 = 2; (205*3 mod 256 = 103)*3 >> 8 = 1; (205*9 mod 256 = 53)*3 >> 8 = 0;
    (205*27 mod 256 = 159)*3 >> 8 = 1; (205*81 mod 256 = 221)*3 >> 8 = 2.
    """
    codes = _codes_2d(codes, k_multiple=TQ_BLOCK, what="TQ1_0 layout: ")
    scale = _scale(scale, fp16=True)
    c = (codes + np.int8(1)).astype(np.uint8).reshape(-1, TQ_BLOCK)         # [B, 256]
    qs0 = _trits_to_byte(c[:, :160].reshape(-1, 5, 32), _POW3)              # [B, 32]
    qs1 = _trits_to_byte(c[:, 160:240].reshape(-1, 5, 16), _POW3)           # [B, 16]
    qh = _trits_to_byte(c[:, 240:].reshape(-1, 4, 4), _POW3[:4])            # [B, 4]
    d = _block_scales(codes, scale).view(np.uint8).reshape(-1, 2)           # [B, 2]
    return np.concatenate([qs0, qs1, qh, d], axis=1).reshape(-1)             # [B * 54]


def unpack_tq1_0(data: np.ndarray, shape):
    """Inverse of pack_tq1_0: uint8 1-D and shape (N, K) -> (codes int8 [N, K], d float32 [N, K/256]).

    Worked example: a block whose qs[0] is 205 (see pack_tq1_0) decodes elements 0, 32, 64, 96, 128
    to +1, 0, -1, 0, +1. Every byte decodes to digits in {0, 1, 2}, so no byte value is rejected.
    """
    data = _packed(data, "data", 1)
    n, k = _shape_2d(shape, k_multiple=TQ_BLOCK, what="TQ1_0 layout: ")
    _check_len(data, n * k // TQ_BLOCK * TQ1_0_BLOCK_BYTES, "data", (n, k), "TQ1_0")
    blocks = data.reshape(-1, TQ1_0_BLOCK_BYTES)                            # [B, 54]
    t0 = _byte_to_trits(blocks[:, :32], 5)                                  # [5, B, 32] element 32n + m
    t1 = _byte_to_trits(blocks[:, 32:48], 5)                                # [5, B, 16] element 160 + 16n + m
    th = _byte_to_trits(blocks[:, 48:52], 4)                                # [4, B, 4]  element 240 + 4n + j
    digits = np.concatenate([np.moveaxis(t, 0, 1).reshape(blocks.shape[0], -1) for t in (t0, t1, th)], axis=1)
    codes = digits.astype(np.int8) - np.int8(1)                             # [B, 256]
    d = blocks[:, 52:].copy().view("<f2").astype(np.float32)                # [B, 1]
    return np.ascontiguousarray(codes.reshape(n, k)), d.reshape(n, k // TQ_BLOCK)
