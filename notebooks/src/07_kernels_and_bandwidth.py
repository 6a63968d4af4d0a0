# %% [markdown]
# # 07 · From the NumPy reference to the fast kernel, and the roofline of this machine
#
# Decoding one token of 2B4T touches every weight once: 2.08 billion ternary weights and, for the
# LM head, the 328 million bf16 numbers of the embedding. Each weight is used for one multiply-add
# (S = 1 token), so the question is not how fast the CPU computes but how fast it can **read**.
# This notebook follows `refbitnet.kernels` up its ladder (each step validated exactly against the
# NumPy reference) and places each step on the roofline of the machine that runs the notebook.
# Every step is reached through the same door the model uses, `kernels.TernaryLinear(packed,
# weight_scale, kernel=...)`, with the kernel forced by name; `kernel="auto"` (the default) is the
# choice the model makes.
#
# | step | module | bytes per weight |
# |---|---|---|
# | reference | `kernels.reference` (NumPy: unpack, int64 matmul) | 0.25 (+ unpacking) |
# | NumPy path of the model | `bitlinear.ternary_matmul_exact` (float32 BLAS on int8 codes) | 1 |
# | v1 | `kernels.v1_unpacked_int8` (Numba, one int8 per weight) | 1 |
# | v2 | `kernels.v2_packed_scalar` (Numba, 2-bit codes decoded one by one) | 0.25 |
# | v3 | `kernels.v3_word_planes` (Numba, 16-bit words, int16 multiply-adds; any K % 8 == 0) | 0.25 |
# | v4 | `kernels.v4_maddubs` (AVX2 `vpmaddubsw` on byte planes: the GEMV of the model's Numba decode, and a 4-token blocked GEMM) | 0.25 |
# | v5 | `kernels.v5_prefill` (the prefill GEMM: each tile of codes unpacked once, 8 tokens per pass; the model's Numba prefill of more than 4 tokens) | 0.25 |
#
# The decode ladder (reference to v3) comes first; v4 and v5, the kernels the model runs (with AVX2),
# appear where prefill turns the problem from memory-bound to compute-bound.
#
# Timings depend on the machine and on whatever else runs on it; every figure is the best of a few
# repetitions, and the assertions at the end check exactness, not speed.

# %%
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"             # one core for everything: a fair comparison
os.environ["OMP_NUM_THREADS"] = "1"

import time

import matplotlib.pyplot as plt
import numpy as np

from refbitnet import BITNET_2B4T, kernels
from refbitnet.bitlinear import ternary_matmul_exact
from refbitnet.kernels import TernaryLinear
from refbitnet.kernels.reference import bf16_matmul_reference, ternary_matmul_acc_reference
from refbitnet.layouts import pack_kernel
from refbitnet.quant import absmax_int8

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})
kernels.set_num_threads(1)


def best_time(fn, repeats=5):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

# %% [markdown]
# ## How fast can one core read memory?
#
# A read probe: a Numba loop that XORs every 8-byte word of a 128 MiB array (larger than any cache
# here) and writes nothing. (A measuring tool, not part of the library, so it lives here; it is
# compiled fresh each run.) NumPy's own reductions are not a good probe: most are limited by
# their arithmetic before they reach the memory's speed.

# %%
from numba import njit


@njit(cache=False)
def read_every_word(words):
    acc = np.uint64(0)
    for i in range(words.shape[0]):
        acc ^= words[i]
    return acc


probe = np.ones(16 * 2**20, dtype=np.uint64)                          # 128 MiB
read_every_word(probe)                                                # compile, touch the pages
t_read = best_time(lambda: read_every_word(probe))
bw_probe = probe.nbytes / t_read / 1e9
print(f"read bandwidth, one core: {bw_probe:.1f} GB/s")

# %% [markdown]
# ## One projection, every step of the ladder
#
# gate_proj of 2B4T: N = 6912 outputs, K = 2560 inputs, 17.7 M weights, 4.4 MB packed. To make the
# weights come from DRAM rather than from a cache, each timing cycles through 8 different copies
# (35 MB packed), each behind its own door per kernel (`TernaryLinear` keeps a reference to the packed
# array, no copy; the v1 door unpacks its copy once into one byte per weight, the layout v1 reads).
# `door.acc(xq)` runs the integer kernel on int8 activations: the whole step's work for one token.

# %%
cfg = BITNET_2B4T
N, K = cfg.intermediate_size, cfg.hidden_size
rng = np.random.default_rng(0)
codes_pool = [rng.integers(-1, 2, size=(N, K)).astype(np.int8) for _ in range(8)]   # 8 x [N, K] int8
packed_pool = [pack_kernel(c) for c in codes_pool]                                 # 8 x [N, K/4] uint8
xq, s = absmax_int8(rng.standard_normal((1, K)).astype(np.float32))                # one token [1, K]


def cycling(fn, pool):
    state = {"i": 0}

    def run():
        fn(pool[state["i"] % len(pool)])
        state["i"] += 1
    return run


doors = {k: [TernaryLinear(p, kernel=k) for p in packed_pool] for k in ("reference", "v1", "v2", "v3")}
want = ternary_matmul_acc_reference(xq, packed_pool[0])                            # int32 [1, N]
ladder = {  # name: (function of one weight matrix, pool, bytes of weights read per call)
    "reference (NumPy)": (lambda d: d.acc(xq), doors["reference"], N * K // 4),
    "NumPy float32 BLAS": (lambda c: ternary_matmul_exact(xq, c), codes_pool, N * K),
    "v1 unpacked int8": (lambda d: d.acc(xq), doors["v1"], N * K),
    "v2 packed scalar": (lambda d: d.acc(xq), doors["v2"], N * K // 4),
    "v3 word planes": (lambda d: d.acc(xq), doors["v3"], N * K // 4),
}
results = {}
for name, (fn, pool, nbytes) in ladder.items():
    got = fn(pool[0])                                              # also compiles on first use
    exact = np.array_equal(got, want)
    t = best_time(cycling(fn, pool), repeats=3 if name.startswith("ref") else 8)
    results[name] = (t, nbytes)
    print(f"{name:<20} exact: {exact}   {t * 1e3:8.2f} ms   {nbytes / t / 1e9:6.2f} GB/s of weights   "
          f"{2 * N * K / t / 1e9:7.2f} Gop/s")

# %% [markdown]
# Reading the table: the reference is slow because it unpacks and multiplies in int64; NumPy's BLAS
# path is fast but reads a whole byte (as float32 after conversion) per weight; v1 is the plain
# Numba loop over bytes; v2 reads 2-bit codes but decodes them one at a time, so it is limited by
# instructions, not memory; v3 reads 16-bit words and uses int16 multiply-adds (`vpmaddwd`), about
# a fifth of an instruction per weight, and gets close to what the memory system delivers.
#
# ## The roofline
#
# A kernel that does F operations (a multiply-add counts as 2) on B bytes of weights has arithmetic
# intensity F / B. It can run no faster than bandwidth × F / B (the slanted roof), nor faster than
# the core computes (the flat roof). For a decode step (S = 1): ternary weights packed 4 per byte
# give 8 operations per byte; one byte per weight gives 2; the bf16 LM head gives 1. Processing S
# tokens at once (prefill) reuses each weight S times: S × 8 operations per byte.
#
# Both roofs are measured in this run, on one core. The slanted one: the highest read rate seen
# (the probe above, or a kernel that streamed its weights faster — a kernel reading at X GB/s
# proves the memory delivers at least X). The flat one: the best integer throughput seen, v3 on one
# token or on a prompt block of 64 tokens (where each weight is read once and used 64 times).

# %%
xq64, _ = absmax_int8(rng.standard_normal((64, K)).astype(np.float32))            # [64, K]
t64 = best_time(lambda: doors["v3"][0].acc(xq64), repeats=3)
gops = {name: 2 * N * K / t / 1e9 for name, (t, _) in results.items()}
gops_prefill = 2 * 64 * N * K / t64 / 1e9
peak = max(gops["v3 word planes"], gops_prefill)                                   # Gop/s
bw_read = max([bw_probe] + [nbytes / t / 1e9 for t, nbytes in results.values()])   # GB/s
print(f"v3 on 64 tokens: {t64 * 1e3:.1f} ms, {gops_prefill:.1f} Gop/s")
print(f"roofs: memory {bw_read:.1f} GB/s, compute {peak:.1f} Gop/s; ridge at {peak / bw_read:.1f} operations per byte")

# the LM head: bf16 rows of the embedding, 2 flops per 2 bytes; a 32768-row slice of a [V, D] table
table = rng.integers(0, 2**16, size=(32768, K), dtype=np.uint16) & np.uint16(0x3FFF)   # finite bf16 bits
x1 = rng.standard_normal((1, K)).astype(np.float32)
head_exact = np.array_equal(kernels.bf16_matmul(x1, table), bf16_matmul_reference(x1, table))
t_head = best_time(lambda: kernels.bf16_matmul(x1, table), repeats=5)
print(f"bf16 LM head kernel on {table.shape[0]} rows: exact {head_exact}, {table.nbytes / t_head / 1e9:.2f} GB/s")

points = {  # name: (operations per byte, achieved Gop/s)
    "v1 decode (1 B/weight)": (2.0, gops["v1 unpacked int8"]),
    "v2 decode": (8.0, gops["v2 packed scalar"]),
    "v3 decode": (8.0, gops["v3 word planes"]),
    "v3 prefill, 64 tokens": (8.0 * 64, gops_prefill),
    "LM head decode (bf16)": (1.0, 2 * table.shape[0] * K / t_head / 1e9),
}
ai = np.logspace(-1, 3.5, 200)
fig, ax = plt.subplots(figsize=(9, 4.2))
ax.loglog(ai, np.minimum(peak, bw_read * ai), "k-", lw=2, label=f"roofline: {bw_read:.1f} GB/s, {peak:.0f} Gop/s")
for name, (x, y) in points.items():
    ax.loglog(x, y, "o", ms=8, label=f"{name}: {y:.1f} Gop/s")
ax.set_xlabel("arithmetic intensity (operations per byte of weights)")
ax.set_ylabel("Gop/s (one core)")
ax.legend(fontsize=8, loc="lower right")
ax.set_title("one core of this machine")
plt.tight_layout()
plt.show()
for name, (x, y) in points.items():
    roof = min(peak, bw_read * x)
    bound = "memory" if bw_read * x < peak else "compute"
    print(f"{name:<24} {x:6.0f} op/B: {y:6.1f} Gop/s = {y / roof:4.0%} of its roof ({bound}-bound region)")

# %% [markdown]
# Reading the plot: the slanted roof is the memory, the flat one the best integer rate measured.
# Decode steps (1 to 8 operations per byte) cannot run faster than bandwidth × intensity, however
# good the kernel: v1 computes the same thing as v3 from one byte per weight, so it needs 4× the
# bytes. On one core the ridge lies near 8 operations per byte, i.e. ternary decode needs about as
# much instruction throughput as memory throughput — which is why v3's instruction count matters
# (v2, which decodes the 2-bit codes one by one, is far below both roofs). With more cores, compute
# grows and bandwidth does not, the ridge moves right, and decode ends up on the memory roof
# (benchmarks/bench_kernels.py measures 1 and 2 threads). The LM head reads bf16 at 1 operation per
# byte. Prefill (far right) is not limited by memory at all; how close it gets to the flat roof is
# up to the GEMM kernel (the v3 module docstring explains why its GEMM gains little per token) — and
# the flat roof drawn here is only the best that v3 reached, as the next section shows.
#
# ## Prefill is compute-bound: v4's blocked GEMM and v5
#
# A prompt of S tokens multiplies every weight by S activations: at S = 64 that is 512 operations per
# byte of weights, far right of the ridge. The memory has time to spare; what sets the speed is how
# many instructions the core spends per multiply-add. The kernels the model runs on AVX2 (v4, v5)
# build on the instruction `vpmaddubsw`: it multiplies 32 unsigned bytes by 32 signed bytes and
# adds neighbouring products pairwise into 16 int16 lanes. The unsigned operand is the weight's code
# c = w + 1 ∈ {0, 1, 2} (what the packed byte stores), the signed one the int8 activation; at the end
# Σ c·x − Σ x = Σ w·x. A chunk of 128 weights (32 packed bytes, 4 two-bit fields per byte) times one
# token is 4 `vpmaddubsw`, whatever the kernel; the kernels differ in what they do around them.
#
# - **v4 blocked** (`v4_maddubs.matmul_scaled_v4_blocked`, what `kernel="auto"` runs for 2-4
#   tokens): 4 tokens per pass over a row. For every chunk it extracts the 4 fields of the packed
#   bytes again (a load, 3 shifts, 4 ands), work shared by only 4 tokens, and every 15 chunks it
#   reduces each token's int16 accumulator to a scalar.
# - **v5** (`v5_prefill`, more than 4 tokens): *unpack once, reuse S times.* A tile of 64 rows × 20
#   chunks (2560 weights) is unpacked once into a scratch of one byte per code (160 KB, which stays
#   in the L2 cache); every token of the prompt then reads the codes from there, so the unpacking
#   costs 1/S of what v4 pays per token. The inner loop keeps one row's code vector in a register and
#   multiplies it with the activations of **8 tokens** (8 int16 accumulators): per token and chunk,
#   4 `vpmaddubsw` and 4 int16 adds, nothing else. The activations are laid out per block of 8
#   tokens so that the 32 vectors of a chunk sit at fixed offsets from one pointer.
#
# **The int16 bound.** `vpmaddubsw` sums pairs: |c₀x₀ + c₁x₁| ≤ 2·2·128 = 512, so a chunk (4 fields)
# adds at most 2048 to a lane, and 15 chunks at most 30720 < 2¹⁵ = 32768. Both kernels therefore widen
# the int16 accumulators to int32 after every 15 chunks (`kernels.avx2.WIDEN_CHUNKS`; v5 with
# `vpmaddwd` by ones, exact, and it sums the int32 lanes horizontally only once per 20-chunk panel).
# The check below runs the worst case — every weight +1, every activation −128 — and shows what one
# lane would hold without the widening. Every step stays in integers, and the epilogue is the same
# float32 `(acc / s) * weight_scale`, so v5 must equal the reference bit for bit, not approximately.

# %%
from refbitnet.kernels.avx2 import available
from refbitnet.kernels.reference import ternary_matmul_reference

assert available(), "v4 and v5 use AVX2 (x86-64); without it TernaryLinear runs v3"

# A small shape with every edge: S = 11 tokens (an 8-token block and a partial one), N = 70 rows (a 64-row
# tile and a partial one), K = 23 chunks of 128 weights (a 20-chunk panel, widened after 15, then 3 chunks).
S_small, N_small, K_small = 11, 70, 23 * 128
packed_small = pack_kernel(rng.integers(-1, 2, size=(N_small, K_small)).astype(np.int8))     # [70, 736] uint8
x_small = rng.standard_normal((S_small, K_small)).astype(np.float32)                       # [11, 2944]
xq_small, s_small = absmax_int8(x_small)                                                   # [11, 2944] int8, [11]
scale_small = rng.uniform(0.5, 2.0, N_small).astype(np.float32)                            # one scale per row [70]
y_ref_small = ternary_matmul_reference(xq_small, s_small, packed_small, scale_small)       # [11, 70]
y5_small = TernaryLinear(packed_small, scale_small, kernel="v5").matmul(xq_small, s_small)   # [11, 70]
print("v5 == reference, bit for bit:", np.array_equal(y5_small, y_ref_small))

# The worst case for an int16 lane: code c = 2 (w = +1) times x = -128 in every product.
xq_worst = np.full((S_small, K_small), -128, np.int8)
packed_worst = pack_kernel(np.ones((N_small, K_small), np.int8))
y_worst = TernaryLinear(packed_worst, kernel="v5").matmul(xq_worst, np.ones(S_small, np.float32))
print(f"worst case: outputs {np.unique(y_worst)}, expected sum w x = -128 K = {-128 * K_small}")
lane = np.cumsum(np.full(17, -2048))                 # one int16 lane after 1 .. 17 worst-case chunks
print("one lane after 15, 16, 17 chunks:", lane[14:].tolist(), "-> held in int16:", lane[14:].astype(np.int16).tolist())

layer = TernaryLinear(packed_small, scale_small)    # kernel="auto": the model's choice by number of tokens
print("kernel for S tokens:", {S_tok: layer.kernel_for(S_tok) for S_tok in (1, 2, 4, 5, 8, 64)})

# %% [markdown]
# The 15 is the simple bound (|pair| ≤ 512 in both directions); the true extremes are −512 and
# +508, so 16 chunks would still fit — the 17th wraps around, as the last line shows.
#
# Now the speeds, on gate_proj with S = 64 tokens, one thread, the weights cycling through the 8
# copies as above. The contenders compute the same numbers: the prompt run as 64 separate decode
# steps (v4's GEMV, each step reading the weights from memory again), v4's GEMV kernel called once on
# all 64 tokens, v4's blocked GEMM, and v5. Each is timed as the model runs it, `door(x)` on float32
# activations: one compiled pass that quantizes and writes the kernel's activation layout
# (`kernels.act_quant`), then the kernel.

# %%
S = 64
x_prompt = rng.standard_normal((S, K)).astype(np.float32)                    # [64, K]
row_scale = np.full(N, 0.02, np.float32)                                     # [N]
xq_prompt, s_prompt = absmax_int8(x_prompt)                                  # [64, K] int8, [64]
want_prompt = ternary_matmul_reference(xq_prompt, s_prompt, packed_pool[0], row_scale)   # [S, N]

gemm_doors = {  # name: one door per weight copy, the kernel forced
    "v4 GEMV, all tokens": [TernaryLinear(p, row_scale, kernel="v4") for p in packed_pool],
    "v4 blocked": [TernaryLinear(p, row_scale, kernel="v4_blocked") for p in packed_pool],
    "v5": [TernaryLinear(p, row_scale, kernel="v5") for p in packed_pool],
}
gemm_exact = {}
for name, pool in gemm_doors.items():                # the first call also compiles (or loads the cache)
    gemm_exact[name] = np.array_equal(pool[0](x_prompt), want_prompt)
print("bit for bit equal to the reference:", gemm_exact)

t_gemv = best_time(cycling(lambda d: d(x_prompt[:1]), gemm_doors["v4 GEMV, all tokens"]), repeats=8)
t_blocked = best_time(cycling(lambda d: d(x_prompt), gemm_doors["v4 blocked"]), repeats=5)
t_v5 = best_time(cycling(lambda d: d(x_prompt), gemm_doors["v5"]), repeats=5)
prefill_times = {f"{S} x v4 GEMV (decode)": S * t_gemv, f"v3 GEMM (timed above)": t64,
                 "v4 blocked GEMM, 4 tokens/pass": t_blocked, "v5 GEMM, 8 tokens/pass": t_v5}
for name, t in prefill_times.items():
    print(f"{name:<32} {t * 1e3:7.1f} ms   {S / t:8.0f} tokens/s   {2 * S * N * K / t / 1e9:6.1f} Gop/s   "
          f"{S * t_gemv / t:4.1f}x the GEMVs")
print(f"v5 / v4 blocked: {t_blocked / t_v5:.2f}x faster; v5 reaches {2 * S * N * K / t_v5 / 1e9 / peak:.1f}x "
      f"the flat roof drawn above ({peak:.1f} Gop/s, v3's best)")

# %% [markdown]
# Reading the numbers: 64 GEMVs read and decode the weights 64 times; a GEMM reads them once, so
# only the instructions around each `vpmaddubsw` are left to limit it, and those are what v4 blocked
# and v5 cut (the v3 docstring explains why its word-plane GEMM gains little over its GEMV). On the
# development machine (AMD Zen 3 at 3.2 GHz, AVX2 without VNNI, one thread, 128 tokens),
# benchmarks/results/kernels_history.md records 0.95-1.07 cycles per `vpmaddubsw` for v4 blocked and
# 0.73-0.77 for v5 (1.2-1.5x), against 0.63 for a probe that does nothing but independent
# `vpmaddubsw` + add pairs: the adds share the vector ports with the multiplies, so that probe is about
# the ceiling for this instruction pair on that core (`python benchmarks/bench_kernels.py` measures
# the probe and v5's share of it on your machine). Few tokens are another matter: a v5 call pays for
# unpacking the tiles and for a whole 8-token block however many tokens it has, so `kernel="auto"`
# (printed above) keeps v4's GEMV for one token and v4 blocked for 2-4, and runs v5 from 5 tokens on.
#
# ## What this means for decoding 2B4T here
#
# Per token, decoding reads all ternary weights (0.52 GB) and the bf16 embedding as the LM head
# (0.66 GB). At the measured read bandwidth that sets a floor on the time per token; the kernels'
# achieved GB/s give the estimate for this implementation (attention and the rest are small at
# short context).

# %%
ternary_bytes = cfg.num_hidden_layers * 69_468_160 / 4
head_bytes = cfg.vocab_size * cfg.hidden_size * 2
floor = (ternary_bytes + head_bytes) / (bw_read * 1e9)     # seconds per token
v3_gbs = results["v3 word planes"][1] / results["v3 word planes"][0] / 1e9
head_gbs = table.nbytes / t_head / 1e9
estimate = ternary_bytes / (v3_gbs * 1e9) + head_bytes / (head_gbs * 1e9)
print(f"bytes per token: {ternary_bytes / 1e9:.2f} GB ternary + {head_bytes / 1e9:.2f} GB LM head")
print(f"bandwidth floor on one core: {floor * 1e3:.0f} ms/token ({1 / floor:.1f} tokens/s)")
print(f"with the kernels' measured speeds: about {estimate * 1e3:.0f} ms/token ({1 / estimate:.1f} tokens/s)")
print("the report's figure: 29 ms/token with 8 threads on an i7-13800H")

# %% [markdown]
# More than half of the bytes per token are the bf16 LM head, not the ternary weights: at 2B
# parameters and a 128k vocabulary, the embedding is the largest tensor the model reads.
#
# ## Checks against the library

# %%
for name, (fn, pool, _) in ladder.items():                    # every step equals the reference exactly
    for i in (0, 3):
        assert np.array_equal(fn(pool[i]), ternary_matmul_acc_reference(xq, packed_pool[i])), name
acc64 = ternary_matmul_acc_reference(xq64, packed_pool[0])
assert np.array_equal(doors["v3"][0].acc(xq64), acc64)
assert np.array_equal(kernels.ternary_matmul_acc(xq64, packed_pool[0]), acc64)   # kernel="auto", one call
y = TernaryLinear(packed_pool[0], np.float32(0.02)).matmul(xq64, s.repeat(64))
assert np.array_equal(y, (acc64.astype(np.float32) / s.repeat(64)[:, None]) * np.float32(0.02))
assert head_exact
assert np.array_equal(y5_small, y_ref_small)                                     # v5, every edge of the tiling
assert np.array_equal(TernaryLinear(packed_small, scale_small, kernel="v5")(x_small), y_ref_small)  # from float x
assert np.array_equal(layer(x_small), y_ref_small) and layer.kernel_for(S_small) == "v5"   # the model's path
assert np.all(y_worst == -128 * K_small)                                          # the int16 worst case
assert all(gemm_exact.values())                                                   # GEMV, v4 blocked, v5 at S = 64
assert bw_read >= bw_probe > 0 and peak > 0 and floor > 0
print("all checks passed")
