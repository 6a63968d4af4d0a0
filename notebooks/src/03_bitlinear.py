# %% [markdown]
# # 03 · BitLinear: integer form, fake-quant form, and the weight_scale trap
#
# A BitLinear layer combines the two quantizers of notebooks 01 and 02. With ternary codes
# Wt [N, K], the weight scale gamma (the checkpoint's `weight_scale`) and per-token int8
# activations (xq, s), the product `x @ W.T` becomes
#
# ```
# y ≈ (xq / s) @ (Wt * gamma).T = (xq @ Wt.T) / s * gamma
# ```
#
# There are two ways to evaluate it, and refbitnet has both (`refbitnet.bitlinear`):
#
# - **integer form** `bitlinear_int`: `acc = xq @ Wt.T` in int32 (exact), then
#   `y = float32(acc) / s * weight_scale`. This is what an int8 × ternary kernel computes
#   (bitnet.cpp, the GPU decode kernel, refbitnet's Numba kernels).
# - **fake-quant form** `bitlinear_fake_quant`: `(xq / s)` as float32 times the codes as float32,
#   then `* weight_scale`. This is what training and transformers' `AutoBitLinear` compute.

# %%
import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T
from refbitnet.bitlinear import bitlinear_epilogue, bitlinear_fake_quant, bitlinear_int
from refbitnet.quant import absmax_int8, absmean_ternary, dequantize_int8, dequantize_ternary

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## One layer at 2B4T size: down_proj
#
# down_proj has the longest rows of the model: K = intermediate_size = 6912 inputs per output.

# %%
cfg = BITNET_2B4T
N, K, S = cfg.hidden_size, cfg.intermediate_size, 4                    # down_proj [D, F], 4 tokens
rng = np.random.default_rng(0)
W = (0.02 * rng.standard_normal((N, K))).astype(np.float32)            # latent weights [2560, 6912]
codes, gamma = absmean_ternary(W)                                      # int8 [N, K], float32
x = rng.standard_normal((S, K)).astype(np.float32)                     # activations [S, K]

out = bitlinear_int(x, codes, gamma)                                   # BitLinearOutput(y, acc, xq, s)
y_fake = bitlinear_fake_quant(x, codes, gamma)                         # float32 [S, N]
for name in out._fields:
    a = getattr(out, name)
    print(f"{name:>3}: {str(a.shape):>12} {a.dtype}")

# %% [markdown]
# ## Why the int32 sum is exact
#
# Every product xq·w has |xq·w| ≤ 128 (int8 times ±1), so a dot product of length K is an integer
# with |acc| ≤ 128·K. For K = 6912 that is 884,736: far inside int32, and also below 2**24 =
# 16,777,216, the largest range in which float32 holds every integer. So `acc` is the same integer
# whichever way and in whatever order it is summed — int32, int64, or even a float32 BLAS matmul of
# the integer-valued matrices (which is how the NumPy reference computes it quickly).

# %%
bound = 128 * K
print(f"|acc| <= 128*K = {bound:,}  < 2**24 = {2**24:,}: {bound < 2**24}")
print(f"largest |acc| here: {int(np.abs(out.acc).max()):,}")
acc_int64 = out.xq.astype(np.int64) @ codes.T.astype(np.int64)        # exact integer arithmetic
acc_f32 = out.xq.astype(np.float32) @ codes.T.astype(np.float32)      # BLAS, any order
acc_rev = out.xq[:, ::-1].astype(np.float32) @ codes[:, ::-1].T.astype(np.float32)   # reversed order
print("int64 == int32 acc:", np.array_equal(acc_int64, out.acc),
      "| float32 BLAS == acc:", np.array_equal(acc_f32, out.acc),
      "| reversed order == acc:", np.array_equal(acc_rev, out.acc))

# %% [markdown]
# The fake-quant form multiplies the *dequantized* activations xq/s, which are not integers, so its
# partial sums round, and the result depends on the summation order chosen by BLAS. The two forms
# are equal in exact arithmetic and differ by a few float32 ulps in practice:

# %%
diff = np.abs(out.y - y_fake)
ulp = np.spacing(np.abs(out.y).max())
print(f"max |y_int - y_fake| = {diff.max():.3e}  (max |y| = {np.abs(out.y).max():.3f}, one ulp there = {ulp:.1e})")
print(f"largest difference in ulps of max|y|: {diff.max() / ulp:.1f}")

# %% [markdown]
# That is why refbitnet defines bit-exact agreement on the integer form (codes, scales, int32
# accumulators and the elementwise epilogue) and compares whole models with transformers to a stated
# tolerance. A difference of an ulp can still flip one int8 code at the next quantizer when a value
# sits on a rounding boundary — tests/test_model_vs_transformers.py counts those flips.
#
# ## The epilogue, in this order
#
# `bitlinear_epilogue(acc, s, weight_scale)` is `(float32(acc) / s) * weight_scale`. Floating-point
# multiplication is not associative, so `acc * (weight_scale / s)` would be a different float32 for
# some elements; the order is part of the definition that kernels must reproduce bit for bit.

# %%
y_other_order = out.acc.astype(np.float32) * (np.float32(gamma) / out.s[:, None])
print("epilogue == y:", np.array_equal(bitlinear_epilogue(out.acc, out.s, gamma), out.y))
print(f"another evaluation order differs in {float((y_other_order != out.y).mean()):.1%} of the outputs "
      f"(by at most {np.abs(y_other_order - out.y).max():.1e})")

# %% [markdown]
# ## The multiply-vs-divide trap
#
# The released 2B4T checkpoint stores `weight_scale = gamma = mean|W|` and the layer **multiplies**
# by it: W ≈ Wt · weight_scale. transformers' older `BitLinear` class, written for checkpoints that
# stored the inverse scale 1/gamma, **divides** by its stored scale. A converter or kernel that
# divides by the 2B4T weight_scale produces outputs that are 1/gamma² too large:

# %%
y_float = x @ W.T                                                      # the unquantized layer, [S, N]
y_right = out.y                                                        # ... / s * weight_scale
y_wrong = (out.acc.astype(np.float32) / out.s[:, None]) / gamma        # ... / s / weight_scale


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


print(f"gamma = {gamma:.5f}, 1/gamma**2 = {1 / gamma**2:,.0f}")
print(f"relative distance to the float layer: multiply {rel(y_right, y_float):.3f}, divide {rel(y_wrong, y_float):,.0f}")
ratio = float(np.linalg.norm(y_wrong) / np.linalg.norm(y_right))
print(f"ratio of the two outputs: {ratio:,.1f}")

fig, ax = plt.subplots(figsize=(11, 3.2))
ax.plot(y_float[0, :200], label="float layer x @ W.T", lw=1)
ax.plot(y_right[0, :200], label="BitLinear, y = acc / s * weight_scale", lw=1)
ax.set_title(f"first 200 outputs of token 0 (the divided version is {1 / gamma**2:,.0f}x larger, off the chart)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# With the right convention the ternary layer tracks the float layer it came from (to the ~50 %
# relative error of quantizing a *normal* matrix, notebook 01; a trained BitNet has learned weights
# for which this is the layer). With the wrong one, every activation is off by a factor of thousands
# and the next RMSNorm hides part of the damage — which is why such bugs produce fluent-looking
# garbage instead of crashing. `refbitnet.testing` locates this bug by layer and tensor.
#
# ## Checks against the library

# %%
# integer form: exact int32 accumulators, the epilogue in SPEC order
xq, s = absmax_int8(x)
assert np.array_equal(out.xq, xq) and np.array_equal(out.s, s)
assert np.array_equal(out.acc, acc_int64.astype(np.int32)) and np.abs(out.acc).max() <= bound < 2**24
assert np.array_equal(out.y, (out.acc.astype(np.float32) / s[:, None]) * gamma)
# fake-quant form: (xq/s) @ Wt.T * gamma, equal to the integer form up to float32 rounding of K-term sums
assert np.array_equal(y_fake, (dequantize_int8(xq, s) @ codes.T.astype(np.float32)) * gamma)
assert diff.max() <= 64 * ulp
# the multiply convention reproduces the dequantized float product; dividing is off by 1/gamma**2
y_dequant = dequantize_int8(xq, s) @ dequantize_ternary(codes, gamma).T
assert rel(y_right, y_dequant) < 1e-5
assert abs(ratio * gamma**2 - 1) < 1e-3
print("all checks passed")
