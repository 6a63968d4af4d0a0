"""The whole BitNet b1.58 transformer for training: forward to the loss, and the backward to every parameter.

Parameters live in a flat dict under the released tensor names (``model.layers.{i}.self_attn.q_proj.weight``
holds the latent float [out, in] weight), so export is a rename-free call to
``refbitnet.checkpoint.save_checkpoint``. ``quantize=False`` trains the same architecture with plain
float linear layers (the baseline for "what do 1.58 bits cost").

Shapes: B sequences, T tokens each, D hidden, F intermediate, H heads, KVH kv heads, HD head dim, V vocab.
"""

import numpy as np

from . import ops
from ..model import rope_tables
from ..errors import ConfigError, RefBitNetError

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parameter_shapes(config) -> dict:
    """Released tensor name -> shape of the latent float parameter."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    KVD = config.num_key_value_heads * config.head_dim
    if not config.tie_word_embeddings:
        raise ConfigError("train: only tie_word_embeddings=True (the 2B4T layout) is supported, found False")
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (D, D),
            p + "self_attn.k_proj.weight": (KVD, D),
            p + "self_attn.v_proj.weight": (KVD, D),
            p + "self_attn.attn_sub_norm.weight": (D,),
            p + "self_attn.o_proj.weight": (D, D),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.ffn_sub_norm.weight": (F,),
            p + "mlp.down_proj.weight": (D, F),
        })
    shapes["model.norm.weight"] = (D,)
    return shapes


def init_parameters(config, seed: int, dtype=np.float32, std: float = 0.02) -> dict:
    """Normal(0, std) matrices, ones for every norm weight; deterministic in seed (names in sorted order)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(config).items():
        if len(shape) == 1:
            params[name] = np.ones(shape, dtype=dtype)
        else:
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def check_ids(ids, vocab_size, name="ids"):
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise RefBitNetError(f"{name}: expected a non-empty int array [B, T], found {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise RefBitNetError(f"{name}: expected token ids in [0, {vocab_size}), found {ids.min()}..{ids.max()}")
    return ids


def forward(config, params, ids, targets, *, quantize=True, reduction="mean"):
    """ids, targets int [B, T] (targets -1 = not counted) -> (loss, caches for backward)."""
    ids = check_ids(ids, config.vocab_size)
    B, T = ids.shape
    targets = np.asarray(targets)
    if targets.shape != ids.shape or not np.issubdtype(targets.dtype, np.integer):
        raise RefBitNetError(f"targets: expected an int array of the ids' shape {ids.shape}, "
                             f"found {targets.dtype} {targets.shape}")
    if targets.min() < -1 or targets.max() >= config.vocab_size:
        raise RefBitNetError(f"targets: expected token ids in [0, {config.vocab_size}) or -1 (not counted), "
                             f"found {targets.min()}..{targets.max()}")
    if T > config.max_position_embeddings:
        raise RefBitNetError(f"ids: sequence length {T} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
    H, KVH, HD, eps = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps
    dtype = params["model.embed_tokens.weight"].dtype
    cos, sin = (t.astype(dtype) for t in rope_tables(np.arange(T), HD, config.rope_theta))   # [T, HD] x2
    caches = {}

    h, caches["embed"] = ops.embedding_forward(ids, params["model.embed_tokens.weight"])   # [B, T, D]
    for i in range(config.num_hidden_layers):
        p, c = f"model.layers.{i}.", {}
        # attention block
        x, c["ln1"] = ops.rms_norm_forward(h, params[p + "input_layernorm.weight"], eps)   # [B, T, D]
        q, c["q"] = ops.bitlinear_forward(x, params[p + "self_attn.q_proj.weight"], quantize)   # [B, T, D]
        k, c["k"] = ops.bitlinear_forward(x, params[p + "self_attn.k_proj.weight"], quantize)   # [B, T, KVH*HD]
        v, c["v"] = ops.bitlinear_forward(x, params[p + "self_attn.v_proj.weight"], quantize)   # [B, T, KVH*HD]
        q, c["rope_q"] = ops.rope_forward(q.reshape(B, T, H, HD), cos, sin)     # [B, T, H, HD]
        k, c["rope_k"] = ops.rope_forward(k.reshape(B, T, KVH, HD), cos, sin)   # [B, T, KVH, HD]
        a, c["attn"] = ops.attention_forward(q, k, v.reshape(B, T, KVH, HD))    # [B, T, H, HD]
        a, c["attn_sub_norm"] = ops.rms_norm_forward(a.reshape(B, T, H * HD),
                                                     params[p + "self_attn.attn_sub_norm.weight"], eps)  # [B, T, D]
        o, c["o"] = ops.bitlinear_forward(a, params[p + "self_attn.o_proj.weight"], quantize)  # [B, T, D]
        h, _ = ops.residual_forward(h, o)
        # feed-forward block
        x, c["ln2"] = ops.rms_norm_forward(h, params[p + "post_attention_layernorm.weight"], eps)
        g, c["gate"] = ops.bitlinear_forward(x, params[p + "mlp.gate_proj.weight"], quantize)   # [B, T, F]
        u, c["up"] = ops.bitlinear_forward(x, params[p + "mlp.up_proj.weight"], quantize)       # [B, T, F]
        m, c["act"] = ops.relu2_gate_forward(g, u)                              # [B, T, F]
        m, c["ffn_sub_norm"] = ops.rms_norm_forward(m, params[p + "mlp.ffn_sub_norm.weight"], eps)
        d, c["down"] = ops.bitlinear_forward(m, params[p + "mlp.down_proj.weight"], quantize)   # [B, T, D]
        h, _ = ops.residual_forward(h, d)
        caches[i] = c
    x, caches["norm"] = ops.rms_norm_forward(h, params["model.norm.weight"], eps)         # [B, T, D]
    logits, caches["lm_head"] = ops.lm_head_forward(x, params["model.embed_tokens.weight"])  # [B, T, V]
    loss, caches["ce"] = ops.cross_entropy_forward(logits.reshape(B * T, -1),
                                                   targets.reshape(B * T), reduction)
    caches["shape"] = (B, T)
    return loss, caches


def backward(config, params, caches, dloss=1.0):
    """-> grads: dict name -> array like params (d loss / d latent weight, STE through the quantizers)."""
    B, T = caches["shape"]
    H, KVH, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    grads = {}
    dlogits = ops.cross_entropy_backward(dloss, caches["ce"]).reshape(B, T, -1)           # [B, T, V]
    dx, grads["model.embed_tokens.weight"] = ops.lm_head_backward(dlogits, caches["lm_head"])
    dh, grads["model.norm.weight"] = ops.rms_norm_backward(dx, caches["norm"])            # [B, T, D]
    for i in reversed(range(config.num_hidden_layers)):
        p, c = f"model.layers.{i}.", caches[i]
        # h = h + down(ffn_sub_norm(relu2(gate(x)) * up(x))),  x = post_attention_layernorm(h)
        dh_skip, dd = ops.residual_backward(dh, None)
        dm, grads[p + "mlp.down_proj.weight"] = ops.bitlinear_backward(dd, c["down"])
        dm, grads[p + "mlp.ffn_sub_norm.weight"] = ops.rms_norm_backward(dm, c["ffn_sub_norm"])
        dg, du = ops.relu2_gate_backward(dm, c["act"])
        dx_u, grads[p + "mlp.up_proj.weight"] = ops.bitlinear_backward(du, c["up"])
        dx_g, grads[p + "mlp.gate_proj.weight"] = ops.bitlinear_backward(dg, c["gate"])
        dx, grads[p + "post_attention_layernorm.weight"] = ops.rms_norm_backward(dx_u + dx_g, c["ln2"])
        dh = dh_skip + dx
        # h = h + o(attn_sub_norm(attention(rope(q(x)), rope(k(x)), v(x)))),  x = input_layernorm(h)
        dh_skip, do = ops.residual_backward(dh, None)
        da, grads[p + "self_attn.o_proj.weight"] = ops.bitlinear_backward(do, c["o"])
        da, grads[p + "self_attn.attn_sub_norm.weight"] = ops.rms_norm_backward(da, c["attn_sub_norm"])
        dq, dk, dv = ops.attention_backward(da.reshape(B, T, H, HD), c["attn"])
        dq = ops.rope_backward(dq, c["rope_q"]).reshape(B, T, H * HD)
        dk = ops.rope_backward(dk, c["rope_k"]).reshape(B, T, KVH * HD)
        dx_q, grads[p + "self_attn.q_proj.weight"] = ops.bitlinear_backward(dq, c["q"])
        dx_k, grads[p + "self_attn.k_proj.weight"] = ops.bitlinear_backward(dk, c["k"])
        dx_v, grads[p + "self_attn.v_proj.weight"] = ops.bitlinear_backward(dv.reshape(B, T, KVH * HD), c["v"])
        dx, grads[p + "input_layernorm.weight"] = ops.rms_norm_backward(dx_q + dx_k + dx_v, c["ln1"])
        dh = dh_skip + dx
    # h = embed[ids]; the tied table also got the LM head's gradient above
    grads["model.embed_tokens.weight"] = grads["model.embed_tokens.weight"] + \
        ops.embedding_backward(dh, caches["embed"])
    return grads
