# %% [markdown]
# # 09 · Memory and energy: reproducing Table 1 of the 2B4T report from the config
#
# Table 1 of the BitNet b1.58 2B4T technical report (Ma et al., 2025, arXiv:2504.12285) compares
# the model with full-precision models of similar size:
#
# | | LLaMA 3.2 1B | Gemma-3 1B | Qwen2.5 1.5B | SmolLM2 1.7B | BitNet b1.58 2B |
# |---|---|---|---|---|---|
# | memory (non-embedding) | 2 GB | 1.4 GB | 2.6 GB | 3.2 GB | **0.4 GB** |
# | energy (estimated) | 0.258 J | 0.186 J | 0.347 J | 0.425 J | **0.028 J** |
#
# Like nanoGPT's `transformer_sizing.ipynb` does for GPT-2, this notebook counts parameters, bytes
# and operations from the configuration alone, and recovers both rows.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T
from refbitnet.train.model import parameter_shapes

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## Parameters
#
# `refbitnet.train.model.parameter_shapes(config)` lists every tensor of the model under its
# checkpoint name, so the count comes from the same code that trains and exports models.

# %%
cfg = BITNET_2B4T
shapes = parameter_shapes(cfg)
count = {name: int(np.prod(shape)) for name, shape in shapes.items()}
total = sum(count.values())
embedding = count["model.embed_tokens.weight"]
ternary = sum(n for name, n in count.items() if name.endswith("_proj.weight"))
norms = total - embedding - ternary
per_layer = {name.split("layers.0.")[1]: n for name, n in count.items() if ".layers.0." in name}

for name, n in per_layer.items():
    print(f"  layer 0 {name:<36} {str(shapes['model.layers.0.' + name]):>14} {n:>12,}")
print(f"one layer: {sum(per_layer.values()):,}  (of which ternary {sum(n for k, n in per_layer.items() if k.endswith('_proj.weight')):,})")
print(f"embedding (tied, also the LM head): {embedding:,}")
print(f"ternary projections ({cfg.num_hidden_layers} layers): {ternary:,}")
print(f"norm weights: {norms:,}")
print(f"total: {total:,}")

# %% [markdown]
# ## Memory: 0.4 GB of non-embedding weights
#
# The report counts the non-embedding weights at log2(3) = 1.58 bits each. The release file spends
# 2 bits per weight (4 codes per byte), plus one bf16 scale per matrix and bf16 norm weights; the
# embedding (which is also the LM head) stays in bf16.

# %%
non_embedding = ternary + norms
GB = 1e9
memory_158 = ternary * math.log2(3) / 8 + norms * 2
memory_release = ternary / 4 + cfg.num_hidden_layers * 7 * 2 + norms * 2
print(f"non-embedding weights at 1.58 bits: {memory_158 / GB:.3f} GB   <- the report's 0.4 GB")
print(f"non-embedding weights as released (2 bits): {memory_release / GB:.3f} GB")
print(f"embedding in bf16: {embedding * 2 / GB:.3f} GB;  whole release file ~ {(memory_release + embedding * 2) / GB:.2f} GB")
print(f"the same non-embedding weights in bf16: {non_embedding * 2 / GB:.2f} GB")

# %% [markdown]
# The full-precision models in Table 1 store their non-embedding weights in 16 bits: 2 bytes per
# parameter reproduces their memory row as well (below).
#
# ## Energy: operations × energy per operation
#
# BitNet's energy figures are not measurements: they count arithmetic operations and weigh each by
# an energy per operation for a 7 nm chip. The table used across the BitNet papers (BitNet, Wang et
# al. 2023, arXiv:2310.11453, Table 2, from Horowitz, ISSCC 2014, and Zhang et al. 2022) gives, in
# picojoules:
#
# | 7 nm | ADD | MUL |
# |---|---|---|
# | FP16 | 0.16 | 0.34 |
# | INT8 | 0.007 | 0.07 |
#
# A multiply-accumulate with a bf16/fp16 weight costs an FP16 MUL + ADD = 0.5 pJ. A ternary weight
# needs no multiply: the int8 activation is added, subtracted or skipped, one INT8 ADD = 0.007 pJ.
# The ratio 0.5 / 0.007 = 71.4 is the "71.4× less arithmetic energy for matrix multiplication" of
# the b1.58 paper (Ma et al., 2024, arXiv:2402.17764).
#
# The report does not spell out its accounting. The following one reproduces all five rows of
# Table 1 from the models' configurations, to within 1.5 %:
#
# - a sequence of T = 512 tokens (our assumption: the report does not state a length; 512 is the one
#   at which all five entries match);
# - per token, one multiply-accumulate per non-embedding weight (ternary: one INT8 ADD), plus the
#   attention products q·k and p·v over all T positions, 2·T·(heads·head_dim) multiply-accumulates
#   per layer, in FP16 for every model (BitNet quantizes only its linear layers);
# - the embedding lookup and the LM head are not counted.

# %%
PJ = 1e-12
E_FP16_MAC = (0.16 + 0.34) * PJ        # FP16 ADD + MUL
E_INT8_ADD = 0.007 * PJ
T = 512


def attention_macs(layers, q_width, tokens=T):
    """q.k and p.v multiply-accumulates per token attending to `tokens` positions."""
    return 2 * tokens * q_width * layers


def energy(weight_macs, weight_energy, attn_macs, tokens=T):
    return tokens * (weight_macs * weight_energy + attn_macs * E_FP16_MAC)


q_width = cfg.num_attention_heads * cfg.head_dim
bitnet_attn = attention_macs(cfg.num_hidden_layers, q_width)
e_bitnet = energy(ternary, E_INT8_ADD, bitnet_attn)
print(f"BitNet b1.58 2B: {ternary / 1e9:.3f} G ternary weights -> {T * ternary * E_INT8_ADD:.4f} J, "
      f"attention {bitnet_attn / 1e6:.1f} M MAC/token -> {T * bitnet_attn * E_FP16_MAC:.4f} J")
print(f"  estimated energy {e_bitnet:.4f} J   (report: 0.028 J)")
print(f"  the same model with bf16 weights: {energy(ternary, E_FP16_MAC, bitnet_attn):.3f} J")

# %% [markdown]
# Note where BitNet's energy goes under this model: about three quarters is the full-precision
# attention, because the ternary weights became almost free.
#
# ## The same method on the full-precision models of Table 1
#
# Sizes from each model's published `config.json` (all use tied embeddings; Qwen2.5 has biases on
# q, k, v; Gemma-3 has q/k norms and head_dim 256).

# %%
def dense_params(hidden, layers, intermediate, heads, kv_heads, head_dim, qkv_bias=False, qk_norm=False):
    """Non-embedding parameters of a Llama-style decoder (SwiGLU MLP, RMSNorm) and its q width."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden + ((q + 2 * kv) if qkv_bias else 0)
    mlp = 3 * hidden * intermediate
    norm = 2 * hidden + (2 * head_dim if qk_norm else 0)
    extra = 2 * hidden if qk_norm else 0          # Gemma-3: pre/post feed-forward norms too
    return layers * (attn + mlp + norm + extra) + hidden, q


fp_models = {   # name: (config sizes, Table 1 memory GB, Table 1 energy J)
    "LLaMA 3.2 1B": (dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, head_dim=64), 2.0, 0.258),
    "Gemma-3 1B": (dict(hidden=1152, layers=26, intermediate=6912, heads=4, kv_heads=1, head_dim=256, qk_norm=True), 1.4, 0.186),
    "Qwen2.5 1.5B": (dict(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, head_dim=128, qkv_bias=True), 2.6, 0.347),
    "SmolLM2 1.7B": (dict(hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, head_dim=64), 3.2, 0.425),
}
rows = []
for name, (c, mem_report, e_report) in fp_models.items():
    params, qw = dense_params(**c)
    e = energy(params, E_FP16_MAC, attention_macs(c["layers"], qw))
    rows.append((name, params * 2 / GB, mem_report, e, e_report))
rows.append(("BitNet b1.58 2B", memory_158 / GB, 0.4, e_bitnet, 0.028))
print(f"{'model':<16} {'memory (GB)':>12} {'report':>7} {'energy (J)':>11} {'report':>7}")
for name, mem, mem_r, e, e_r in rows:
    print(f"{name:<16} {mem:>12.2f} {mem_r:>7.1f} {e:>11.4f} {e_r:>7.3f}")

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
names = [r[0] for r in rows]
x = np.arange(len(rows))
a.bar(x - 0.2, [r[1] for r in rows], 0.4, label="computed from config")
a.bar(x + 0.2, [r[2] for r in rows], 0.4, label="report, Table 1")
a.set_ylabel("non-embedding memory (GB)")
b.bar(x - 0.2, [r[3] for r in rows], 0.4, label="computed from config")
b.bar(x + 0.2, [r[4] for r in rows], 0.4, label="report, Table 1")
b.set_ylabel("estimated energy (J)")
for ax in (a, b):
    ax.set_xticks(x, [n.replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Every entry comes out within a few percent of the report, the full-precision memory row rounded
# as the report rounds it. Two caveats belong next to these numbers:
#
# - The energy is arithmetic only. On a CPU the time and energy of decoding are dominated by
#   **moving the weights** from DRAM (notebook 07): per token, about 0.52 GB of ternary codes and
#   0.66 GB of bf16 embedding (the LM head) are read, and that traffic is not in this estimate.
# - The per-operation energies are for a hypothetical 7 nm accelerator. Today's CPUs and GPUs have
#   no INT8 adder array fed by 2-bit weights; the 71× is what such hardware could save.
#
# ## Checks against the library

# %%
# parameter counts of docs/SPEC.md §1
assert total == 2_412_820_480 and embedding == 328_335_360
assert sum(n for k, n in per_layer.items() if k.endswith("_proj.weight")) == 69_468_160
assert ternary == cfg.num_hidden_layers * 69_468_160
# memory: 0.4 GB at 1.58 bits (0.41), 0.52 GB of 2-bit codes in the release
assert round(memory_158 / GB, 1) == 0.4 and abs(ternary / 4 / GB - 0.521) < 1e-3
# energy: every Table 1 entry reproduced to within 2 %
for name, mem, mem_r, e, e_r in rows:
    assert abs(e / e_r - 1) < 0.02, (name, e, e_r)
    assert abs(mem - mem_r) <= 0.06 if name != "BitNet b1.58 2B" else round(mem, 1) == mem_r, (name, mem, mem_r)
assert abs(E_FP16_MAC / E_INT8_ADD - 71.4) < 0.1
print("all checks passed")
