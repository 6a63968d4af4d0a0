# %% [markdown]
# # 04 · Packing formats: the release layout, I2_S, TQ2_0 (and friends) byte by byte
#
# A ternary weight needs log2(3) ≈ 1.58 bits (notebook 01). Every format in use stores the code
# c = w + 1 ∈ {0, 1, 2} in 2 bits (or five codes in a base-3 byte), but they disagree about
# **which element goes into which byte**, and about where the scale lives. Reading a file with the
# wrong layout gives no error — just a model that produces garbage — so this notebook finds each
# layout's map empirically, with refbitnet's own encoders (`refbitnet.testing.encode`, which calls
# `refbitnet.layouts`), and puts them side by side.
#
# | layout | used by | bytes for [N, K] | scale |
# |---|---|---|---|
# | `hf` | the released `model.safetensors` | [N/4, K] | `weight_scale` tensor, one per matrix |
# | `kernel` | refbitnet's Numba kernels | [N, K/4] | kept by the caller |
# | `i2_s` | bitnet.cpp GGUF (type 36) | N·K/4 + 32 | one float32 after the codes |
# | `tq2_0` | llama.cpp GGUF (type 35) | 66 per 256 elements | fp16 per 256-element block |
# | `tq1_0` | llama.cpp GGUF (type 34) | 54 per 256 elements | fp16 per 256-element block |

# %%
import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T
from refbitnet.layouts import pack_hf, pack_i2s, unpack_hf, unpack_i2s, unpack_tq2_0
from refbitnet.testing import decode, encode

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## The same 16 × 256 matrix in every layout

# %%
N, K = 16, 256
rng = np.random.default_rng(0)
codes = rng.integers(-1, 2, size=(N, K)).astype(np.int8)               # ternary codes [N, K]
gamma = np.float32(0.0173)                                              # a weight_scale
LAYOUTS = ("hf", "kernel", "i2_s", "tq2_0", "tq1_0")
packed = {name: encode(codes, name, scale=gamma) for name in LAYOUTS}
for name, data in packed.items():
    print(f"{name:>6}: {str(data.shape):>10} {data.dtype}  {data.nbytes:4d} bytes   "
          f"first bytes: {' '.join(f'{b:02x}' for b in data.reshape(-1)[:8])}")
print("codes of row 0, columns 0..7:", codes[0, :8], "  c = w + 1:", codes[0, :8] + 1)

# %% [markdown]
# Same 4096 codes, five different byte strings. To see why, we ask each encoder where one element
# lives: start from a matrix of all +1 codes (so every block is nonzero and the block scales do
# not change), set one element to 0, and see which byte, and which bits of it, change.

# %%
def element_map(layout):
    """For each element (row-major index e = n*K + k): (byte index, lowest changed bit) in `layout`."""
    base = np.ones((N, K), dtype=np.int8)
    ref = encode(base, layout, scale=gamma).reshape(-1)
    where = np.zeros((N * K, 2), dtype=np.int64)
    for e in range(N * K):
        probe = base.copy()
        probe.flat[e] = 0
        changed = np.flatnonzero(encode(probe, layout, scale=gamma).reshape(-1) != ref)
        assert len(changed) == 1, (layout, e, changed)       # exactly one byte per element
        byte = int(changed[0])
        xor = int(ref[byte] ^ encode(probe, layout, scale=gamma).reshape(-1)[byte])
        where[e] = byte, (xor & -xor).bit_length() - 1      # lowest changed bit
    return where


maps = {name: element_map(name) for name in LAYOUTS}


def show(n, k):
    cells = []
    for name in LAYOUTS:
        byte, bit = maps[name][n * K + k]
        cells.append(f"{name} byte {byte:4d}" + (f" bits {bit}-{bit + 1}" if name != "tq1_0" else " (base 3)   "))
    print(f"W[{n:2d}, {k:3d}] -> " + " | ".join(cells))


for n, k in [(0, 0), (0, 1), (0, 4), (0, 31), (0, 32), (0, 128), (1, 0), (4, 0), (15, 255)]:
    show(n, k)

# %% [markdown]
# Reading the table:
#
# - **hf** (the release): the N output rows are cut into 4 blocks of R = N/4 rows, and byte
#   [r, k] holds rows r, r + R, r + 2R, r + 3R of column k at bits 0, 2, 4, 6. So W[0, 0] and
#   W[4, 0] (R = 4 here) share byte 0. Packing runs along the *output* axis.
# - **kernel** (refbitnet's Numba kernels): row-major, four consecutive k per byte, lowest bits
#   first. A kernel streams each output row with unit stride.
# - **i2_s** (bitnet.cpp): row-major in blocks of 128 elements = 32 bytes; element j of a block goes
#   to byte j % 32 at shift 6 - 2·(j // 32). The *first* 32 elements take the *high* bits, and
#   W[0, 0], W[0, 32], W[0, 64], W[0, 96] share a byte.
# - **tq2_0** (llama.cpp): row-major in blocks of 256 elements = 64 code bytes + 2 scale bytes;
#   element 128h + 32l + m goes to byte 32h + m at bits 2l, lowest first, so W[0, 0] and W[0, 32]
#   share byte 0 but at the *opposite* ends from I2_S. Every block adds 2 bytes of fp16 scale.
# - **tq1_0** (llama.cpp): five codes per byte in base 3 (1.6875 bits per weight with the scales).
#
# The whole map as a picture: for each element, the byte that holds it (y) and the bit pair inside
# that byte (color). Left: the release layout over the whole matrix; right: row 0 in the row-major
# layouts.

# %%
fig, axes = plt.subplots(1, 5, figsize=(15, 3.3))
for ax, name in zip(axes, LAYOUTS):
    count = N * K if name == "hf" else K
    e = np.arange(count)
    bits = maps[name][:count, 1] if name != "tq1_0" else np.zeros(count)
    points = ax.scatter(e, maps[name][:count, 0], s=2, c=bits, cmap="viridis", vmin=0, vmax=6)
    ax.set_title(name + (" (all 16 rows)" if name == "hf" else " (row 0)"))
    ax.set_xlabel("element n*K + k")
axes[0].set_ylabel("byte index")
fig.colorbar(points, ax=axes, label="lowest bit of the pair", ticks=[0, 2, 4, 6])
plt.show()

# %% [markdown]
# In `hf` the matrix is written four times over the same 1024 bytes, once per bit pair (rows 0-3
# at bits 0-1, rows 4-7 at bits 2-3, ...). In the row-major layouts a row is one run of bytes, with
# a permutation inside each block: I2_S's four 32-byte passes go from the high bits down, TQ2_0's
# from the low bits up (and skip the 2 scale bytes after every 64), TQ1_0 packs five passes in base 3.
#
# ## Where the scale goes
#
# `hf` and the kernel layout carry no scale: the release stores `weight_scale` (bf16 [1]) next to
# each packed matrix. I2_S appends one float32 after the codes (then 28 zero bytes of alignment).
# TQ2_0/TQ1_0 store an fp16 scale in every 256-element block, which for BitNet is the same value
# in every block holding a nonzero code — rounded to fp16:

# %%
tail = packed["i2_s"][N * K // 4:]
print("I2_S tail:", " ".join(f"{b:02x}" for b in tail[:8]), "...", "-> float32",
      tail[:4].copy().view("<f4")[0], "(gamma =", gamma, ")")
_, d = unpack_tq2_0(packed["tq2_0"], (N, K))                                 # [N, K/256] block scales
print(f"TQ2_0 block scales: {np.unique(d)} (fp16(gamma); relative rounding {abs(float(d[0, 0]) / float(gamma) - 1):.1e})")

# %% [markdown]
# ## Sizes for the whole 2B4T model
#
# 30 layers × 7 projections; docs/SPEC.md §1 gives the shapes.

# %%
cfg = BITNET_2B4T
D, F, HD = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
shapes = {"q_proj": (cfg.num_attention_heads * HD, D), "k_proj": (cfg.num_key_value_heads * HD, D),
          "v_proj": (cfg.num_key_value_heads * HD, D), "o_proj": (D, cfg.num_attention_heads * HD),
          "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
elements = cfg.num_hidden_layers * sum(n * k for n, k in shapes.values())
tensors = cfg.num_hidden_layers * len(shapes)
size = {"hf": elements // 4 + tensors * 2, "i2_s": elements // 4 + tensors * 32,
        "tq2_0": elements // 256 * 66, "tq1_0": elements // 256 * 54}
print(f"{elements:,} ternary weights in {tensors} matrices")
for name, nbytes in size.items():
    print(f"  {name:>6}: {nbytes / 1e9:.3f} GB = {8 * nbytes / elements:.4f} bits per weight")
print(f"  log2(3) bound: {elements * np.log2(3) / 8 / 1e9:.3f} GB")

# %% [markdown]
# ## Converting between layouts
#
# Every conversion goes through the codes: unpack one layout, pack the other. Done right it is
# lossless for the codes (the scale may be rounded: bf16 in the release, fp16 in TQ2_0).
# Done with the wrong block size it silently scrambles the matrix: docs/SPEC.md §5 notes that ARM builds of
# bitnet.cpp use a 64-element I2_S block. Reading 128-element-block bytes with a 64-element map:

# %%
release = pack_hf(codes)                                                  # what model.safetensors holds
i2s = pack_i2s(unpack_hf(release), gamma)                                 # HF -> I2_S
back, scale = unpack_i2s(i2s, (N, K))
print("HF -> I2_S -> codes exact:", np.array_equal(back, codes), "  scale:", scale)


def read_i2s_with_block(data, block):
    """Decode I2_S code bytes assuming `block` elements per block (bitnet.cpp x86: 128; ARM: 64)."""
    body = data[: N * K // 4]
    per_byte = block // 4                                                 # bytes per block
    fields = (body.reshape(-1, per_byte)[:, :, None] >> np.array([6, 4, 2, 0], dtype=np.uint8)) & 3
    return (np.moveaxis(fields, -1, 1).reshape(N, K).astype(np.int8) - 1)   # [blocks, 4, per_byte]


wrong = read_i2s_with_block(i2s, 64)
print("decoded with 128-element blocks == codes:", np.array_equal(read_i2s_with_block(i2s, 128), codes))
print(f"decoded with 64-element blocks: {float((wrong != codes).mean()):.0%} of the codes wrong, no error raised")

# %% [markdown]
# Half of the weights change (the other half happen to land on a position holding the same code,
# or on themselves) and nothing crashes: the bytes are valid in either reading.
#
# ## Checks against the library

# %%
for name in LAYOUTS:                                                        # every layout round-trips
    back, _ = decode(packed[name], name, shape=(N, K))
    assert np.array_equal(back, codes), name
R = N // 4                                                                  # the docs/SPEC.md §4 / §5 maps
for n in range(N):
    for k in range(K):
        j = n * K + k
        assert tuple(maps["hf"][j]) == ((n % R) * K + k, 2 * (n // R))
        assert tuple(maps["kernel"][j]) == (n * K // 4 + k // 4, 2 * (k % 4))
        assert tuple(maps["i2_s"][j]) == (j // 128 * 32 + j % 32, 6 - 2 * ((j % 128) // 32))
        assert tuple(maps["tq2_0"][j]) == (j // 256 * 66 + (j % 256) // 128 * 32 + j % 32, 2 * ((j % 128) // 32))
assert len(np.unique(maps["tq1_0"][:, 0])) == N * K // 256 * 52            # 52 code bytes per block
assert tail[:4].copy().view("<f4")[0] == gamma and not tail[4:].any()
assert (d == np.float32(np.float16(gamma))).all()
assert size["hf"] / elements * 8 < 2.001 and abs(size["tq1_0"] / elements * 8 - 1.6875) < 1e-9
assert float((wrong != codes).mean()) > 0.5
print("all checks passed")
