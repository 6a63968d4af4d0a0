# %% [markdown]
# # 02 · absmax: activations to int8, one scale per token
#
# The weights of a BitLinear are ternary (notebook 01). Its input activations are quantized too,
# to int8, every time the layer runs (they depend on the input, so they cannot be quantized ahead
# of time). BitNet b1.58 uses **absmax per token**: each row of the activation matrix (one token's
# hidden vector) gets its own scale (docs/SPEC.md §3):
#
# ```
# s  = 127 / max(max(|x|), 1e-5)               # one float32 per token
# xq = clip(round(x * s), -128, 127)           # int8
# x ~= xq / s
# ```
#
# `refbitnet.quant.absmax_int8` implements it; this notebook shows why "per token" matters.

# %%
import matplotlib.pyplot as plt
import numpy as np

from refbitnet.quant import absmax_int8, dequantize_int8

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## Activations look nothing like weights
#
# Hidden states of a transformer vary a lot in size from token to token (the first token of a
# sequence is often far larger than the rest), and a few channels carry outliers much larger than
# the others. We build a [S, D] block with both features: 64 tokens of width 2560 (the 2B4T hidden
# size), per-token magnitudes spread over two orders of magnitude, and 4 outlier channels.

# %%
S, D = 64, 2560
rng = np.random.default_rng(0)
token_scale = np.exp(rng.uniform(np.log(0.05), np.log(5.0), size=S)).astype(np.float32)   # [S]
token_scale[0] = 20.0                                                   # a "first token" giant
x = rng.standard_normal((S, D)).astype(np.float32) * token_scale[:, None]                  # [S, D]
outliers = rng.choice(D, size=4, replace=False)
x[:, outliers] *= 8.0                                                   # outlier channels
print("x:", x.shape, x.dtype, f"max|x| per token ranges from {np.abs(x).max(1).min():.2f} to {np.abs(x).max(1).max():.1f}")

xq, s = absmax_int8(x)                                                  # int8 [S, D], float32 [S]
print("xq:", xq.shape, xq.dtype, "  s:", s.shape, s.dtype)
print("token 0: max|x| =", float(np.abs(x[0]).max()), " s =", float(s[0]), " step 1/s =", float(1 / s[0]))
print("token 1: max|x| =", float(np.abs(x[1]).max()), " s =", float(s[1]), " step 1/s =", float(1 / s[1]))

# %% [markdown]
# Each token's largest element maps to ±127 and the grid step of that token is 1/s = max|x|/127.
# The code -128 is never produced from a symmetric range (|round(x·s)| ≤ 127); the clip only guards
# the int8 type. Rounding to the nearest grid point makes the error of every element at most half
# a step.

# %%
x_hat = dequantize_int8(xq, s)                                          # float32 [S, D]
err = np.abs(x_hat - x)                                                 # [S, D]
half_step = 0.5 / s                                                     # [S]
print("xq range:", int(xq.min()), "..", int(xq.max()))
print(f"max over tokens of (max error / half step) = {float((err.max(1) / half_step).max()):.6f}")

# %% [markdown]
# ## Per token vs one scale for the whole tensor
#
# With a single scale for the block, s_tensor = 127 / max|x| over all tokens, the giant first
# token sets the step for everyone. A small token then uses only a handful of the 255 int8 levels.

# %%
s_tensor = np.float32(127.0) / np.abs(x).max()
xq_tensor = np.clip(np.round(x * s_tensor), -128, 127).astype(np.int8)
x_hat_tensor = xq_tensor.astype(np.float32) / s_tensor


def rel_error(a):                                                        # per token
    return np.linalg.norm(a - x, axis=1) / np.linalg.norm(x, axis=1)


e_token, e_tensor = rel_error(x_hat), rel_error(x_hat_tensor)
levels_token = np.array([len(np.unique(r)) for r in xq])
levels_tensor = np.array([len(np.unique(r)) for r in xq_tensor])
print(f"median relative error per token: per-token scale {np.median(e_token):.4f}, per-tensor scale {np.median(e_tensor):.4f}")
print(f"median number of distinct int8 values used per token: {np.median(levels_token):.0f} vs {np.median(levels_tensor):.0f}")

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
order = np.argsort(token_scale)
a.semilogy(token_scale[order], e_tensor[order], "o-", ms=3, label="one scale per tensor")
a.semilogy(token_scale[order], e_token[order], "o-", ms=3, label="one scale per token (BitNet)")
a.set_xscale("log")
a.set_xlabel("token magnitude")
a.set_ylabel("relative error ||x - xq/s|| / ||x||")
a.legend()
small = int(order[0])
b.hist(xq[small], bins=np.arange(-128, 129), alpha=0.7, label="per token")
b.hist(xq_tensor[small], bins=np.arange(-128, 129), alpha=0.7, label="per tensor")
b.set_yscale("log")
b.set_title(f"int8 codes of the smallest token (#{small}), log scale")
b.set_xlabel("xq")
b.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Per token, the error is flat (about 2 % whatever the token's size, set by the outlier channels:
# the step is max|x|/127 and most elements are much smaller than the max). Per tensor, small tokens
# are quantized to a few levels or to zero: errors of 50-100 %. (The giant first token is the one
# place where the two agree: it sets the per-tensor scale.)
#
# ## The outlier channels still cost something
#
# Within one token, the largest element sets the step. Dividing the outlier channels back down
# (as if the model had none) shows their price: the typical element is quantized more finely.

# %%
x_no_outliers = x.copy()
x_no_outliers[:, outliers] /= 8.0
xq2, s2 = absmax_int8(x_no_outliers)
e_no_outliers = np.linalg.norm(dequantize_int8(xq2, s2) - x_no_outliers, axis=1) / np.linalg.norm(x_no_outliers, axis=1)
print(f"median relative error per token: with outlier channels {np.median(e_token):.4f}, without {np.median(e_no_outliers):.4f}")

# %% [markdown]
# This is one reason BitNet puts an RMSNorm right before every BitLinear, including the SubLN norms
# before o_proj and down_proj (notebook 05): normalized inputs keep the ranges the quantizer sees
# under control.
#
# ## How s is computed, to the bit
#
# `127 / m` can be evaluated two ways in float32: one correctly rounded division, or torch's
# `127 * (1 / m)` (two roundings), which is what the reference code does. They differ by one ulp for
# some m, and refbitnet follows torch so that its int8 codes match transformers bit for bit.

# %%
m = np.float32(1835.0)
one_division = np.float32(127.0) / m
torch_way = np.float32(127.0) * (np.float32(1.0) / m)
_, s_lib = absmax_int8(np.array([[m, 1.0]], dtype=np.float32))
print(f"127/m = {one_division!r}   127*(1/m) = {torch_way!r}   absmax_int8 gives {s_lib[0]!r}")

# %% [markdown]
# ## Checks against the library

# %%
# absmax_int8 is the SPEC formula with torch's evaluation of 127 / max|x|
m_rows = np.maximum(np.abs(x).max(axis=1), np.float32(1e-5))
s_ref = (np.float32(127.0) * (np.float32(1.0) / m_rows)).astype(np.float32)
assert np.array_equal(s, s_ref)
assert np.array_equal(xq, np.clip(np.round(x * s_ref[:, None]), -128, 127).astype(np.int8))
# every token uses the full range: its largest element maps to +-127
assert np.array_equal(np.abs(xq.astype(np.int32)).max(axis=1), np.full(S, 127))
# rounding error at most half a step (plus float32 rounding of x*s and of the division)
assert (err.max(axis=1) <= half_step * (1 + 1e-5)).all()
# per-token scaling beats one scale per tensor on every token but the giant that sets that scale
assert (e_token[1:] < e_tensor[1:]).all() and np.median(e_token) < 0.03 < 0.3 < np.median(e_tensor)
assert s_lib[0] == torch_way
print("all checks passed")
