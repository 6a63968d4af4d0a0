"""The BitNet b1.58 forward pass in plain NumPy: the ops, one decoder layer, the whole model.

What it is: the transformer of microsoft/bitnet-b1.58-2B-4T as one pure function per op (embedding,
rms_norm, BitLinear, RoPE, causal GQA attention, ReLU², tied LM head), ``decoder_layer`` reading one
formula per line, and ``forward``. Shapes follow the legend in ``refbitnet.config`` (S tokens in the
block, T tokens attended to, D, F, H, KVH, HD, V). Read docs/SPEC.md beside this file.

What it is not: a loader (``refbitnet.weights``, ``refbitnet.checkpoint``), the KV cache
(``refbitnet.kv_cache``), a checked public API (``refbitnet.api.Model`` checks every argument once and
then calls this), or fast (``refbitnet.runtime`` computes the same bits with Numba kernels and uses the
ops below). Nothing here checks its inputs: every value arrives already checked.

Numerics, one switch: ``numerics="int"`` (default): each BitLinear is int8 activations x ternary codes
summed exactly in int32, then ``y = acc / s * weight_scale`` (bitnet.cpp, the GPU kernels).
``numerics="fake-quant"``: ``(xq / s) @ codes.T`` in float32, then ``* weight_scale`` (transformers'
AutoBitLinear, QAT training). Equal in exact arithmetic; float32 rounding can flip an int8 code at the
next quantizer.
"""

from __future__ import annotations

import numpy as np

from .bf16 import bf16_to_f32
from .bitlinear import bitlinear_fake_quant, bitlinear_int
from .errors import RefBitNetError

LM_HEAD_CHUNK_ROWS = 1024        # vocab rows widened to float32 at a time by the LM head


# ============================================================================ the ops

def widen(rows: np.ndarray) -> np.ndarray:
    """A table slice as float32: bf16 bits (uint16) exactly, float16/float32 by cast."""
    rows = np.asarray(rows)
    return bf16_to_f32(rows) if rows.dtype == np.uint16 else rows.astype(np.float32)


def embed(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the embedding, widened: table [V, D] (bf16 bits uint16, or float16/32), ids [S] -> float32 [S, D]."""
    return widen(table[ids])                                                  # [S, D]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x**2) + eps) over the last axis, in float32. x [..., N], weight [N].

    Written as transformers writes it (x * rsqrt(var + eps), then * weight) so float rounding matches.
    """
    x = x.astype(np.float32, copy=False)
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)       # [..., 1]
    inv_rms = np.float32(1.0) / np.sqrt(variance + np.float32(eps))           # [..., 1]
    return weight * (x * inv_rms)                                              # [..., N]


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos, sin tables for half-split RoPE: positions [S] -> (cos, sin) float32 [S, HD].

    inv_freq[j] = theta**(-2j/HD), j < HD/2, rounded once to float32 (transformers rounds three float32 ops,
    an ulp apart in some entries: docs/SPEC.md §2; model_bf16 follows transformers); the angle is
    the float32 product position * inv_freq[j], as transformers computes it in float32; element j and
    j + HD/2 share it. cos and sin are evaluated in float64 and rounded once (correctly rounded float32).
    Training (refbitnet.train) uses this same table.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim                 # [HD/2]
    inv_freq = (1.0 / theta ** exponents).astype(np.float32)                           # [HD/2]
    angle = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]  # [S, HD/2] float32
    angle = np.concatenate([angle, angle], axis=-1).astype(np.float64)                 # [S, HD]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head: x [S, heads, HD], cos/sin [S, HD] -> [S, heads, HD].

    rope(x) = x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x[HD/2:], x[:HD/2]):
    element i pairs with i + HD/2 (the "NeoX" half split), not with i + 1.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)              # [S, heads, HD]
    return x * cos[:, None, :] + rotated * sin[:, None, :]                          # [S, heads, HD]


# exp_float32's constants (float32): log2(e); 1.5 * 2**23, whose add-and-subtract rounds a float32 of
# magnitude < 2**22 to the nearest integer; ln 2 split in a high part with few bits (n * LN2_HI is exact
# for |n| < 2**15) and the rest; the polynomial of Cephes' expf; the input below which e**x rounds to 0.
EXP_LOG2E = np.float32(1.44269504088896341)
EXP_ROUND = np.float32(12582912.0)
EXP_LN2_HI, EXP_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                         4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
EXP_LOWEST = np.float32(-104.0)         # e**-104 < 2**-150, half the smallest float32: rounds to 0


def exp_float32(x: np.ndarray) -> np.ndarray:
    """e**x for float32 x <= 0 (softmax's shifted scores), in plain float32 operations, elementwise.

    Why not np.exp: NumPy's float32 exp is SIMD code whose last bit no compiled loop reproduces; these
    multiplies and adds (no fused multiply-add) Numba computes identically, so the fast path's attention
    (refbitnet.attention_kernel) gets the same bits. e**x = 2**n * e**r with n the integer nearest
    x / ln 2 and r = x - n ln 2 in [-0.35, 0.35], where a degree-7 polynomial gives e**r; np.ldexp scales
    by 2**n exactly (one rounding where the result is subnormal). Faithful: under 1 ulp from e**x over every
    float32 in [-104, 0] (tests/test_attention.py). A NaN stays NaN.
    """
    x = np.maximum(x, EXP_LOWEST)                                 # x < -104 (and -inf) -> 0 at the end
    n = (x * EXP_LOG2E + EXP_ROUND) - EXP_ROUND                   # nearest integer to x / ln 2, in [-150, 0]
    r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO                     # x - n ln 2
    c0, c1, c2, c3, c4, c5 = EXP_POLY
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    e_r = (p * (r * r) + r) + np.float32(1.0)                     # e**r = 1 + r + r**2 p(r)
    with np.errstate(invalid="ignore"):                           # (a NaN n casts to any int; e_r is NaN)
        return np.ldexp(e_r, n.astype(np.int32))                  # 2**n e**r


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention, float32.

    q [S, H, HD] for positions start .. start+S-1; k, v [T, KVH, HD] for positions 0 .. T-1
    (T >= start + S). Query head h reads KV head h // (H // KVH). Returns [S, H, HD].

    The causal mask is applied by slicing: the query at position p attends to keys 0..p only, which
    is what an additive -inf mask does (exp(-inf) = 0). Each query is computed on its own, with
    arrays of the same shapes whether it arrives in a prompt block or alone during decoding, so
    prefill and token-by-token decoding give bit-identical results.

    Why every sum is spelled out instead of a matmul: a matmul leaves the order of its additions to
    BLAS, so no compiled loop could give its bits. Here each order is NumPy's own and fixed, and
    refbitnet.attention_kernel follows it, bit for bit: a score is the products q*k (each rounded)
    summed over HD by np.sum along the contiguous last axis, which is NumPy's pairwise summation (8
    partial sums in blocks of <= 128, halves above); the softmax uses exp_float32, and its
    denominator is np.sum over T (pairwise again); the output sums the rounded products weight*v
    over T along a non-contiguous axis, which NumPy adds in order t = 0, 1, 2, ... (both orders
    checked on this NumPy by tests/test_attention.py). NumPy picks its order from the memory layout, so
    order="C" pins the layout of the products (else they follow the transposed cache: T-major scores,
    whose sum over T NumPy adds one by one, not pairwise). The price: a BLAS matmul often rounds as
    torch's does, this order less often, so against transformers an activation crosses a rounding
    boundary of the next int8 quantizer more often (tests/test_model_vs_transformers.py bounds that).
    """
    s_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    groups = n_heads // n_kv_heads
    scale = np.float32(head_dim ** -0.5)
    out = np.empty_like(q)                                                        # [S, H, HD]
    q_grouped = q.reshape(s_len, n_kv_heads, groups, head_dim)                    # [S, KVH, G, HD]
    k_heads = k.transpose(1, 0, 2)                                                # [KVH, T, HD] view
    v_heads = v.transpose(1, 0, 2)                                                # [KVH, T, HD] view
    for i in range(s_len):
        t = start + i + 1                                                         # keys 0 .. start+i
        products = np.multiply(q_grouped[i][:, :, None], k_heads[:, None, :t], order="C")  # [KVH, G, T, HD]
        scores = np.sum(products, axis=-1, dtype=np.float32) * scale              # [KVH, G, T]
        shifted = scores - scores.max(axis=-1, keepdims=True)                     # [KVH, G, T], <= 0
        e = exp_float32(shifted)                                                  # [KVH, G, T]
        weights = e / np.sum(e, axis=-1, keepdims=True, dtype=np.float32)         # [KVH, G, T] softmax
        terms = np.multiply(weights[..., None], v_heads[:, None, :t], order="C")  # [KVH, G, T, HD]
        out[i] = np.sum(terms, axis=-2, dtype=np.float32).reshape(n_heads, head_dim)   # [H, HD]
    return out


def relu2(x: np.ndarray) -> np.ndarray:
    """relu(x)**2, BitNet's FFN activation."""
    r = np.maximum(x, np.float32(0))
    return r * r


def bitlinear(x: np.ndarray, codes: np.ndarray, weight_scale: np.float32, numerics: str = "int") -> np.ndarray:
    """BitLinear without bias or inner norm: x [S, K], ternary codes int8 [N, K] -> y [S, N] float32.

    "int":        xq, s = absmax_int8(x); acc = xq @ codes.T (int32); y = acc / s * weight_scale
    "fake-quant": y = ((xq / s) @ codes.T in float32) * weight_scale
    """
    if numerics == "int":
        return bitlinear_int(x, codes, weight_scale).y
    return bitlinear_fake_quant(x, codes, weight_scale)


def lm_head(x: np.ndarray, table: np.ndarray, chunk_rows: int = LM_HEAD_CHUNK_ROWS) -> np.ndarray:
    """Logits x @ table.T in float32: x [S, D], table [V, D] (bf16 bits uint16, or float16/32) -> [S, V].

    Full precision (not BitLinear). Widens chunk_rows vocab rows at a time, so there is never a
    float32 copy of the whole (tied) embedding. Each token is its own matrix-vector product, so a
    token's logits do not depend on how many tokens share the call (prefill == decode, bit for bit).
    """
    vocab = table.shape[0]
    logits = np.empty((x.shape[0], vocab), dtype=np.float32)                           # [S, V]
    for r0 in range(0, vocab, chunk_rows):
        rows = widen(table[r0:r0 + chunk_rows])                                       # [chunk, D]
        for s in range(x.shape[0]):
            logits[s, r0:r0 + rows.shape[0]] = rows @ x[s]                            # [chunk]
    return logits


# ============================================================================ the layer and the model

def decoder_layer(i, h, w, config, cos, sin, numerics="int", cache=None, start=0, record=None):
    """Decoder layer i: h float32 [S, D] at positions start .. start+S-1 -> [S, D].

    w: the layer's weights (refbitnet.weights.LayerWeights: four norm vectors, seven TernaryWeights).
    cache: a KVCache to append this block's keys and values to and attend over, or None (attend to the
    block alone). record(name, value): called with every named intermediate, or None.
    """
    eps, s_len = config.rms_norm_eps, h.shape[0]
    hd, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def project(name, x):                                # BitLinear with this layer's weight `name`
        p = w.ternary(name)
        try:
            if record is None or numerics != "int":
                return bitlinear(x, p.codes(), p.weight_scale, numerics)
            out = bitlinear_int(x, p.codes(), p.weight_scale)   # the same y, with its integers kept
        except RefBitNetError as e:                              # e.g. an inf made inside the model
            raise RefBitNetError(f"layers.{i}.{name}: input to the activation quantizer: {e}") from None
        record(f"{name}.xq", out.xq), record(f"{name}.s", out.s), record(f"{name}.acc", out.acc)
        return out.y

    # attention block
    x = rms_norm(h, w.input_layernorm, eps)                                   # [S, D]
    q = rope(project("q_proj", x).reshape(s_len, n_heads, hd), cos, sin)      # [S, H, HD]
    k = rope(project("k_proj", x).reshape(s_len, n_kv, hd), cos, sin)         # [S, KVH, HD]
    v = project("v_proj", x).reshape(s_len, n_kv, hd)                         # [S, KVH, HD]
    if cache is not None:                 # append (a float16 cache rounds), then attend to all T
        cache.store(i, start, k, v)
        k_all, v_all = cache.read(i, start + s_len)                           # float32 [T, KVH, HD]
    else:
        k_all, v_all = k, v
    a = attention(q, k_all, v_all, start).reshape(s_len, n_heads * hd)        # [S, H*HD]
    a_norm = rms_norm(a, w.attn_sub_norm, eps)                                # [S, D]   SubLN
    o = project("o_proj", a_norm)                                             # [S, D]
    h_attn = h + o                                                            # [S, D]   residual
    # feed-forward block
    x2 = rms_norm(h_attn, w.post_attention_layernorm, eps)                    # [S, D]
    gate = project("gate_proj", x2)                                           # [S, F]
    up = project("up_proj", x2)                                               # [S, F]
    m = relu2(gate) * up                                                      # [S, F]   ReLU² gated
    m_norm = rms_norm(m, w.ffn_sub_norm, eps)                                 # [S, F]   SubLN
    down = project("down_proj", m_norm)                                       # [S, D]
    out = h_attn + down                                                       # [S, D]   residual
    if record is not None:
        for name, value in (("input_layernorm", x), ("q", q), ("k", k), ("v", v), ("attn", a),
                            ("attn_sub_norm", a_norm), ("o_proj", o), ("resid_attn", h_attn),
                            ("post_attention_layernorm", x2), ("gate", gate), ("up", up),
                            ("ffn_act", m), ("ffn_sub_norm", m_norm), ("down_proj", down), ("out", out)):
            record(name, value)
    return out


def forward(config, weights, ids, numerics="int", cache=None, start=0, trace=None, last_only=False,
            trace_integers=False):
    """Logits float32 [S, V] ([1, V] if last_only) for token ids int64 [S] at positions start ...

    weights: refbitnet.weights.ModelWeights. cache: a KVCache holding positions 0 .. start-1, or
    None; this block's keys and values are appended to it. trace: a dict that receives a float32
    copy of every named intermediate ("embed", "layers.{i}.<name>", "norm", "logits"); with
    trace_integers also each projection's integer intermediates "layers.{i}.<proj>.xq" / ".s" /
    ".acc" (numerics "int").
    """
    s_len = ids.shape[0]
    cos, sin = rope_tables(start + np.arange(s_len), config.head_dim, config.rope_theta)  # [S, HD]
    record = recorder(trace, trace_integers)
    h = embed(weights.embed_tokens, ids)                                              # [S, D]
    if record:
        record("embed", h)
    for i, layer in enumerate(weights.layers):
        layer_record = None if record is None else prefixed(record, f"layers.{i}.")
        h = decoder_layer(i, h, layer, config, cos, sin, numerics, cache, start, layer_record)
    if cache is not None:
        cache.commit(start, ids)
    x = rms_norm(h, weights.norm, config.rms_norm_eps)                                # [S, D]
    if record:
        record("norm", x)
    logits = lm_head(x[-1:] if last_only else x, weights.output_table)                # [S or 1, V]
    if record:
        record("logits", logits)
    return logits


def recorder(trace, integers=False):
    """record(name, value) storing a copy into the dict trace (float tensors as float32; the integer
    intermediates, names ending .xq/.s/.acc, only when integers is true); None without a trace."""
    if trace is None:
        return None

    def record(name, value):
        if name.endswith((".xq", ".s", ".acc")):
            if integers:
                trace[name] = np.array(value, copy=True)
        else:
            trace[name] = np.array(value, dtype=np.float32, copy=True)
    return record


def prefixed(record, prefix):
    """record with prefix put before every name (a layer's "q" becomes "layers.3.q")."""
    return lambda name, value: record(prefix + name, value)
