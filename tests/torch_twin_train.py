"""Torch twin of refbitnet.train (autograd instead of hand-written backward), for the training tests.

The same forward as refbitnet/train/model.py written with torch ops, the quantizers in the STE
form ``x + (q(x) - x).detach()``. Works in float64 (gradient checks) and float32 (loss trajectory).
"""

import torch
import torch.nn.functional as F


def absmean_fake_quant(w):
    gamma = w.abs().mean().clamp(min=1e-5)
    return (w / gamma).round().clamp(-1, 1) * gamma


def absmax_fake_quant(x):
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def ste(x, q):
    """Forward q(x), backward identity: round and clip pass the gradient through unchanged."""
    return x + (q(x) - x).detach()


def bitlinear(x, w, quantize=True):
    if quantize:
        x, w = ste(x, absmax_fake_quant), ste(w, absmean_fake_quant)
    return x @ w.T


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x, cos, sin):
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rope_tables(T, head_dim, theta, dtype):
    """transformers' table: inv_freq and the angle in float32; cos/sin rounded to float32, then widened."""
    inv_freq = (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1).double()
    return angle.cos().float().to(dtype), angle.sin().float().to(dtype)


def attention(q, k, v):
    B, T, H, HD = q.shape
    groups = H // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = qh @ kh.transpose(-1, -2) * HD ** -0.5
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2)


def loss_fn(config, params, ids, targets, quantize=True, reduction="mean"):
    """params: name -> torch tensor; ids, targets: torch int64 [B, T] (targets -1 ignored)."""
    B, T = ids.shape
    H, KVH, HD, eps = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps
    emb = params["model.embed_tokens.weight"]
    cos, sin = rope_tables(T, HD, config.rope_theta, emb.dtype)
    h = emb[ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, params[p + "input_layernorm.weight"], eps)
        q = rope(bitlinear(x, params[p + "self_attn.q_proj.weight"], quantize).reshape(B, T, H, HD), cos, sin)
        k = rope(bitlinear(x, params[p + "self_attn.k_proj.weight"], quantize).reshape(B, T, KVH, HD), cos, sin)
        v = bitlinear(x, params[p + "self_attn.v_proj.weight"], quantize).reshape(B, T, KVH, HD)
        a = rms_norm(attention(q, k, v).reshape(B, T, H * HD), params[p + "self_attn.attn_sub_norm.weight"], eps)
        h = h + bitlinear(a, params[p + "self_attn.o_proj.weight"], quantize)
        x = rms_norm(h, params[p + "post_attention_layernorm.weight"], eps)
        m = F.relu(bitlinear(x, params[p + "mlp.gate_proj.weight"], quantize)) ** 2 * \
            bitlinear(x, params[p + "mlp.up_proj.weight"], quantize)
        m = rms_norm(m, params[p + "mlp.ffn_sub_norm.weight"], eps)
        h = h + bitlinear(m, params[p + "mlp.down_proj.weight"], quantize)
    logits = rms_norm(h, params["model.norm.weight"], eps) @ emb.T
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction=reduction)
