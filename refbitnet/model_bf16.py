"""The forward pass as transformers' BitNet computes it in bfloat16, the release's torch_dtype.

What it is: refbitnet.model's forward pass with every rounding to bf16 where transformers'
``BitNetForCausalLM`` (``torch_dtype=torch.bfloat16``, ``attn_implementation="eager"``, run eagerly)
puts one, so that an implementation that claims "transformers in bf16" can be compared with it.
Read it beside refbitnet/model.py: ``decoder_layer`` below is that file's decoder layer line for line,
``bf16(...)`` marking each rounding. Values are float32 arrays holding bf16 values (refbitnet keeps no
bf16 dtype); ``bf16`` is ``refbitnet.quant.bf16_values``, round to nearest, ties to even, as torch's
``.to(torch.bfloat16)``.

Where transformers rounds (eager torch on a bf16 tensor computes each op in float32 and rounds its
result to bf16; a bf16 matmul multiplies bf16 values exactly, sums in float32 and rounds once):

- embedding rows: bf16 (the table is bf16);
- RMSNorm (``BitNetRMSNorm``): x * rsqrt(mean(x²) + eps) in float32, rounded, then times the bf16
  weight, rounded;
- RoPE: inv_freq, the angle, cos and sin computed in float32, rounded (``.to(x.dtype)``); x*cos,
  rotate_half(x)*sin and their sum each rounded;
- attention (``eager_attention_forward``): q @ k.T rounded, * head_dim**-0.5 rounded, softmax in float32
  (``dtype=torch.float32``) rounded (``.to(query.dtype)``), p @ v rounded;
- BitLinear: offline ``AutoBitLinear`` = ``refbitnet.bitlinear.bitlinear_fake_quant`` with the
  "transformers-bf16" numerics (ActQuant in float32, xq / s rounded, the ternary matmul rounded, times
  the bf16 weight_scale rounded); the legacy ``BitLinear`` (divide-convention checkpoints) =
  ``legacy_bitlinear`` below;
- ReLU²: relu(x)² rounded, times up rounded; each residual add rounded;
- LM head (``lm_head``, tied to the bf16 embedding): x @ table.T rounded, so logits are bf16 values.

What it cannot promise: bits where torch and NumPy sum in another order (the matmuls' float32
accumulators, RMSNorm's mean, softmax's sum) or evaluate exp / cos / sin differently; torch's order
itself depends on the CPU's vector width and the kernel library, so no fixed order could match every
machine. Those differ by float32 ulps, far below a bf16 step (2**16 float32 ulps), so after rounding to
bf16 a value differs only where it sits that close to a rounding boundary, and then by a step; an int8
activation code one apart at the next quantizer then carries the difference on through its token's
row. tests/test_model_bf16.py checks that every differing row has such a cause, and counts them.
This file follows eager torch (``TORCHDYNAMO_DISABLE=1``). Compiled, ActQuant computes the same float32
chain; the legacy BitLinear's bf16 quantizer and ``post_quant_process`` would be fused in float32.

Like refbitnet.model it checks nothing: refbitnet.api.Model checks every argument first. The KV
cache stores the bf16 keys and values exactly in float32 (a float16 cache may round them again).
"""

from __future__ import annotations

import numpy as np

from .bitlinear import bitlinear_fake_quant
from .errors import RefBitNetError
from .model import (LM_HEAD_CHUNK_ROWS, embed as embed_f32, prefixed, recorder, rms_norm as rms_norm_f32,
                    widen)
from .quant import absmax_int8, bf16_values as bf16

ONE = np.float32(1.0)


# ============================================================================ the ops

def embed(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the bf16 embedding: ids [S] -> float32 [S, D] of bf16 values (a float table is rounded)."""
    return bf16(embed_f32(table, ids))                                       # [S, D]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """BitNetRMSNorm on bf16 x [..., N]: bf16(weight * bf16(x * rsqrt(mean(x²) + eps))), weight [N] bf16.

    transformers normalizes in float32 (``hidden_states.to(torch.float32)``), rounds back to the input's
    dtype, and only then multiplies by the bf16 weight: two roundings, unlike refbitnet.model's one.
    """
    normalized = bf16(rms_norm_f32(x, ONE, eps))                 # [..., N] x * inv_rms in float32, rounded
    return bf16(bf16(weight) * normalized)                        # [..., N] bf16 weight * bf16 -> rounded


def rope_tables_bf16(positions: np.ndarray, head_dim: int, theta: float):
    """cos, sin as BitNetRotaryEmbedding returns them to a bf16 model: positions [S] -> bf16 [S, HD] each.

    Unlike refbitnet.model.rope_tables (inv_freq evaluated in float64, rounded once), inv_freq is computed
    as transformers does, in float32 ops: e = fl(arange(0, HD, 2) / HD), p = fl(theta ** e) (a correctly
    rounded power here), inv_freq = fl(1 / p); the two differ by an ulp in some entries, which moves cos
    and sin at large positions. The angle position * inv_freq is the float32 product; cos and sin are
    evaluated in float64, rounded to float32 (torch's float32 cos/sin mostly agrees), then to bf16
    (``cos.to(x.dtype)``).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)          # [HD/2] float32
    power = (np.float64(np.float32(theta)) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power                                                      # [HD/2] float32
    angle = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]           # [S, HD/2]
    angle = np.concatenate([angle, angle], axis=-1).astype(np.float64)                     # [S, HD]
    return bf16(np.cos(angle).astype(np.float32)), bf16(np.sin(angle).astype(np.float32))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """apply_rotary_pos_emb in bf16: x [S, heads, HD], bf16 cos/sin [S, HD] -> [S, heads, HD].

    bf16(bf16(x*cos) + bf16(rotate_half(x)*sin)): each product and the sum rounded (eager torch).
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)              # [S, heads, HD]
    return bf16(bf16(x * cos[:, None, :]) + bf16(rotated * sin[:, None, :]))         # [S, heads, HD]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 as torch's CPU kernel writes it: exp(x - max) * fl(1 / sum).

    torch multiplies by the reciprocal of the sum (refbitnet.model divides); exp is evaluated in float64
    and rounded once, which torch's vectorized float32 exp equals in most but not all cases.
    """
    shifted = scores - scores.max(axis=-1, keepdims=True)                      # [..., T] float32
    weights = np.exp(shifted.astype(np.float64)).astype(np.float32)            # [..., T]
    inv_sum = np.float32(1.0) / weights.sum(axis=-1, keepdims=True, dtype=np.float32)   # [..., 1]
    return weights * inv_sum


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """eager_attention_forward in bf16: q [S, H, HD], k, v [T, KVH, HD] (bf16 values) -> [S, H, HD].

    Causal by slicing, one query at a time, as refbitnet.model.attention (the additive mask adds 0 or the
    bf16 minimum, whose exp is exactly 0 in float32). Each matmul is rounded once, the scaled scores
    again, the float32 softmax once more before it meets the bf16 values.
    """
    s_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    groups = n_heads // n_kv_heads
    scale = np.float32(head_dim ** -0.5)             # torch multiplies a bf16 tensor by a float32 scalar
    out = np.empty_like(q)                                                           # [S, H, HD]
    q_grouped = q.reshape(s_len, n_kv_heads, groups, head_dim)                       # [S, KVH, G, HD]
    out_grouped = out.reshape(s_len, n_kv_heads, groups, head_dim)                   # (views)
    k_t = k.transpose(1, 2, 0)                                                       # [KVH, HD, T] view
    v_t = v.transpose(1, 0, 2)                                                       # [KVH, T, HD] view
    for i in range(s_len):
        t = start + i + 1                                                            # keys 0 .. start+i
        scores = bf16(bf16(q_grouped[i] @ k_t[:, :, :t]) * scale)                    # [KVH, G, T]
        weights = bf16(softmax(scores))                                              # [KVH, G, T]
        out_grouped[i] = bf16(weights @ v_t[:, :t])                                  # [KVH, G, HD]
    return out


def relu2(x: np.ndarray) -> np.ndarray:
    """ReLUSquaredActivation on bf16: relu(x)² rounded (torch.square of a bf16 tensor)."""
    r = np.maximum(x, np.float32(0))
    return bf16(r * r)


def legacy_bitlinear(x: np.ndarray, codes: np.ndarray, stored_scale: np.float32) -> np.ndarray:
    """transformers' legacy ``BitLinear`` in a bf16 model, eager: x [S, K] bf16, codes [N, K] -> [S, N].

    activation_quant runs on the bf16 tensor itself (reciprocal, 127 * it and x * s each rounded to bf16:
    the "transformers-legacy-bf16" numerics), F.linear(xq in bf16, codes) sums the integers exactly in
    float32 and rounds the sum to bf16, and post_quant_process DIVIDES: bf16(y / bf16(stored * s)).
    stored_scale: the file's weight_scale as transformers holds it (a bf16 value).
    """
    xq, s = absmax_int8(x, "transformers-legacy-bf16")                       # int8 [S, K], bf16 s [S]
    acc = bf16(xq.astype(np.float32) @ codes.T.astype(np.float32))           # [S, N] exact, then rounded
    return bf16(acc / bf16(stored_scale * s[:, None]))                       # [S, N]


def lm_head(x: np.ndarray, table: np.ndarray, chunk_rows: int = LM_HEAD_CHUNK_ROWS) -> np.ndarray:
    """Logits bf16(x @ table.T): x [S, D] bf16 values, table [V, D] bf16 bits (or float, rounded) -> [S, V].

    As refbitnet.model.lm_head, a chunk of rows widened at a time and one matrix-vector product per
    token; then rounded, since transformers' lm_head is a bf16 nn.Linear.
    """
    vocab = table.shape[0]
    logits = np.empty((x.shape[0], vocab), dtype=np.float32)                          # [S, V]
    for r0 in range(0, vocab, chunk_rows):
        rows = table[r0:r0 + chunk_rows]
        rows = widen(rows) if rows.dtype == np.uint16 else bf16(widen(rows))           # [chunk, D]
        for s in range(x.shape[0]):
            logits[s, r0:r0 + rows.shape[0]] = rows @ x[s]                             # [chunk] float32
    return bf16(logits)


# ============================================================================ the layer and the model

def decoder_layer(i, h, w, config, cos, sin, cache=None, start=0, record=None, linear="autobitlinear"):
    """Decoder layer i in bf16: h [S, D] (bf16 values) at positions start .. start+S-1 -> [S, D].

    As refbitnet.model.decoder_layer (w, cache, record alike); cos, sin: bf16 tables [S, HD] from
    rope_tables_bf16. linear: "autobitlinear" (the release: y = bf16(bf16(xq/s @ codes.T) * ws)) or
    "legacy" (a divide-convention file: legacy_bitlinear with the stored scale 1 / w.weight_scale).
    """
    eps, s_len = config.rms_norm_eps, h.shape[0]
    hd, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def project(name, x):                                # BitLinear with this layer's weight `name`
        p = w.ternary(name)
        try:
            if linear == "legacy":             # refbitnet holds 1 / stored in float32; bf16 of its inverse
                return legacy_bitlinear(x, p.codes(), bf16(ONE / p.weight_scale))   # is the stored bf16
            return bitlinear_fake_quant(x, p.codes(), p.weight_scale, "transformers-bf16")
        except RefBitNetError as e:                              # e.g. an inf made inside the model
            raise RefBitNetError(f"layers.{i}.{name}: input to the activation quantizer: {e}") from None

    # attention block
    x = rms_norm(h, w.input_layernorm, eps)                                   # [S, D]
    q = rope(project("q_proj", x).reshape(s_len, n_heads, hd), cos, sin)      # [S, H, HD]
    k = rope(project("k_proj", x).reshape(s_len, n_kv, hd), cos, sin)         # [S, KVH, HD]
    v = project("v_proj", x).reshape(s_len, n_kv, hd)                         # [S, KVH, HD]
    if cache is not None:                 # append (float32 holds bf16 exactly), then attend to all T
        cache.store(i, start, k, v)
        k_all, v_all = cache.read(i, start + s_len)                           # [T, KVH, HD]
    else:
        k_all, v_all = k, v
    a = attention(q, k_all, v_all, start).reshape(s_len, n_heads * hd)        # [S, H*HD]
    a_norm = rms_norm(a, w.attn_sub_norm, eps)                                # [S, D]   SubLN
    o = project("o_proj", a_norm)                                             # [S, D]
    h_attn = bf16(h + o)                                                      # [S, D]   residual
    # feed-forward block
    x2 = rms_norm(h_attn, w.post_attention_layernorm, eps)                    # [S, D]
    gate = project("gate_proj", x2)                                           # [S, F]
    up = project("up_proj", x2)                                               # [S, F]
    m = bf16(relu2(gate) * up)                                                # [S, F]   ReLU² gated
    m_norm = rms_norm(m, w.ffn_sub_norm, eps)                                 # [S, F]   SubLN
    down = project("down_proj", m_norm)                                       # [S, D]
    out = bf16(h_attn + down)                                                 # [S, D]   residual
    if record is not None:
        for name, value in (("input_layernorm", x), ("q", q), ("k", k), ("v", v), ("attn", a),
                            ("attn_sub_norm", a_norm), ("o_proj", o), ("resid_attn", h_attn),
                            ("post_attention_layernorm", x2), ("gate", gate), ("up", up),
                            ("ffn_act", m), ("ffn_sub_norm", m_norm), ("down_proj", down), ("out", out)):
            record(name, value)
    return out


def forward(config, weights, ids, cache=None, start=0, trace=None, last_only=False, linear="autobitlinear"):
    """Logits [S, V] ([1, V] if last_only), float32 holding bf16 values, for token ids int64 [S].

    As refbitnet.model.forward (weights, cache, start, trace names alike; no integer trace: the
    fake-quant form has no int32 accumulator). linear: see decoder_layer.
    """
    s_len = ids.shape[0]
    cos, sin = rope_tables_bf16(start + np.arange(s_len), config.head_dim, config.rope_theta)  # [S, HD]
    record = recorder(trace)
    h = embed(weights.embed_tokens, ids)                                              # [S, D]
    if record:
        record("embed", h)
    for i, layer in enumerate(weights.layers):
        layer_record = None if record is None else prefixed(record, f"layers.{i}.")
        h = decoder_layer(i, h, layer, config, cos, sin, cache, start, layer_record, linear)
    if cache is not None:
        cache.commit(start, ids)
    x = rms_norm(h, weights.norm, config.rms_norm_eps)                                # [S, D]
    if record:
        record("norm", x)
    logits = lm_head(x[-1:] if last_only else x, weights.output_table)                # [S or 1, V]
    if record:
        record("logits", logits)
    return logits
