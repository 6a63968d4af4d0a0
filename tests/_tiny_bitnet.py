"""Tiny random BitNet checkpoints in the release layout, written with transformers' own tools.

``write_release_checkpoint`` draws random ternary codes, packs them with
``transformers.integrations.bitnet.pack_weights``, stores every float tensor as torch bfloat16 with
``safetensors.torch.save_file`` and the config with ``BitNetConfig.save_pretrained``, with the
release's quantization_config. So these files are what transformers itself would write for a 2B4T-
like model, and refbitnet reading them tests its loader against an independent writer.
"""

import numpy as np

RELEASE_QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                               "quantization_mode": "offline"}

# Three tiny shapes (and a fourth with H == KVH): a GQA one, one with a single KV head, and one whose
# sizes are not powers of two. All widths are multiples of 8 (the Numba kernels read 8 codes a word).
TINY_CONFIGS = {
    "gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256),
    "one_kv_head": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=1, vocab_size=200),
    "odd_sizes": dict(hidden_size=48, intermediate_size=120, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, vocab_size=333),
    "mha": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                num_key_value_heads=5, vocab_size=150),
}


def hf_config(sizes, max_position_embeddings=128):
    import transformers
    return transformers.BitNetConfig(
        **sizes, max_position_embeddings=max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, hidden_act="relu2",
        quantization_config=dict(RELEASE_QUANTIZATION_CONFIG))


def projection_shapes(c):
    hd = c["hidden_size"] // c["num_attention_heads"]
    d, f, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}


def random_release_tensors(sizes, seed):
    """torch tensors of a random model in the release layout: {name: tensor}, plus the codes {name: int8 ndarray}."""
    import torch
    from transformers.integrations.bitnet import pack_weights
    rng = np.random.default_rng(seed)
    d, f, v = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"]

    def bf16(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": bf16(rng.standard_normal((v, d))),
               "model.norm.weight": bf16(1 + 0.2 * rng.standard_normal(d))}
    codes = {}
    for i in range(sizes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, width in (("input_layernorm", d), ("post_attention_layernorm", d),
                            ("self_attn.attn_sub_norm", d), ("mlp.ffn_sub_norm", f)):
            tensors[p + norm + ".weight"] = bf16(1 + 0.2 * rng.standard_normal(width))
        for proj, (n, k) in projection_shapes(sizes).items():
            c = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, k))
            codes[p + proj + ".weight"] = c
            tensors[p + proj + ".weight"] = pack_weights(torch.from_numpy(c.copy()))          # [N/4, K] uint8
            # a scale of about 1/sqrt(K) keeps every projection's output of order one
            tensors[p + proj + ".weight_scale"] = bf16([rng.uniform(0.6, 1.4) / np.sqrt(k)])
    return tensors, codes


def write_release_checkpoint(directory, sizes, seed, max_position_embeddings=128):
    """Write config.json + model.safetensors (release layout, bf16) for a random model; returns the codes."""
    from safetensors.torch import save_file
    tensors, codes = random_release_tensors(sizes, seed)
    hf_config(sizes, max_position_embeddings).save_pretrained(directory)
    save_file({k: t.contiguous() for k, t in tensors.items()}, f"{directory}/model.safetensors",
              metadata={"format": "pt"})
    return codes


def load_transformers(directory):
    """transformers' BitNetForCausalLM from the directory: float32, eager attention, AutoBitLinear layers."""
    import torch
    import transformers
    model = transformers.BitNetForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           attn_implementation="eager")
    # transformers 5.x leaves the non-quantized tensors (embedding, norms) in the file's bf16 even with
    # dtype=float32, and then F.linear fails on bf16 x float32. Widening bf16 to float32 is exact.
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
    return model.eval()


# The four places where a layer quantizes activations, as (transformers module, refbitnet trace name of its input).
QUANTIZER_SITES = (("self_attn.q_proj", "input_layernorm"), ("self_attn.o_proj", "attn_sub_norm"),
                   ("mlp.gate_proj", "post_attention_layernorm"), ("mlp.down_proj", "ffn_sub_norm"))


def run_transformers(model, ids):
    """Forward ids [S] through a transformers BitNet model, recording each decoder layer's input and output
    and the input of every BitLinear: returns (logits [S, V], {"layers.{i}.in"/".out"/".{module}": [S, ...]})."""
    import torch
    captured, hooks = {}, []

    def keep(key, value):
        captured[key] = value[0].detach().float().numpy().copy()

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: keep(f"layers.{i}.in", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: keep(f"layers.{i}.out", out[0] if isinstance(out, tuple) else out)))
        for name, module in layer.named_modules():
            if type(module).__name__ in ("AutoBitLinear", "BitLinear"):          # release and legacy classes
                hooks.append(module.register_forward_hook(
                    lambda mod, args, out, key=f"layers.{i}.{name}": keep(key, args[0])))
    hooks.append(model.model.norm.register_forward_hook(lambda mod, args, out: keep("norm", out)))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, captured


def use_integer_bitlinear(model):
    """Turn a transformers BitNet model into the integer-form twin: every AutoBitLinear computes
    xq = round(x * s) (s = 127 / max|x|), acc = xq @ W.T exactly (float64 holds these integers exactly),
    y = (acc as float32 / s) * weight_scale -- the same float32 epilogue as refbitnet's numerics="int"."""
    import types

    import torch

    def integer_forward(self, x):
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)        # [..., 1] float32
        xq = (x * s).round().clamp(-128, 127)                                 # [..., K] integers
        acc = xq.double() @ self.weight.double().T                            # [..., N] exact
        return (acc.float() / s) * self.weight_scale

    for module in model.modules():
        if type(module).__name__ == "AutoBitLinear":
            assert not module.online_quant and module.bias is None and module.rms_norm is None
            module.forward = types.MethodType(integer_forward, module)
    return model


def numpy_release_tensors(sizes, seed, tie_word_embeddings=True):
    """The same kind of random model as random_release_tensors, built with NumPy only (refbitnet's pack_hf):
    {name: ndarray} with bf16 tensors as uint16 bits, for tests that need no torch."""
    from refbitnet.bf16 import f32_to_bf16
    from refbitnet.layouts import pack_hf
    rng = np.random.default_rng(seed)
    d, f, v = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"]
    t = {"model.embed_tokens.weight": f32_to_bf16(rng.standard_normal((v, d)).astype(np.float32)),
         "model.norm.weight": f32_to_bf16((1 + 0.2 * rng.standard_normal(d)).astype(np.float32))}
    if not tie_word_embeddings:
        t["lm_head.weight"] = f32_to_bf16(rng.standard_normal((v, d)).astype(np.float32))
    for i in range(sizes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, width in (("input_layernorm", d), ("post_attention_layernorm", d),
                            ("self_attn.attn_sub_norm", d), ("mlp.ffn_sub_norm", f)):
            t[p + norm + ".weight"] = f32_to_bf16((1 + 0.2 * rng.standard_normal(width)).astype(np.float32))
        for proj, (n, k) in projection_shapes(sizes).items():
            t[p + proj + ".weight"] = pack_hf(rng.integers(-1, 2, size=(n, k)).astype(np.int8))
            t[p + proj + ".weight_scale"] = f32_to_bf16(np.array([rng.uniform(0.6, 1.4) / np.sqrt(k)], np.float32))
    return t


def numpy_config(sizes, max_position_embeddings=128, **kw):
    from refbitnet.config import Config
    return Config(**sizes, max_position_embeddings=max_position_embeddings, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, **kw)


def check_bitlinear_against_autobitlinear(hf_module, x, codes, weight_scale, what):
    """Feed x [S, K] to transformers' AutoBitLinear and to refbitnet's integer BitLinear: assert identical
    int8 codes and outputs within the float32 dot-product error bound.

    ours   = fl(fl(acc / s) * ws), acc exact            -> relative error <= 2u
    theirs = fl(fl(sum_k fl(xq_k / s) * w_k) * ws)       -> error <= ws * gamma_(K+1) * sum_k |xq_k / s|
    with u = 2**-24 and gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, §3.1).
    Returns the largest |ours - theirs| as a fraction of the bound.
    """
    import torch

    from refbitnet.model import bitlinear
    from refbitnet.quant import absmax_int8
    u = 2.0 ** -24
    xt = torch.from_numpy(np.ascontiguousarray(x))
    with torch.no_grad():
        theirs = hf_module(xt).numpy()
        hf_xq = (xt * (127.0 / xt.abs().amax(-1, keepdim=True).clamp(min=1e-5))).round().clamp(-128, 127).numpy()
    xq, s = absmax_int8(x)
    assert np.array_equal(xq, hf_xq.astype(np.int8)), f"{what}: int8 codes differ"
    ours = bitlinear(x, codes, weight_scale, "int")
    k = x.shape[1]
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    bound = weight_scale * gamma * (np.abs(xq).astype(np.float64) / s[:, None]).sum(-1, keepdims=True) \
        + 4 * u * np.abs(theirs)
    err = np.abs(ours.astype(np.float64) - theirs)
    assert (err <= bound).all(), f"{what}: outside the error bound by {(err - bound).max():.3e}"
    return float((err / bound).max())
