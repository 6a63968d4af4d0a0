# %% [markdown]
# # 01 · absmean: from real-valued weights to {-1, 0, +1}
#
# BitNet b1.58 stores every projection matrix of the transformer (q, k, v, o, gate, up, down) as
# ternary codes, one of -1, 0 or +1 per weight, plus **one** float scale per matrix. This notebook
# quantizes a weight matrix the way the model was trained to be quantized, with
# `refbitnet.quant.absmean_ternary`, and looks at what happens to it.
#
# The rule (docs/SPEC.md §3):
#
# ```
# gamma = max(mean(|W|), 1e-5)                 # one scale for the whole matrix
# Wt    = clip(round(W / gamma), -1, 1)        # int8 codes in {-1, 0, +1}, round half to even
# W    ~= Wt * gamma                           # gamma is the checkpoint's weight_scale
# ```

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T
from refbitnet.quant import absmean_ternary, dequantize_ternary, ternary_codes

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## A weight matrix at 2B4T scale
#
# The q_proj of every 2B4T layer is a [2560, 2560] matrix (out_features × in_features). We draw
# one from a normal distribution with a standard deviation typical of a trained projection. (A
# trained matrix has somewhat heavier tails than a normal one; everything below works the same.)

# %%
cfg = BITNET_2B4T
n_out, n_in = cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size     # q_proj: [H*HD, D]
rng = np.random.default_rng(0)
sigma = 0.02
W = (sigma * rng.standard_normal((n_out, n_in))).astype(np.float32)      # [2560, 2560]
print("W:", W.shape, W.dtype, f"{W.nbytes / 2**20:.0f} MiB as float32")

codes, gamma = absmean_ternary(W)                                       # int8 [2560, 2560], float32
print("codes:", codes.shape, codes.dtype, "values", np.unique(codes))
print(f"gamma = mean|W| = {gamma:.6f}   (for a normal matrix sigma*sqrt(2/pi) = {sigma * math.sqrt(2 / math.pi):.6f})")

# %% [markdown]
# ## The threshold is 0.5·mean|W|
#
# `round(W / gamma)` is 0 exactly when |W / gamma| ≤ 0.5 (a tie at 0.5 rounds to the even
# integer, 0). So a weight becomes 0 when **|W| < 0.5·gamma**, and ±1 otherwise; clip only matters
# for weights beyond 1.5·gamma, which would otherwise round to ±2.
#
# For a normal matrix, gamma = σ·√(2/π) and the fraction of zeros is
# P(|z| < 0.5·√(2/π)) = erf(0.5·√(2/π) / √2) ≈ 31 %.

# %%
fraction = {c: float((codes == c).mean()) for c in (-1, 0, 1)}
predicted_zero = math.erf(0.5 * math.sqrt(2 / math.pi) / math.sqrt(2))
print("fraction of codes:", {c: f"{f:.4f}" for c, f in fraction.items()})
print(f"zeros predicted for a normal matrix: {predicted_zero:.4f}")

# the boundary, element by element: 0.5*gamma and the values next to it
probe = np.array([0.49, 0.5, 0.51, 1.49, 1.5, 1.51, 3.0], dtype=np.float32) * gamma
print("W / gamma :", probe / gamma)
print("codes     :", ternary_codes(probe, gamma))

# %% [markdown]
# ## Histograms before and after
#
# Left: the real-valued weights with the two thresholds ±0.5·gamma. Everything between them becomes
# 0. Right: what is left, three spikes at -gamma, 0 and +gamma.

# %%
W_hat = dequantize_ternary(codes, gamma)                                 # float32 [2560, 2560]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2))
a.hist(W.ravel()[::16], bins=200, color="tab:blue")
for t in (-0.5 * gamma, 0.5 * gamma):
    a.axvline(t, color="tab:red", lw=1)
a.set_title("W (latent weights); red: ±0.5·gamma")
a.set_xlabel("weight value")
values, counts = np.unique(W_hat, return_counts=True)
b.bar(values, counts / W.size, width=0.25 * gamma, color="tab:orange")
b.set_xticks(values, ["-gamma", "0", "+gamma"])
b.set_title("Wt · gamma (what the model computes with)")
b.set_ylabel("fraction of weights")
plt.tight_layout()
plt.show()

rel_err = float(np.linalg.norm(W_hat - W) / np.linalg.norm(W))
print(f"relative error ||Wt*gamma - W|| / ||W|| = {rel_err:.3f}")

# %% [markdown]
# That error is large: absmean is not meant to approximate an arbitrary trained float model
# (post-training ternarization of a normal LLM destroys it). BitNet is trained *with* this quantizer
# in the forward pass (notebook 08), so the network learns weights that work after quantization.
#
# ## Why "1.58 bits"
#
# A weight with three possible values carries at most log2(3) bits of information.

# %%
p = np.array([fraction[-1], fraction[0], fraction[1]])
print(f"log2(3) = {math.log2(3):.4f} bits per weight (the '1.58')")
print(f"entropy of this matrix's codes = {float(-(p * np.log2(p)).sum()):.4f} bits per weight")
print("what the file formats actually spend:")
print("  2 bits   (4 codes per byte: the HF release layout, I2_S, TQ2_0 + scales)")
print(f"  {8 / 5:.2f} bits (5 codes per byte, 3**5 = 243 <= 256: llama.cpp TQ1_0)")

# %% [markdown]
# Four codes per byte is simple and fast to decode; five per byte comes close to the bound
# (1.6 vs 1.585). Notebook 04 shows these layouts byte by byte.
#
# ## The codes of a trained model
#
# The model that ships with refbitnet (`refbitnet.load()`, a 4-layer BitNet b1.58 trained on
# Shakespeare, notebook 06) stores only the codes and the scales; its latent weights are gone.
# Every projection uses the three values about evenly, so each weight carries close to the full
# log2(3) bits. (This small model was trained for 500 steps from a normal initialization, and its
# shares stay near those of a normal matrix, 31 % zeros; inspect a downloaded 2B4T the same way with
# `refbitnet.load(path)`.)

# %%
import refbitnet

shipped = refbitnet.load()
names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
shares = np.array([[np.mean(getattr(layer, n).codes() == c) for c in (-1, 0, 1)]
                   for layer in shipped.weights.layers for n in names])            # [L*7, 3]
entropy = -(shares * np.log2(shares)).sum(axis=1)                          # bits per weight, per matrix
fig, ax = plt.subplots(figsize=(11, 3))
labels = [f"{i}.{n[:-5]}" for i in range(len(shipped.weights.layers)) for n in names]
ax.bar(range(len(labels)), shares[:, 0], label="-1")
ax.bar(range(len(labels)), shares[:, 1], bottom=shares[:, 0], label="0")
ax.bar(range(len(labels)), shares[:, 2], bottom=shares[:, :2].sum(1), label="+1")
ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
ax.set_ylabel("share of codes")
ax.set_title("codes of every projection of the shipped model (layer.projection)")
ax.legend(loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()
print(f"zeros: {shares[:, 1].min():.3f} .. {shares[:, 1].max():.3f} of each matrix; "
      f"entropy {entropy.min():.4f} .. {entropy.max():.4f} bits per weight (bound {math.log2(3):.4f})")
#
# ## The common misreading: a threshold at mean|W|
#
# Several write-ups describe the quantizer as "0 if |W| < mean|W|, else sign(W)". That is a
# different rule: it is `round(W / (2·gamma))`, i.e. the threshold at gamma instead of 0.5·gamma.

# %%
misread = np.where(np.abs(W) < gamma, 0, np.sign(W)).astype(np.int8)   # the misread rule
# ... which is absmean's rounding with twice the scale (up to float ties at |W| = gamma)
same_as_2gamma = float((misread == ternary_codes(W, 2 * gamma)).mean())
print(f"misread rule == ternary_codes(W, 2*gamma) for {same_as_2gamma:.6%} of the weights")
differ = float((misread != codes).mean())
print(f"zeros: absmean rule {float((codes == 0).mean()):.3f}, misread rule {float((misread == 0).mean()):.3f}")
print(f"codes that differ between the two rules: {differ:.1%}")


def best_scale_error(c):
    """relative error of c * a with the least-squares scale a (the most favourable scale for any codes)."""
    cf = c.astype(np.float32)
    a = float((cf * W).sum() / (cf * cf).sum())
    return float(np.linalg.norm(a * cf - W) / np.linalg.norm(W))


print(f"reconstruction error with the best possible scale: absmean {best_scale_error(codes):.3f}, "
      f"misread {best_scale_error(misread):.3f}")

# %% [markdown]
# About a quarter of the weights get a different code. As an approximation of a *normal* matrix,
# each rule with its own best scale is about as good as the other (the two errors above are close),
# so the misreading is not "worse quantization" in the abstract. It is a different function: a
# model trained with the 0.5·gamma rule and run with the gamma rule sees a quarter of its weights
# changed, which destroys it. Checking the threshold is one of the first things to test in an
# implementation.
#
# ## Checks against the library

# %%
# absmean_ternary is exactly the SPEC formula, evaluated in float32
ref_gamma = np.float32(max(np.mean(np.abs(W), dtype=np.float32), np.float32(1e-5)))
assert gamma == ref_gamma
assert np.array_equal(codes, np.clip(np.round(W / gamma), -1, 1).astype(np.int8))
# the threshold: 0 below 0.5*gamma (and at the tie), +-1 from just above it
assert list(ternary_codes(probe, gamma)) == [0, 0, 1, 1, 1, 1, 1]
assert np.array_equal(codes == 0, np.abs(W / gamma) <= 0.5)
# the zero fraction matches the normal-distribution prediction (2.6M samples: within 0.3 %)
assert abs(fraction[0] - predicted_zero) < 3e-3
# dequantize is codes * gamma; the misread rule really is different
assert np.array_equal(W_hat, codes.astype(np.float32) * gamma)
assert 0.2 < differ < 0.35 and same_as_2gamma > 0.9999
# the trained model's codes are ternary and use every value
assert np.allclose(shares.sum(axis=1), 1) and (shares > 0.2).all() and (entropy <= math.log2(3)).all()
print("all checks passed")
