"""GGUF embeddings and output heads in the ggml types engines and the hub write: F32, F16, BF16, Q8_0,
Q6_K, Q4_K. Each file is built by hand (tests/test_gguf.py's gguf_bytes, no refbitnet writer) from one
bf16 source table, imported, and compared with the source within the type's stated bound.

Bounds, for an imported value y of a source value x (bf16, so exactly a float32):

- F32, BF16: y == x (the file holds x exactly); F16: y == x for |x| >= 2**-14, |y - x| <= 2**-25 below
  (fp16 subnormal spacing 2**-24, rounding to nearest). These keep the file's dtype (float32, bf16 bits,
  float16).
- The quantized types are dequantized with gguf.quants.dequantize to float32 v and rounded once to
  bf16, adding at most |v| * 2**-8 (half a bf16 ulp; bf16 has an 8-bit significand). On top of that,
  per type, with amax the largest |x| of a block:
  - Q8_0 (blocks of 32, written by gguf.quants.quantize, bit-exact with ggml's reference quantizer):
    d = amax / 127 in float32, q = round(x / d), the file keeps fp16(d) =: d16. |d16 * q - x| <=
    |d * q - x| + |q| * |d16 - d| <= d / 2 + 127 * max(2**-11 * d, 2**-25)  (fp16 rounding of d:
    half an ulp, relative 2**-11 in the normal range, absolute 2**-25 among subnormals).
  - Q6_K (256-blocks of 16 sub-blocks of 16, 6-bit q in [-32, 31], int8 sub-block scales): the gguf
    package has no Q6_K quantizer, so this file's encoder (ggml's format, a simple choice of scales)
    writes it: sub-block step s_j = amax_j / 31, super scale d = fp16 rounded up from max_j s_j / 127,
    sc_j = ceil(s_j / d) <= 127, q = round(x / (d * sc_j)) in [-31, 31], never clipped. The error is
    at most half the step: |y - x| <= d * sc_j / 2 < (s_j + d) / 2.
  - Q4_K (256-blocks of 8 sub-blocks of 32, 4-bit q in [0, 15], y = d * sc_j * q - dmin * m_j with
    6-bit sc_j, m_j): also encoded here. Offset b_j = max(0, -min x_j) rounded up to a multiple of
    dmin (fp16 up of max_j b_j / 63); step t_j = (max x_j + b'_j) / 15 rounded up to a multiple of d
    (fp16 up of max_j t_j / 63); no clipping, so |y - x| <= d * sc_j / 2 < (t_j + d) / 2 with
    t_j <= (max x_j - min(min x_j, 0) + dmin) / 15.
  float32 arithmetic in the encoder and in gguf's dequantizer adds a few float32 ulps of amax (slack
  below: 2**-20 * amax).
"""

import numpy as np
import pytest

import gguf
from refbitnet.bf16 import bf16_to_f32, f32_to_bf16
from refbitnet.errors import GGUFError
from refbitnet.gguf import gguf_to_tensors, load_gguf, read_gguf
from refbitnet.gguf.reader import BLOCK_TYPES
from test_gguf import IDS, TINY, gguf_bytes, hand_built_model

F32, F16, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 8, 12, 14, 30
BF16_ROUNDING = 2.0 ** -8                # |bf16(v) - v| <= 2**-8 * |v|
SLACK = 2.0 ** -20


def source_table(v=TINY.vocab_size, d=TINY.hidden_size, seed=3):
    """bf16 bits [V, D]: N(0, 0.05) rows, plus rows that stress the formats: all zero, all positive
    (Q4_K's offset is 0), one large outlier, values so small that Q8_0's d is an fp16 subnormal, and
    a row whose sub-blocks differ by 2**10 in scale."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((v, d)) * 0.05).astype(np.float32)
    x[0] = 0
    x[1] = np.abs(x[1]) + 0.5
    x[2, 7] = 3.0
    x[3] *= 1e-4
    x[4, ::2] *= 2.0 ** -10
    return f32_to_bf16(x)


def up16(v):
    """The smallest fp16 value >= v (v >= 0, float32 arrays)."""
    h = np.asarray(v, np.float32).astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def encode_q6_k(x):
    """float32 [R, C] -> Q6_K bytes [R, C / 256 * 210] (layout of ggml's block_q6_K: ql[128], qh[64],
    scales int8[16], d fp16; element 128h + 64k + 32c + l has its low 4 bits in nibble k of
    ql[64h + 32c + l] and its high 2 bits at bit 2(2k + c) of qh[32h + l])."""
    rows, cols = x.shape
    blocks = x.reshape(-1, 16, 16)                                      # [n, sub-block j, 16]
    s = np.abs(blocks).max(axis=-1) / 31                                # [n, 16] steps
    d16 = up16(s.max(axis=-1) / 127)                                    # [n]
    d = d16.astype(np.float32)[:, None]
    sc = np.where(d > 0, np.ceil(s / np.where(d > 0, d, 1)), 0).astype(np.int8)   # [n, 16] <= 127
    step = (d * sc.astype(np.float32))[..., None]
    q = np.where(step > 0, np.rint(blocks / np.where(step > 0, step, 1)), 0).astype(np.int64)
    assert q.min() >= -32 and q.max() <= 31
    u = (q + 32).reshape(-1, 2, 2, 2, 32).astype(np.uint8)              # [n, h, k, c, l]
    lo, hi = u & 0xF, u >> 4
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hi = hi.reshape(-1, 2, 4, 32)                                       # [n, h, s = 2k + c, l]
    qh = sum(hi[:, :, s] << (2 * s) for s in range(4)).astype(np.uint8).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(-1, 1).view(np.uint8)], axis=1)
    return out.reshape(rows, cols // 256 * 210)


def bound_q6_k(x):
    blocks = x.reshape(-1, 16, 16)
    s = np.abs(blocks).max(axis=-1) / 31
    d = s.max(axis=-1, keepdims=True) / 127 * (1 + 2.0 ** -10)
    return np.broadcast_to(((s + d) / 2)[..., None], blocks.shape).reshape(x.shape)


def encode_q4_k(x):
    """float32 [R, C] -> Q4_K bytes [R, C / 256 * 144] (ggml's block_q4_K: d fp16, dmin fp16, 12 bytes
    of 6-bit scales and mins, qs[128]; sub-block 2i + k in nibble k of qs[32i .. 32i + 31])."""
    rows, cols = x.shape
    blocks = x.reshape(-1, 8, 32)                                       # [n, j, 32]
    b = np.maximum(0, -blocks.min(axis=-1))                             # [n, 8] offsets
    dmin16 = up16(b.max(axis=-1) / 63)
    dmin = dmin16.astype(np.float32)[:, None]
    m = np.where(dmin > 0, np.ceil(b / np.where(dmin > 0, dmin, 1)), 0).astype(np.uint8)   # <= 63
    off = dmin * m.astype(np.float32)                                   # b'_j >= b_j
    t = (blocks.max(axis=-1) + off) / 15
    d16 = up16(t.max(axis=-1) / 63)
    d = d16.astype(np.float32)[:, None]
    sc = np.where(d > 0, np.ceil(t / np.where(d > 0, d, 1)), 0).astype(np.uint8)           # <= 63
    step = (d * sc.astype(np.float32))[..., None]
    q = np.where(step > 0, np.rint((blocks + off[..., None]) / np.where(step > 0, step, 1)), 0)
    assert q.min() >= 0 and q.max() <= 15 and sc.max() <= 63 and m.max() <= 63
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)                        # [n, i, k, l]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    scales = np.zeros((len(q), 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out = np.concatenate([d16.reshape(-1, 1).view(np.uint8), dmin16.reshape(-1, 1).view(np.uint8),
                          scales, qs], axis=1)
    return out.reshape(rows, cols // 256 * 144)


def bound_q4_k(x):
    blocks = x.reshape(-1, 8, 32)
    b = np.maximum(0, -blocks.min(axis=-1))
    dmin = b.max(axis=-1, keepdims=True) / 63 * (1 + 2.0 ** -10)
    t = (blocks.max(axis=-1) + b + dmin) / 15
    d = t.max(axis=-1, keepdims=True) / 63 * (1 + 2.0 ** -10)
    return np.broadcast_to(((t + d) / 2)[..., None], blocks.shape).reshape(x.shape)


def bound_q8_0(x):
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    per_block = d / 2 + 127 * np.maximum(2.0 ** -11 * d, 2.0 ** -25)
    return np.broadcast_to(per_block, blocks.shape).reshape(x.shape)


def table_bytes(x, type_id):
    """The [V, D] float32 table x in ggml type type_id, as the file's bytes."""
    if type_id == F32:
        return x.astype("<f4").tobytes()
    if type_id == F16:
        return x.astype("<f2").tobytes()
    if type_id == BF16:
        return f32_to_bf16(x).tobytes()
    if type_id == Q8_0:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()
    return (encode_q6_k if type_id == Q6_K else encode_q4_k)(x).tobytes()


def write_with_table(tmp_path, type_id, x, name="token_embd.weight", extra=()):
    kv, tensors, *_ = hand_built_model(TINY)
    ne = [TINY.hidden_size, TINY.vocab_size]
    tensors = [(n, ne, type_id, table_bytes(x, type_id)) if n == name else t for t, n in
               ((t, t[0]) for t in tensors)] + list(extra)
    path = tmp_path / f"table-{type_id}-{name}.gguf"
    path.write_bytes(gguf_bytes(kv, tensors))
    return path


SOURCE = source_table()
X = bf16_to_f32(SOURCE)                                                  # float32 [V, D], exact
BOUNDS = {Q8_0: bound_q8_0, Q6_K: bound_q6_k, Q4_K: bound_q4_k}


def test_block_sizes_agree_with_the_gguf_package():
    for type_id, sizes in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == sizes


@pytest.mark.parametrize("type_id, dtype", [(F32, np.float32), (F16, np.float16), (BF16, np.uint16)])
def test_float_tables_keep_their_dtype_and_values(tmp_path, type_id, dtype):
    _, back = gguf_to_tensors(write_with_table(tmp_path, type_id, X))
    y = back["model.embed_tokens.weight"]
    assert y.dtype == dtype and y.shape == X.shape
    y = bf16_to_f32(y) if dtype == np.uint16 else y.astype(np.float32)
    if type_id == F16:
        err = np.abs(y - X)
        assert np.all(err[np.abs(X) >= 2.0 ** -14] == 0) and err.max() <= 2.0 ** -25
        assert (err > 0).any()                           # row 3 does reach the fp16 subnormals
    else:
        assert np.array_equal(y, X)


@pytest.mark.parametrize("type_id", [Q8_0, Q6_K, Q4_K])
def test_quantized_tables_within_their_bound(tmp_path, type_id):
    path = write_with_table(tmp_path, type_id, X)
    _, back = gguf_to_tensors(path)
    y = back["model.embed_tokens.weight"]
    assert y.dtype == np.uint16 and y.shape == X.shape                  # bf16 bits, 2 bytes a value
    # exactly gguf's dequantization, rounded once to bf16
    raw = read_gguf(path).raw("token_embd.weight").reshape(X.shape[0], -1)
    expected = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(type_id))
    assert np.array_equal(y, f32_to_bf16(expected))
    # and within the type's bound of the bf16 source
    y = bf16_to_f32(y)
    err = np.abs(y - X)
    amax = np.abs(X).max()
    bound = BOUNDS[type_id](X) + BF16_ROUNDING * np.abs(expected) + SLACK * amax
    worst = np.unravel_index(np.argmax(err - bound), X.shape)
    assert np.all(err <= bound), (worst, err[worst], bound[worst])
    assert np.array_equal(y[0], X[0])                                     # zeros stay zeros
    # the bound is not vacuous: the error is a visible fraction of it
    assert (err / bound).max() > 0.25


@pytest.mark.parametrize("type_id", [Q8_0, Q6_K, Q4_K])
def test_model_from_a_quantized_embedding(tmp_path, type_id):
    """The imported model computes with exactly the bf16 table, on both backends (the Numba LM head
    reads bf16 bits, which the quantized types are imported as)."""
    from refbitnet.checkpoint import model_from_tensors
    path = write_with_table(tmp_path, type_id, X)
    config, tensors = gguf_to_tensors(path)
    expected = model_from_tensors(config, dict(tensors), source="tensors").forward(IDS)
    assert np.array_equal(load_gguf(path).forward(IDS), expected)
    if type_id == Q6_K:
        numba = load_gguf(path, backend="numba").forward(IDS)
        assert np.array_equal(numba, model_from_tensors(config, dict(tensors), source="t",
                                                        backend="numba").forward(IDS))


def test_untied_q6_k_output_head(tmp_path):
    """llama-quantize's default for an output head is Q6_K: an untied file imports it as bf16 bits."""
    out = X[::-1].copy()
    extra = [("output.weight", [TINY.hidden_size, TINY.vocab_size], Q6_K, table_bytes(out, Q6_K))]
    config, back = gguf_to_tensors(write_with_table(tmp_path, F16, X, extra=extra))
    assert not config.tie_word_embeddings
    head = bf16_to_f32(back["lm_head.weight"])
    assert np.all(np.abs(head - out) <= bound_q6_k(out) + BF16_ROUNDING * np.abs(head) * 1.01 + SLACK)


def test_refused_table_types_and_bad_scales(tmp_path):
    kv, tensors, *_ = hand_built_model(TINY)
    q4_0 = [(n, ne, 2, bytes(TINY.vocab_size * TINY.hidden_size // 32 * 18)) if n == "token_embd.weight"
            else (n, ne, t, d) for n, ne, t, d in tensors]
    (tmp_path / "q4_0.gguf").write_bytes(gguf_bytes(kv, q4_0))
    with pytest.raises(GGUFError, match=r"token_embd\.weight.*Q4_0"):
        gguf_to_tensors(tmp_path / "q4_0.gguf")
    # a Q8_0 block whose fp16 scale is inf: a clear error naming the tensor and the first bad index
    data = bytearray(table_bytes(X, Q8_0))
    data[34 * 9:34 * 9 + 2] = np.float16(np.inf).tobytes()                 # row 1, block 1
    bad = [(n, ne, Q8_0, bytes(data)) if n == "token_embd.weight" else (n, ne, t, d) for n, ne, t, d in tensors]
    (tmp_path / "inf.gguf").write_bytes(gguf_bytes(kv, bad))
    with pytest.raises(GGUFError, match=r"token_embd\.weight' \(Q8_0\): expected finite values.*\(1, 32\)"):
        gguf_to_tensors(tmp_path / "inf.gguf")
    # a projection in a float type is still refused: BitNet projections are ternary
    q6 = [(n, ne, Q6_K, bytes(256 * 256 // 256 * 210)) if n == "blk.0.attn_q.weight" else (n, ne, t, d)
          for n, ne, t, d in tensors]
    (tmp_path / "q6-proj.gguf").write_bytes(gguf_bytes(kv, q6))
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight.*expected a ternary type.*Q6_K"):
        gguf_to_tensors(tmp_path / "q6-proj.gguf")


def test_f16_export_of_the_shipped_model(tmp_path):
    """The default F16 embedding moves exactly the shipped bf16 values below fp16's normal range
    (|x| < 2**-14) that are not on fp16's subnormal grid, each by at most 2**-25; a BF16 embedding moves
    none (and the logits stay bit-identical: tests/test_gguf.py::test_shipped_model_round_trip)."""
    import refbitnet
    from refbitnet.errors import CheckpointError
    from refbitnet.gguf import save_gguf
    try:
        model = refbitnet.load(backend="numpy")
    except CheckpointError:
        pytest.skip("no model ships with this build")
    x = bf16_to_f32(np.asarray(model.release_tensors()["model.embed_tokens.weight"]))
    save_gguf(model, tmp_path / "f16.gguf", layout="tq2_0")
    y = gguf_to_tensors(tmp_path / "f16.gguf")[1]["model.embed_tokens.weight"].astype(np.float32)
    moved = y != x
    expected = (np.abs(x) < 2.0 ** -14) & (x.astype(np.float16).astype(np.float32) != x)
    assert np.array_equal(moved, expected) and np.abs(y - x).max() <= 2.0 ** -25
