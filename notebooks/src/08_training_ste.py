# %% [markdown]
# # 08 · Training with the straight-through estimator
#
# BitNet b1.58 is not a float model quantized afterwards: it is *trained* with the quantizers in
# the forward pass ("quantization-aware training", docs/SPEC.md §3). The optimizer keeps **latent** float
# weights; every forward pass quantizes them (absmean → ternary · gamma) and the activations (absmax
# → int8 / s); the backward pass treats both quantizers as the identity. That last step is the
# **straight-through estimator (STE)**.
#
# `refbitnet.train` writes every gradient by hand (no autograd): `train.ops` holds each op's forward
# beside its backward, `train.model` the whole network, `train.trainer` the loop.

# %%
import os
import tempfile

os.environ["OPENBLAS_NUM_THREADS"] = "1"    # before numpy: small matmuls run faster on one thread
os.environ["OMP_NUM_THREADS"] = "1"         # than with BLAS threads competing for shared cores

import matplotlib.pyplot as plt
import numpy as np

import refbitnet
from refbitnet import Config
from refbitnet.train import data, ops
from refbitnet.train.schedule import TwoStageSchedule
from refbitnet.train.trainer import TrainConfig, Trainer

plt.rcParams.update({"figure.dpi": 80, "axes.spines.top": False, "axes.spines.right": False})

# %% [markdown]
# ## Why a straight-through estimator
#
# Take one BitLinear layer and a squared-error loss. As a function of one latent weight, the loss is
# a staircase: the weight's code only changes when it crosses ±0.5·gamma. Between the thresholds
# the loss still moves a little, but only through gamma = mean|W|, the scale shared by the whole
# matrix: the true derivative says how *all* outputs should be rescaled, nothing about what *this*
# weight should be, and at the thresholds it is infinite. The STE uses instead the gradient the
# layer would have if quantization were the identity: for `y = x_q @ w_q.T`,
# `dL/dW = dL/dy^T @ x_q` (and `dL/dx = dL/dy @ w_q`).

# %%
rng = np.random.default_rng(0)
N, K, B = 16, 64, 512
W = (0.1 * rng.standard_normal((N, K))).astype(np.float64)             # latent weights [N, K]
x = rng.standard_normal((B, K))                                         # inputs [B, K]
target = rng.standard_normal((B, N))


def loss_of(W):
    y, cache = ops.bitlinear_forward(x, W)                              # y [B, N] = x_q @ w_q.T
    return 0.5 * float(((y - target) ** 2).sum()), y, cache


loss0, y, cache = loss_of(W)
dx, dW = ops.bitlinear_backward(y - target, cache)                      # STE gradient [N, K]
_, codes, gamma = ops.absmean_fake_quant(W)

i, j = 3, 5
sweep = np.linspace(-0.3, 0.3, 241)
losses = []
for v in sweep:
    W2 = W.copy()
    W2[i, j] = v
    losses.append(loss_of(W2)[0])
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.plot(sweep, losses, label="true loss as W[3, 5] varies")
ax.plot(sweep, loss0 + dW[i, j] * (sweep - W[i, j]), "--", label="STE gradient at the current value")
ax.axvline(W[i, j], color="gray", lw=1)
for t in (-0.5 * gamma, 0.5 * gamma):
    ax.axvline(t, color="tab:red", lw=1, ls=":")
ax.set_xlabel("latent weight W[3, 5] (red: ±0.5·gamma)")
ax.set_ylabel("loss")
ax.legend()
plt.tight_layout()
plt.show()

eps = 1e-6                                                              # the true local derivative
Wp, Wm = W.copy(), W.copy()
Wp[i, j] += eps
Wm[i, j] -= eps
print(f"true derivative dL/dW[3,5] (finite difference) = {(loss_of(Wp)[0] - loss_of(Wm)[0]) / (2 * eps):+.4f}")
print(f"STE gradient                                    = {dW[i, j]:+.4f}")

# %% [markdown]
# The two numbers differ: the true derivative is the slope of one flat-ish step (through gamma
# only — the code of W[3, 5] does not change under the nudge), the STE gradient follows the overall
# trend of the staircase, which is what the optimizer needs. Under it the latent weight drifts until
# it crosses a threshold and its code flips.
#
# ## One training step by hand
#
# A toy task: recover a ternary "teacher" layer from its inputs and outputs. One step is forward,
# loss, backward (STE), and an update of the latent weights; we count the codes that flip.

# %%
teacher_codes = rng.integers(-1, 2, size=(N, K)).astype(np.float64)
y_teacher = x @ teacher_codes.T * 0.05                                  # [B, N]


def step(W, lr):
    y, cache = ops.bitlinear_forward(x, W)                              # forward: quantize W and x
    loss = 0.5 * float(((y - y_teacher) ** 2).mean())
    _, dW = ops.bitlinear_backward((y - y_teacher) / y.size, cache)     # backward: STE
    return W - lr * dW, loss                                            # update the LATENT weights


W_latent = 0.05 * rng.standard_normal((N, K))
codes_before = ops.absmean_fake_quant(W_latent)[1]
W_after, loss_first = step(W_latent, lr=3.0)
codes_after = ops.absmean_fake_quant(W_after)[1]
print(f"loss {loss_first:.4f}; codes that flipped in this step: {int((codes_before != codes_after).sum())} of {N * K}")

history = [loss_first]
W_run = W_after
for _ in range(100):
    W_run, loss = step(W_run, lr=3.0)
    history.append(loss)
agreement = float((ops.absmean_fake_quant(W_run)[1] == teacher_codes).mean())
print(f"after 100 more steps: loss {history[-1]:.5f}; codes equal to the teacher's: {agreement:.0%}")

# %% [markdown]
# ## The two-stage schedule of 2B4T
#
# The 2B4T report trains with a two-stage learning-rate schedule: a high peak with a cosine decay,
# then, halfway, an abrupt drop to a lower peak with its own cosine ("cooldown"); weight decay
# follows a cosine from 0.1 in stage 1 and is switched off in stage 2. `TwoStageSchedule` writes it
# as pure functions of the step.

# %%
sched = TwoStageSchedule(total_steps=1000, warmup_steps=50)           # peak 3e-3, cooldown peak 1e-3
print(f"lr at steps 499 / 500: {sched.lr(499):.2e} / {sched.lr(500):.2e}; "
      f"weight decay {sched.weight_decay(499):.3f} / {sched.weight_decay(500):.3f}")
steps = np.arange(sched.total_steps)
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2))
a.plot(steps, [sched.lr(t) for t in steps])
a.set_title("learning rate")
b.plot(steps, [sched.weight_decay(t) for t in steps], color="tab:orange")
b.set_title("weight decay")
for ax in (a, b):
    ax.axvline(sched.cooldown, color="gray", lw=1, ls="--")
    ax.set_xlabel("step (dashed: start of stage 2)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A short run whose loss goes down
#
# A 2-layer BitNet (D = 64, 4 query heads, 2 KV heads) on Python's own documentation
# (`pydoc_data`, always installed), with a 384-token byte-level BPE vocabulary trained on it.
# The same architecture with float linear layers (`quantize=False`) runs beside it for comparison.

# %%
docs = data.pydoc_documents()
tokenizer = data.train_tokenizer(docs, vocab_size=384)
train_ids, val_ids = data.encode_split(tokenizer, docs)
print(f"{len(docs)} documents, {len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")
baseline = data.unigram_loss(train_ids, val_ids, 384)

config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=384, max_position_embeddings=128, rope_theta=10000.0,
                bos_token_id=0, eos_token_id=1)
STEPS, SEQ, BATCH = 200, 64, 8


def batches(rng):
    return data.sample_batch(train_ids, BATCH, SEQ, rng)


runs = {}
for quantize in (True, False):
    trainer = Trainer(config, TrainConfig(seq_len=SEQ, batch_size=BATCH, total_steps=STEPS, peak_lr=1e-2,
                                          cooldown_peak_lr=5e-3, warmup_steps=5, quantize=quantize, seed=0),
                      batches)
    val_before = trainer.evaluate(data.eval_batches(val_ids, 8, SEQ, max_batches=4))
    log = [trainer.train_step() for _ in range(STEPS)]
    val_after = trainer.evaluate(data.eval_batches(val_ids, 8, SEQ, max_batches=4))
    runs["BitNet b1.58 (ternary)" if quantize else "float linear layers"] = (trainer, log, val_before, val_after)

fig, ax = plt.subplots(figsize=(9, 3.4))
for name, (_, log, before, after) in runs.items():
    ax.plot([r["loss"] for r in log], label=f"{name}: validation {before:.2f} -> {after:.2f}")
ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram baseline {baseline:.2f}")
ax.axvline(STEPS // 2, color="gray", lw=1, ls=":")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/token)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## From latent weights to the release layout
#
# `Trainer.export` quantizes the latent weights once more (absmean), packs them in the release
# layout with a bf16 `weight_scale`, and writes a directory `refbitnet.load` reads — the inference
# model of notebooks 05-07. Its loss on validation text matches the trainer's up to the bf16
# rounding of the stored tensors.

# %%
trainer = runs["BitNet b1.58 (ternary)"][0]
with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    trainer.export(os.path.join(tmp, "model"), tokenizer_file=os.path.join(tmp, "tokenizer.json"))
    model = refbitnet.load(os.path.join(tmp, "model"), numerics="fake-quant")
ids, targets = next(data.eval_batches(val_ids, 1, SEQ))
logits = model.forward(ids[0])                                           # [T, V]
shifted = logits - logits.max(axis=1, keepdims=True)
nll = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(SEQ), targets[0]]))
trained_nll = trainer.evaluate([(ids, targets)])
print(f"validation window: loss {trained_nll:.4f} in the trainer, {nll:.4f} in the exported inference model")
print("sample:", repr(model.tokenizer.decode(model.generate("def ", max_new_tokens=24, temperature=0.8, seed=1))))

# %% [markdown]
# Two hundred steps on a tiny model learn little more than common byte sequences, but the mechanics
# are those of the 2B4T recipe: latent weights, fake-quantized forward passes, STE gradients, AdamW,
# the two-stage schedule, then export to ternary. `examples/train.py` runs the same loop longer on
# Shakespeare to make the model that ships with refbitnet; its record:

# %%
import json
from pathlib import Path

record = json.loads((Path(refbitnet.__file__).parent / "shipped" / "TRAINING.json").read_text())
print(record["corpus"])
print(f"{record['train']['total_steps']} steps, {record['train_tokens']:,} training tokens")
print(f"validation perplexity: BitNet b1.58 {record['val_perplexity']:.0f}, same model with float linear "
      f"layers {record['float_baseline_val_perplexity']:.0f}, unigram {record['unigram_val_perplexity']:.0f}")
#
# ## Checks against the library

# %%
assert np.allclose(dW, (y - target).T @ cache[0])                       # STE: dW = dout^T @ x_q
assert np.allclose(dx, (y - target) @ cache[1])                          #      dx = dout @ w_q
assert np.array_equal(ops.absmean_fake_quant(Wp)[1], codes)             # the nudge flips no code ...
assert abs(dW[i, j] - (loss_of(Wp)[0] - loss_of(Wm)[0]) / (2 * eps)) > 0.1 * abs(dW[i, j])   # ... STE != true
assert history[-1] < 0.01 * history[0] and agreement > 0.95
assert sched.lr(sched.cooldown) == sched.cooldown_peak_lr and sched.weight_decay(sched.cooldown) == 0.0
assert sched.lr(sched.cooldown - 1) > sched.lr(sched.cooldown) and sched.stage(999) == 2
for name, (_, log, before, after) in runs.items():
    assert np.mean([r["loss"] for r in log[-10:]]) < log[0]["loss"] - 1.0, name      # the loss went down
    assert after < before - 1.0, name
assert abs(nll - trained_nll) < 0.05
assert record["val_loss"] < record["unigram_val_loss"] - 1.0          # the shipped run learned too
print("all checks passed")
