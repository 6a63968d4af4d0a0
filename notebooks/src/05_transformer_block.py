# %% [markdown]
# # 05 · One transformer block of BitNet b1.58, with shapes
#
# Notebooks 01-04 built the BitLinear layer. Here it goes into the decoder layer of 2B4T (docs/SPEC.md §2):
#
# ```
# x = rms_norm(h, input_layernorm)                                   # [S, D]
# q, k, v = bitlinear(x, q_proj), bitlinear(x, k_proj), bitlinear(x, v_proj)
# q, k = rope(q), rope(k)                                            # half-split RoPE
# a = attention(q, k, v)                                             # causal, grouped-query
# h = h + bitlinear(rms_norm(a, attn_sub_norm), o_proj)              # SubLN before o_proj
# x = rms_norm(h, post_attention_layernorm)
# m = relu(bitlinear(x, gate_proj))**2 * bitlinear(x, up_proj)       # ReLU², gated
# h = h + bitlinear(rms_norm(m, ffn_sub_norm), down_proj)            # SubLN before down_proj
# ```
#
# We build a model with the exact 2B4T layer sizes (D = 2560, H = 20 query heads, KVH = 5 KV heads,
# HD = 128, F = 6912) but one layer and a 1000-token vocabulary, run it with a trace, and then redo
# the layer by hand with the functions of `refbitnet.model` — the same functions the model calls.

# %%
import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T, Model
from refbitnet.model import attention, bitlinear, relu2, rms_norm, rope, rope_tables
from refbitnet.train.model import init_parameters

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

cfg = BITNET_2B4T.replace(num_hidden_layers=1, vocab_size=1000, bos_token_id=1, eos_token_id=2)
weights = init_parameters(cfg, seed=0)               # latent float32 weights under the release names
rng = np.random.default_rng(1)
for name in weights:                                 # norm weights near 1 rather than exactly 1
    if name.endswith("norm.weight"):
        weights[name] = (1 + 0.1 * rng.standard_normal(weights[name].shape)).astype(np.float32)
model = Model(cfg, weights)                          # bf16-master weights: absmean-quantized at load
print(model)

S = 8
ids = rng.integers(0, cfg.vocab_size, size=S)
trace = {}
logits = model.forward(ids, trace=trace)             # [S, V]
for name, value in trace.items():
    print(f"{name:<36} {str(value.shape):>16}")

# %% [markdown]
# ## The layer by hand
#
# Every line below is one line of docs/SPEC.md §2, using the model's own functions and weights
# (`model.weights.layers[0]` holds the norm weights and the packed projections).

# %%
w, eps = model.weights.layers[0], cfg.rms_norm_eps
H, KVH, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def proj(x, p):                                       # BitLinear with the layer's ternary weight
    return bitlinear(x, p.codes(), p.weight_scale, "int")


h = trace["embed"]                                                      # [S, D]
cos, sin = rope_tables(np.arange(S), HD, cfg.rope_theta)                # [S, HD] x2
x = rms_norm(h, w.input_layernorm, eps)                                 # [S, D]
q = rope(proj(x, w.q_proj).reshape(S, H, HD), cos, sin)                 # [S, D] -> [S, H, HD]
k = rope(proj(x, w.k_proj).reshape(S, KVH, HD), cos, sin)               # [S, KVH*HD] -> [S, KVH, HD]
v = proj(x, w.v_proj).reshape(S, KVH, HD)                               # [S, KVH, HD]
a = attention(q, k, v, start=0).reshape(S, H * HD)                      # [S, H, HD] -> [S, D]
a_norm = rms_norm(a, w.attn_sub_norm, eps)                              # [S, D]   SubLN
h_attn = h + proj(a_norm, w.o_proj)                                     # [S, D]
x2 = rms_norm(h_attn, w.post_attention_layernorm, eps)                  # [S, D]
gate, up = proj(x2, w.gate_proj), proj(x2, w.up_proj)                   # [S, F] x2
m = relu2(gate) * up                                                    # [S, F]
m_norm = rms_norm(m, w.ffn_sub_norm, eps)                               # [S, F]   SubLN
out = h_attn + proj(m_norm, w.down_proj)                                # [S, F] -> [S, D]

for name, mine in [("q", q), ("k", k), ("v", v), ("attn", a), ("attn_sub_norm", a_norm),
                   ("resid_attn", h_attn), ("ffn_act", m), ("ffn_sub_norm", m_norm), ("out", out)]:
    print(f"layers.0.{name:<14} identical to the model's trace: {np.array_equal(mine, trace['layers.0.' + name])}")

# %% [markdown]
# ## RMSNorm
#
# `rms_norm(x, w) = w * x / sqrt(mean(x²) + eps)` over the last axis: each token is rescaled to
# root-mean-square 1, then multiplied elementwise by a learned weight. No mean is subtracted and
# there is no bias. The output does not depend on the scale of the input — up to eps, which is
# not always negligible: the embedding rows here have mean square ≈ 0.02² = 4e-4, and eps = 1e-5
# is 2.5 % of that, so the first norm's output has rms ≈ sqrt(4e-4 / (4e-4 + 1e-5)) ≈ 0.988.

# %%
ones = np.ones(cfg.hidden_size, dtype=np.float32)
r = rms_norm(h, ones, eps)
mean_square = (h.astype(np.float64) ** 2).mean(axis=1)
print("rms of rms_norm(h) per token:     ", np.sqrt((r ** 2).mean(axis=1)).round(4))
print("predicted sqrt(ms / (ms + eps)):  ", np.sqrt(mean_square / (mean_square + eps)).round(4))
print("rms of rms_norm(1000 * h):        ", np.sqrt((rms_norm(1000 * h, ones, eps) ** 2).mean(axis=1)).round(4))

# %% [markdown]
# ## SubLN: a norm right before o_proj and before down_proj
#
# A standard Llama block has two norms per layer (before attention, before the MLP). BitNet adds
# two more *inside* the sublayers: `attn_sub_norm` on the attention output (width D) before o_proj,
# and `ffn_sub_norm` on the gated ReLU² product (width F = 6912) before down_proj. Their job is to
# hand the int8 activation quantizer (notebook 02) inputs of a controlled scale. In a trained model
# the scale of the raw product varies between tokens and layers; in this random one it is about
# 0.37, and after the norm it is 1 times the learned norm weight (which is near 1 here).

# %%
def token_rms(t):
    return np.sqrt((t.astype(np.float64) ** 2).mean(axis=-1))


print("per-token rms of the FFN product before ffn_sub_norm:", token_rms(m).round(3))
print("per-token rms after ffn_sub_norm:                    ", token_rms(m_norm).round(3))
print("norm widths:", {n: getattr(w, n).shape for n in ("input_layernorm", "attn_sub_norm", "post_attention_layernorm", "ffn_sub_norm")})

# %% [markdown]
# ## ReLU², gated
#
# The FFN is gated like SwiGLU, but with relu(x)² in place of SiLU: `m = relu(gate)² · up`. Half
# of the gate values are negative and give exact zeros, so the product fed to down_proj is sparse.
# (bitnet.cpp's graph at one point ran this FFN with SiLU, a bug that raises wikitext-2
# perplexity from 17 to ~100 — docs/SPEC.md §5.)

# %%
t = np.linspace(-3, 3, 601, dtype=np.float32)
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2))
a1.plot(t, relu2(t), label="relu(x)² (BitNet)")
a1.plot(t, t / (1 + np.exp(-t)), label="silu(x) (Llama)")
a1.set_ylim(-0.5, 4)
a1.legend()
a1.set_title("FFN activations")
a2.hist(m.ravel(), bins=200, log=True)
a2.set_title(f"relu(gate)²·up: {float((m == 0).mean()):.0%} exact zeros")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## RoPE, half-split
#
# Each head vector of q and k is rotated by position-dependent angles. The 128 dimensions form 64
# pairs, each rotated by angle pos·θ_j with θ_j = 500000^(-2j/128): fast rotations for small j,
# very slow ones for large j. In this model (the Hugging Face / NeoX convention) **element i pairs
# with element i + 64**, not with i + 1 as in the original RoPE paper and in Meta's Llama code
# (whose checkpoints are permuted to match). Using the wrong pairing on these weights is a classic
# conversion bug.

# %%
cos8, sin8 = rope_tables(np.arange(2), HD, cfg.rope_theta)             # positions 0 and 1
vec = np.zeros((2, 1, HD), dtype=np.float32)
vec[:, 0, 0] = 1.0                                                      # a unit vector along dim 0
rot = rope(vec, cos8, sin8)                                             # [2, 1, HD]
print("position 1, dims with nonzero output:", np.flatnonzero(np.abs(rot[1, 0]) > 1e-7), "(dim 0 pairs with 64)")

# rotations preserve length, and q.k depends only on the distance between the positions
qv, kv = rng.standard_normal(HD).astype(np.float32), rng.standard_normal(HD).astype(np.float32)
cosT, sinT = rope_tables(np.arange(64), HD, cfg.rope_theta)
qr = rope(np.broadcast_to(qv, (64, 1, HD)).copy(), cosT, sinT)[:, 0]   # q at positions 0..63
kr = rope(np.broadcast_to(kv, (64, 1, HD)).copy(), cosT, sinT)[:, 0]
dots = qr @ kr.T                                                        # [64, 64] q at m, k at n
print("|rope(q)| / |q| at position 63:", float(np.linalg.norm(qr[63]) / np.linalg.norm(qv)))
print("q(m).k(n) for (m, n) = (10, 3), (20, 13), (60, 53):", dots[10, 3], dots[20, 13], dots[60, 53])

inv_freq = cfg.rope_theta ** (-np.arange(0, HD, 2) / HD)
fig, ax = plt.subplots(figsize=(11, 3))
ax.semilogy(2 * np.pi / inv_freq)
ax.set_xlabel("pair j (dims j and j + 64)")
ax.set_ylabel("wavelength (tokens)")
ax.axhline(cfg.max_position_embeddings, color="gray", lw=1, ls="--")
ax.set_title("RoPE wavelengths with theta = 500000 (dashed: the 4096-token context)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Grouped-query attention
#
# 20 query heads share 5 key/value heads: query head h reads KV head h // 4. The KV cache (notebook
# 06) stores only the 5 KV heads, 4× less than full multi-head attention. `attention` implements the
# grouping with a reshape; written out naively with the KV heads repeated, it is:

# %%
def naive_gqa(q, k, v):
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # [S, H, HD]
    out = np.empty_like(q)
    for hh in range(q.shape[1]):
        scores = q[:, hh] @ k_rep[:, hh].T / np.sqrt(HD)                       # [S, S]
        scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)     # causal
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, hh] = (p / p.sum(axis=1, keepdims=True)) @ v_rep[:, hh]         # [S, HD]
    return out


print("q", q.shape, " k", k.shape, " v", v.shape, " -> attention", attention(q, k, v, 0).shape)
print("max |attention - naive GQA| =", float(np.abs(attention(q, k, v, 0) - naive_gqa(q, k, v)).max()))
kv_bytes = 2 * BITNET_2B4T.num_hidden_layers * KVH * HD * 4
print(f"KV cache of 2B4T (float32): {kv_bytes / 1024:.0f} KiB per token, "
      f"{kv_bytes * BITNET_2B4T.max_position_embeddings / 2**30:.2f} GiB for the 4096-token context "
      f"({H // KVH}x that without GQA)")

# %% [markdown]
# ## Checks against the library

# %%
for name, mine in [("q", q), ("k", k), ("v", v), ("attn", a), ("attn_sub_norm", a_norm),
                   ("resid_attn", h_attn), ("gate", gate), ("up", up), ("ffn_act", m),
                   ("ffn_sub_norm", m_norm), ("out", out)]:
    assert np.array_equal(mine, trace["layers.0." + name]), name      # the hand-written layer IS the model
assert np.array_equal(model.forward_layer(0, h), out)
assert trace["layers.0.q"].shape == (S, 20, 128) and trace["layers.0.k"].shape == (S, 5, 128)
assert trace["layers.0.ffn_act"].shape == (S, 6912) and logits.shape == (S, cfg.vocab_size)
assert np.allclose(token_rms(r), np.sqrt(mean_square / (mean_square + eps)), rtol=1e-5)
assert np.allclose(token_rms(rms_norm(1000 * h, ones, eps)), 1, rtol=1e-5)
assert list(np.flatnonzero(np.abs(rot[1, 0]) > 1e-7)) == [0, 64]                # half-split pairing
assert np.allclose([dots[10, 3], dots[20, 13], dots[60, 53]], dots[7, 0], rtol=1e-4)   # relative positions
assert np.abs(attention(q, k, v, 0) - naive_gqa(q, k, v)).max() < 1e-5
assert 0.4 < float((m == 0).mean()) < 0.6
print("all checks passed")
