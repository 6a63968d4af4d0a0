# %% [markdown]
# # 06 · Generation: prefill, decode, the KV cache, sampling — and transformers as the reference
#
# A language model gives a distribution over the next token. Generating text means running it again
# and again, feeding each chosen token back in. Done naively, step t recomputes all t previous
# positions. The **KV cache** keeps every layer's keys and values of the positions already seen, so
# each new token costs one position's worth of work:
#
# - **prefill**: the prompt goes through the model as one block of S tokens, filling the cache;
# - **decode**: one token at a time, attending to everything in the cache.
#
# We write a small random BitNet model in the release layout (packed uint8 + weight_scale, bf16,
# the release's quantization_config) with refbitnet, load it with refbitnet **and** with Hugging
# Face transformers, and compare.

# %%
import os
import tempfile
import time
import warnings

os.environ["TORCHDYNAMO_DISABLE"] = "1"              # before torch is imported
os.environ["OPENBLAS_NUM_THREADS"] = "1"             # before numpy: the timings below compare work,
os.environ["OMP_NUM_THREADS"] = "1"                  # not BLAS threads fighting over shared cores
warnings.filterwarnings("ignore")

import matplotlib.pyplot as plt
import numpy as np

import refbitnet
from refbitnet import Config
from refbitnet.checkpoint import save_checkpoint
from refbitnet.sampling import Sampler, apply_temperature, softmax, top_k_filter, top_p_filter
from refbitnet.train.model import init_parameters

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

config = Config(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0,
                bos_token_id=1, eos_token_id=2)
weights = init_parameters(config, seed=0)             # latent float32 weights, release names
weights["model.embed_tokens.weight"] *= 50           # std 1: a random model with peaked predictions
# An untied LM head: a random model with a tied head tends to repeat its input token forever.
weights["lm_head.weight"] = (0.15 * np.random.default_rng(1).standard_normal((512, 256))).astype(np.float32)
config = config.replace(tie_word_embeddings=False)
workdir = tempfile.TemporaryDirectory()
save_checkpoint(workdir.name, config, weights)       # config.json + model.safetensors, release layout
print(sorted(os.listdir(workdir.name)))

model = refbitnet.load(workdir.name)                 # numerics="int": int8 x ternary -> int32
print(model)

# %% [markdown]
# ## Prefill and decode give the same logits
#
# Without a cache, `forward(ids)` runs the whole sequence causally. With a cache, the prompt is
# prefilled as one block and each further token is decoded alone. refbitnet computes every position
# with arrays of the same shapes either way, so the two paths agree **bit for bit**.

# %%
rng = np.random.default_rng(0)
ids = rng.integers(3, config.vocab_size, size=48)                  # a 48-token sequence
full = model.forward(ids)                                          # [48, V], no cache

cache = model.new_cache(max_tokens=64)
print("empty cache:", cache, " k:", cache.k.shape, "= [L, capacity, KVH, HD]")
prefill = model.forward(ids[:32], cache=cache)                     # [32, V], fills 32 positions
decoded = [model.forward(ids[t:t + 1], cache=cache) for t in range(32, 48)]   # 16 x [1, V]
print("after prefill + 16 decode steps:", cache)
incremental = np.concatenate([prefill] + decoded)
print("cached logits == full forward, bit for bit:", np.array_equal(incremental, full))

# %% [markdown]
# ## What the cache saves
#
# Per decode step, the cost without a cache grows with the whole sequence (every position is
# recomputed through every projection); with a cache, the projections run on one token and only
# attention reads the T cached keys and values.

# %%
lengths = [8, 64, 128, 256, 384]
with_cache, without_cache = [], []
for T in lengths:
    seq = rng.integers(3, config.vocab_size, size=T + 1)
    c = model.new_cache(T + 1)
    model.forward(seq[:T], cache=c)
    best = np.inf
    for _ in range(3):
        c.length = T                                              # re-decode the same position
        t0 = time.perf_counter()
        model.forward(seq[T:T + 1], cache=c)
        best = min(best, time.perf_counter() - t0)
    with_cache.append(best)
    t0 = time.perf_counter()
    model.forward(seq[: T + 1])                                   # recompute everything
    without_cache.append(time.perf_counter() - t0)

fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(lengths, 1e3 * np.array(without_cache), "o-", label="no cache: forward over all T+1 tokens")
ax.plot(lengths, 1e3 * np.array(with_cache), "o-", label="KV cache: forward over 1 token")
ax.set_xlabel("tokens already in the sequence (T)")
ax.set_ylabel("ms per new token")
ax.legend()
plt.tight_layout()
plt.show()
kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
print(f"cache memory: {kv_per_token} bytes per token here; 2B4T: "
      f"{2 * 30 * 5 * 128 * 4 // 1024} KiB per token in float32")

# %% [markdown]
# ## Sampling
#
# The last row of the logits becomes a token id. Greedy takes the argmax. Otherwise the logits are
# divided by a temperature, optionally cut to the top k tokens and to the smallest set whose
# probability reaches top_p (nucleus), and one token is drawn. refbitnet draws with its own seeded
# generator (SplitMix64), so a seed reproduces a run on any machine.

# %%
last = full[-1]                                                     # [V]
settings = {"T=1": (1.0, 0, 1.0), "T=0.7": (0.7, 0, 1.0), "T=0.7, top_k=20": (0.7, 20, 1.0),
            "T=0.7, top_p=0.9": (0.7, 0, 0.9)}
fig, ax = plt.subplots(figsize=(11, 3.2))
order = np.argsort(-last)[:40]
for label, (temp, k, p) in settings.items():
    z = apply_temperature(last, temp)
    if k:
        z = top_k_filter(z, k)
    if p < 1:
        z = top_p_filter(z, p)
    probs = softmax(z)
    ax.plot(probs[order], ".-", label=f"{label}: {int((probs > 0).sum())} tokens possible")
ax.set_xlabel("the 40 most likely tokens, by rank")
ax.set_ylabel("probability")
ax.legend()
plt.tight_layout()
plt.show()

prompt = ids[:16]
greedy = model.generate(prompt, max_new_tokens=24)
sample_a = model.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7)
sample_b = model.generate(prompt, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=7)
print("greedy :", greedy)
print("sampled:", sample_a)
print("same seed, same tokens:", sample_a == sample_b)

# %% [markdown]
# ## Half the memory: a float16 cache
#
# Each position adds 2 (keys and values) × L × KVH × HD numbers to the cache; at long context the
# cache, not the weights, is what grows. `model.new_cache(n, kv_dtype="float16")` (and
# `generate(..., kv_dtype="float16")`) stores keys (after RoPE) and values rounded to float16, as
# llama.cpp and bitnet.cpp do by default, and widens them back to float32 when attention reads them:
# attention still computes in float32, but every cached number has been rounded once (relative error
# at most 2⁻¹¹ ≈ 4.9e-4 in float16's normal range). float32 stays the default and is exact.

# %%
big = refbitnet.BITNET_2B4T
numbers_per_position = 2 * big.num_hidden_layers * big.num_key_value_heads * big.head_dim    # 2 x 30 x 5 x 128
for name, size in (("float32", 4), ("float16", 2)):
    print(f"2B4T cache, {name}: {numbers_per_position * size // 1024} KiB per position, "
          f"{numbers_per_position * size * big.max_position_embeddings / 2**20:.0f} MiB at "
          f"{big.max_position_embeddings} positions")

cache16 = model.new_cache(max_tokens=64, kv_dtype="float16")
prefill16 = model.forward(ids[:32], cache=cache16)                                   # the same 32 + 16 steps
incremental16 = np.concatenate([prefill16] + [model.forward(ids[t:t + 1], cache=cache16) for t in range(32, 48)])
print(cache16, f"| k + v: {cache16.k.nbytes + cache16.v.nbytes} bytes vs {cache.k.nbytes + cache.v.nbytes} in float32")
rel16 = float(np.abs(incremental16 - full).max() / np.abs(full).max())
agree16 = float((incremental16.argmax(1) == full.argmax(1)).mean())
print(f"float16 vs float32 cache: max |diff| / max |logit| = {rel16:.1e}, argmax agrees at {agree16:.0%} of positions")
# Layer 0's keys and values do not depend on the cache (its input is the embedding), so there the
# float16 cache holds exactly the float32 cache's numbers, rounded. Deeper layers differ by more:
# their inputs already went through attention over rounded keys and values.
layer0_rounded = (np.array_equal(cache16.k[0, :48], cache.k[0, :48].astype(np.float16))
                  and np.array_equal(cache16.v[0, :48], cache.v[0, :48].astype(np.float16)))
print("layer 0: float16 cache == float32 cache rounded to float16:", layer0_rounded)
greedy16 = model.generate(prompt, max_new_tokens=24, kv_dtype="float16")
same16 = next((i for i, (a, b) in enumerate(zip(greedy16, greedy)) if a != b), len(greedy))
print("greedy, float16 cache:", greedy16)
print(f"greedy tokens identical to the float32 cache's for the first {same16} of {len(greedy)}")

# %% [markdown]
# The logits move because attention reads rounded keys and values, and now and then such a change
# pushes an activation across a rounding boundary of the next BitLinear's int8 quantizer, changing a
# code (the same mechanism as in the comparison with transformers below). tests/test_kv_cache_float16.py bounds the first layer's attention change from
# the rounding itself, checks the end-to-end logits to 5e-2, and checks that the Numba backend gives
# the same bits as this NumPy path with either cache type.

# %% [markdown]
# ## The same checkpoint in transformers
#
# transformers reads the directory as the released model: `BitNetForCausalLM` with `AutoBitLinear`
# projections (offline quantization mode) that compute the **fake-quant** form (notebook 03). We
# load it in float32 with eager attention, then compare with refbitnet in both numerics.

# %%
import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
hf = transformers.BitNetForCausalLM.from_pretrained(workdir.name, dtype=torch.float32, attn_implementation="eager")
with torch.no_grad():                      # transformers keeps the non-quantized bf16 tensors in bf16:
    for p in list(hf.parameters()) + list(hf.buffers()):
        if p.dtype == torch.bfloat16:      # widen them (exact) so every op runs in float32
            p.data = p.data.float()
hf.eval()
print(type(hf.model.layers[0].self_attn.q_proj).__name__, "| dtype", hf.model.layers[0].self_attn.q_proj.weight.dtype)

with torch.no_grad():
    hf_logits = hf(torch.as_tensor(ids)[None]).logits[0].numpy()               # [48, V]
fake = refbitnet.load(workdir.name, numerics="fake-quant").forward(ids)      # [48, V]
scale = np.abs(hf_logits).max()
for label, ours in (("fake-quant", fake), ("int", full)):
    rel = np.abs(ours - hf_logits).max() / scale
    agree = float((ours.argmax(1) == hf_logits.argmax(1)).mean())
    print(f"refbitnet {label:>10} vs transformers: max |diff| / max |logit| = {rel:.1e}, argmax agrees at {agree:.0%} of positions")

# %% [markdown]
# The two differ by float32 rounding: transformers sums the fake-quant products in torch's order,
# refbitnet in NumPy's (or exactly in int32). A rounding difference occasionally moves an activation
# across a rounding boundary of the next int8 quantizer, which changes one code and then propagates;
# tests/test_model_vs_transformers.py follows that layer by layer and bounds it. (Which of
# refbitnet's two numerics lands closer to transformers on a given input depends on where such
# flips happen; both stay within the bound.) Greedy generation:

# %%
with torch.no_grad():
    hf_out = hf.generate(torch.as_tensor(prompt)[None], max_new_tokens=24, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
print("transformers:", hf_out)
print("refbitnet   :", greedy)
same = next((i for i, (a, b) in enumerate(zip(hf_out, greedy)) if a != b), len(greedy))
print(f"identical for the first {same} of {len(greedy)} tokens")

# %% [markdown]
# ## A trained model: the one that ships with refbitnet
#
# `refbitnet.load()` with no path loads a small BitNet b1.58 (4 layers, D = 256, a 4096-token BPE
# vocabulary) trained on Shakespeare by `examples/train.py`, stored in the release layout. Being a
# release-layout directory, transformers reads it too. Trained weights make confident predictions,
# and the two implementations produce the same text.

# %%
from pathlib import Path

shipped = refbitnet.load()                                          # refbitnet/shipped
print(shipped)
prompt_ids = shipped.tokenizer.encode("ROMEO.\nBut soft, what light", add_bos=True)
ours_text = shipped.generate(prompt_ids, max_new_tokens=32, temperature=0.0)   # greedy (the shipped default samples)
hf_shipped = transformers.BitNetForCausalLM.from_pretrained(str(Path(refbitnet.__file__).parent / "shipped"),
                                                            dtype=torch.float32, attn_implementation="eager")
with torch.no_grad():
    for p in list(hf_shipped.parameters()) + list(hf_shipped.buffers()):
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    hf_shipped.eval()
    hf_text = hf_shipped.generate(torch.as_tensor(prompt_ids)[None], max_new_tokens=32, do_sample=False,
                                  pad_token_id=1, eos_token_id=list(shipped.tokenizer.eos_ids))[0, len(prompt_ids):].tolist()
    hf_shipped_logits = hf_shipped(torch.as_tensor(prompt_ids)[None]).logits[0].numpy()
shipped_rel = float(np.abs(shipped.forward(prompt_ids) - hf_shipped_logits).max() / np.abs(hf_shipped_logits).max())
print(f"logits of the prompt: max |refbitnet - transformers| / max |logit| = {shipped_rel:.1e}")
print("refbitnet, greedy   :", repr(shipped.tokenizer.decode(ours_text)))
print("transformers, greedy:", repr(shipped.tokenizer.decode(hf_text)))
print("float16 KV cache, same greedy text as float32:", shipped.generate(prompt_ids, max_new_tokens=32, temperature=0.0, kv_dtype="float16") == ours_text)
print("refbitnet, sampled  :", repr(shipped.tokenizer.decode(
    shipped.generate(prompt_ids, max_new_tokens=32, temperature=0.8, top_p=0.95, seed=3))))

# %% [markdown]
# ## Checks against the library

# %%
assert np.array_equal(incremental, full)                        # prefill + decode == stateless forward
assert cache.length == 48
ref = list(ids[:16])                                             # greedy == argmax of a stateless forward, step by step
for _ in range(8):
    ref.append(int(model.forward(np.array(ref))[-1].argmax()))
assert greedy[:8] == ref[16:]
assert sample_a == sample_b                                      # seeded sampling reproduces
assert cache16.dtype == "float16" and cache16.k.nbytes * 2 == cache.k.nbytes  # half the bytes
assert layer0_rounded and 0 < rel16 < 5e-2                          # float16 cache: rounded, within the tests' bound
assert Sampler(0.7, 20, 1.0, 0).filtered_logits(last).max() == apply_temperature(last, 0.7).max()
for ours in (fake, full):                                       # transformers agrees to the stated bound
    assert np.abs(ours - hf_logits).max() / scale < 5e-2
assert float((fake.argmax(1) == hf_logits.argmax(1)).mean()) > 0.9
assert shipped_rel < 5e-2 and ours_text == hf_text                # the trained model: same greedy text
workdir.cleanup()
print("all checks passed")
