"""Every op of the BitNet b1.58 forward pass, each with its hand-written backward beside it.

Pattern (llm.c / micrograd): ``op_forward(...) -> (out, cache)`` saves what the backward needs;
``op_backward(dout, cache) -> gradients``. Each backward line quotes the forward line it
differentiates. Arrays keep the caller's float dtype: float32 for training, float64 for the
gradient checks against torch autograd.

Shapes (legend in refbitnet/config.py): B sequences of T tokens, D hidden, F intermediate,
H query heads, KVH key/value heads, HD head dim, V vocabulary. "..." is any leading shape.

Quantization-aware training ("online" mode, docs/SPEC.md §3): the optimizer updates latent float weights;
every forward fake-quantizes weights (absmean -> ternary * gamma) and activations (absmax -> int8 / s)
and the straight-through estimator (STE) passes the gradient through both quantizers unchanged,
exactly like torch's ``x + (q(x) - x).detach()``.
"""

import numpy as np

from .. import quant

# ----------------------------------------------------------------------------------------------------
# quantizers (no backward of their own: the STE makes them the identity in the backward pass)


def absmean_fake_quant(w):
    """w [N, K] latent float -> (w_q [N, K] = codes * gamma in w's dtype, codes int8, gamma).

    float32 goes through refbitnet.quant itself (the release quantizer); float64 (gradient checks)
    uses the same formula in float64.
    """
    if w.dtype == np.float32:
        codes, gamma = quant.absmean_ternary(w)
    else:
        gamma = max(np.mean(np.abs(w)), w.dtype.type(quant.WEIGHT_SCALE_MIN))   # gamma = max(mean|W|, 1e-5)
        codes = np.clip(np.round(w / gamma), -1, 1).astype(np.int8)            # Wt = clip(round(W/gamma), -1, 1)
    gamma = w.dtype.type(gamma)
    return codes.astype(w.dtype) * gamma, codes, gamma


def absmax_fake_quant(x):
    """x [..., K] -> x_q [..., K] = xq / s (per-row int8 grid, in x's dtype)."""
    if x.dtype == np.float32:
        xq, s = quant.absmax_int8(x)
    else:
        absmax = np.max(np.abs(x), axis=-1)                                     # [...]
        # 127 / m as torch evaluates it, 127 * (1/m) (two roundings), like quant.absmax_int8 in float32
        s = x.dtype.type(127.0) * (x.dtype.type(1.0) / np.maximum(absmax, x.dtype.type(quant.ACT_ABSMAX_MIN)))
        xq = np.clip(np.round(x * s[..., None]), -128, 127)                     # [..., K]
    return xq.astype(x.dtype) / s[..., None].astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# embedding


def embedding_forward(ids, table):
    """ids int [B, T], table [V, D] -> h [B, T, D]."""
    out = table[ids]                                                            # [B, T, D]
    return out, (ids, table.shape)


def embedding_backward(dout, cache):
    """dout [B, T, D] -> dtable [V, D] (rows of repeated ids accumulate)."""
    ids, table_shape = cache
    dtable = np.zeros(table_shape, dtype=dout.dtype)
    # out = table[ids]  =>  dtable[ids] += dout
    np.add.at(dtable, ids.reshape(-1), dout.reshape(-1, table_shape[1]))
    return dtable


# ----------------------------------------------------------------------------------------------------
# RMSNorm (pre-norms, SubLN norms, final norm)


def rms_norm_forward(x, w, eps):
    """x [..., K], w [K] -> w * x / sqrt(mean(x**2) + eps)  [..., K]."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)          # [..., 1]
    xn = x * rstd                                                               # [..., K]
    return xn * w, (xn, rstd, w)


def rms_norm_backward(dout, cache):
    """dout [..., K] -> (dx [..., K], dw [K])."""
    xn, rstd, w = cache
    # out = xn * w
    dw = np.sum((dout * xn).reshape(-1, xn.shape[-1]), axis=0)                  # [K]
    dxn = dout * w                                                              # [..., K]
    # xn = x * rstd, rstd = (mean(x^2) + eps)^-1/2  =>  dx = rstd * (dxn - xn * mean(dxn * xn))
    dx = rstd * (dxn - xn * np.mean(dxn * xn, axis=-1, keepdims=True))
    return dx, dw


# ----------------------------------------------------------------------------------------------------
# BitLinear (no bias); quantize=False gives a plain linear layer (the float baseline)


def bitlinear_forward(x, w, quantize=True):
    """x [..., K], latent w [N, K] -> y [..., N] = absmax_fq(x) @ absmean_fq(w).T."""
    if quantize:
        x_q = absmax_fake_quant(x)                                              # [..., K]
        w_q, _, _ = absmean_fake_quant(w)                                       # [N, K]
    else:
        x_q, w_q = x, w
    y = x_q @ w_q.T                                                             # [..., N]
    return y, (x_q, w_q)


def bitlinear_backward(dout, cache):
    """dout [..., N] -> (dx [..., K], dw [N, K]).

    STE: round and clip (and the scales s, gamma) pass the gradient through unchanged, so the
    gradient reaching x is the one reaching x_q, and likewise for w and w_q.
    """
    x_q, w_q = cache
    # y = x_q @ w_q.T
    dx = dout @ w_q                                                             # [..., K]  (= d x_q, STE)
    dw = dout.reshape(-1, dout.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1])    # [N, K]    (= d w_q, STE)
    return dx, dw


# ----------------------------------------------------------------------------------------------------
# RoPE, half-split ("rotate_half", NeoX layout): element i pairs with i + HD/2. The cos/sin tables are
# the serving model's (refbitnet.model.rope_tables: float32 angle, as transformers computes it), so the
# model is trained with exactly the rotation it is served with.


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)             # cat(-x2, x1)


def _rotate_half_transpose(g):
    half = g.shape[-1] // 2
    return np.concatenate([g[..., half:], -g[..., :half]], axis=-1)             # cat(g2, -g1)


def rope_forward(x, cos, sin):
    """x [B, T, heads, HD], cos/sin [T, HD] -> x*cos + rotate_half(x)*sin  [B, T, heads, HD]."""
    c, s = cos[:, None, :], sin[:, None, :]                                     # [T, 1, HD]
    return x * c + _rotate_half(x) * s, (c, s)


def rope_backward(dout, cache):
    c, s = cache
    # out = x*cos + rotate_half(x)*sin  =>  dx = dout*cos + rotate_half^T(dout*sin)
    return dout * c + _rotate_half_transpose(dout * s)


# ----------------------------------------------------------------------------------------------------
# GQA causal attention: query head h reads key/value head h // (H // KVH)


def attention_forward(q, k, v):
    """q [B, T, H, HD], k/v [B, T, KVH, HD] -> out [B, T, H, HD]."""
    B, T, H, HD = q.shape
    groups = H // k.shape[2]
    qh = q.transpose(0, 2, 1, 3)                                                # [B, H, T, HD]
    kh = np.repeat(k.transpose(0, 2, 1, 3), groups, axis=1)                     # [B, H, T, HD]
    vh = np.repeat(v.transpose(0, 2, 1, 3), groups, axis=1)                     # [B, H, T, HD]
    scale = HD ** -0.5
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * scale                            # [B, H, T, T]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)                                  # causal mask
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)                                          # softmax  [B, H, T, T]
    out = (p @ vh).transpose(0, 2, 1, 3)                                        # [B, T, H, HD]
    return out, (qh, kh, vh, p, scale, groups)


def attention_backward(dout, cache):
    """dout [B, T, H, HD] -> (dq [B, T, H, HD], dk, dv [B, T, KVH, HD])."""
    qh, kh, vh, p, scale, groups = cache
    B, H, T, HD = qh.shape
    do = dout.transpose(0, 2, 1, 3)                                             # [B, H, T, HD]
    # out = p @ vh
    dp = do @ vh.transpose(0, 1, 3, 2)                                          # [B, H, T, T]
    dvh = p.transpose(0, 1, 3, 2) @ do                                          # [B, H, T, HD]
    # p = softmax(scores)  =>  dscores = p * (dp - sum(dp * p))   (masked entries have p = 0)
    dscores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    # scores = qh @ kh^T * scale
    dqh = (dscores @ kh) * scale                                                # [B, H, T, HD]
    dkh = (dscores.transpose(0, 1, 3, 2) @ qh) * scale                          # [B, H, T, HD]
    # kh, vh = repeat(k, groups): the query heads of one group add up on their KV head
    dk = dkh.reshape(B, H // groups, groups, T, HD).sum(axis=2)                 # [B, KVH, T, HD]
    dv = dvh.reshape(B, H // groups, groups, T, HD).sum(axis=2)
    return dqh.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------------
# feed-forward activation: relu(gate)**2 * up


def relu2_gate_forward(gate, up):
    """gate, up [..., F] -> relu(gate)**2 * up  [..., F]."""
    r = np.maximum(gate, 0)                                                     # relu(gate)
    a = r * r                                                                   # relu2
    return a * up, (r, a, up)


def relu2_gate_backward(dout, cache):
    r, a, up = cache
    # out = a * up
    dup = dout * a
    # a = relu(gate)**2  =>  da/dgate = 2 * relu(gate)
    dgate = dout * up * 2 * r
    return dgate, dup


# ----------------------------------------------------------------------------------------------------
# residual add


def residual_forward(h, delta):
    return h + delta, None


def residual_backward(dout, cache):
    # out = h + delta: both receive dout
    return dout, dout


# ----------------------------------------------------------------------------------------------------
# tied LM head and cross-entropy


def lm_head_forward(x, table):
    """x [..., D], embedding table [V, D] (tied, full precision) -> logits [..., V]."""
    return x @ table.T, (x, table)


def lm_head_backward(dout, cache):
    """dout [..., V] -> (dx [..., D], dtable [V, D])."""
    x, table = cache
    # logits = x @ table.T
    dx = dout @ table
    dtable = dout.reshape(-1, dout.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx, dtable


def cross_entropy_forward(logits, targets, reduction="mean"):
    """logits [N, V], targets int [N] (-1 = ignored) -> (loss scalar, cache).

    reduction "mean": average over the counted tokens (pre-training); "sum": summed (the paper's SFT).
    """
    counted = targets >= 0                                                      # [N]
    n = int(counted.sum())
    z = logits - logits.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1))                                  # [N]
    safe_targets = np.where(counted, targets, 0)
    nll = logsumexp - z[np.arange(len(targets)), safe_targets]                  # [N] = -log p(target)
    total = np.sum(np.where(counted, nll, 0.0))
    denom = max(n, 1) if reduction == "mean" else 1
    return total / denom, (z, logsumexp, safe_targets, counted, denom)


def cross_entropy_backward(dloss, cache):
    """-> dlogits [N, V] = (softmax - onehot(target)) * dloss / denom on counted rows, 0 elsewhere."""
    z, logsumexp, targets, counted, denom = cache
    dlogits = np.exp(z - logsumexp[:, None])                                    # softmax [N, V]
    dlogits[np.arange(len(targets)), targets] -= 1
    dlogits *= (counted[:, None] * (dloss / denom)).astype(dlogits.dtype)
    return dlogits
