"""Write a random checkpoint with the exact shapes, dtypes and names of BitNet b1.58 2B4T (not a test).

    python benchmarks/make_random_2b4t.py OUT_DIR [--layers 30] [--seed 0]

The packed release layout (SPEC §4): 30 layers of uint8 [N/4, K] projections with a bf16 weight_scale [1],
bf16 norms, a bf16 tied embedding [128256, 2560]; config.json from refbitnet.config.BITNET_2B4T with the
release quantization_config. About 1.18 GB. The values are random (codes uniform over {-1, 0, +1}, the
embedding N(0, 0.02), norms near 1, weight_scale about 1/sqrt(K)), so the text it generates is noise; speed and memory are what it is for.
Tensors are produced one at a time while the file is written, so writing needs little memory.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refbitnet.bf16 import f32_to_bf16  # noqa: E402
from refbitnet.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, write_safetensors  # noqa: E402
from refbitnet.config import BITNET_2B4T, RELEASE_QUANTIZATION_CONFIG  # noqa: E402


def random_packed(rng, rows, cols):
    """uint8 [rows, cols] whose four 2-bit fields are uniform over the codes {0, 1, 2} (never 3)."""
    fields = rng.integers(0, 3, (4, rows, cols), dtype=np.uint8)                   # [4, rows, cols]
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def entries_for(config, seed):
    """(name, safetensors dtype, shape, producer) for every tensor of the config, producers lazy."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj": (q_rows, d), "self_attn.k_proj": (kv_rows, d), "self_attn.v_proj": (kv_rows, d),
              "self_attn.o_proj": (d, q_rows), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    entries = []

    def table():
        rng = np.random.default_rng(seed)
        for r0 in range(0, v, 8192):                                               # 8192 rows at a time
            rows = min(8192, v - r0)
            yield f32_to_bf16((rng.standard_normal((rows, d)) * 0.02).astype(np.float32))

    entries.append(("model.embed_tokens.weight", "BF16", (v, d), table))
    for i in range(config.num_hidden_layers):
        rng = np.random.default_rng([seed, i])
        for norm, size in (("input_layernorm", d), ("post_attention_layernorm", d),
                           ("self_attn.attn_sub_norm", d), ("mlp.ffn_sub_norm", f)):
            values = f32_to_bf16((1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))
            entries.append((f"model.layers.{i}.{norm}.weight", "BF16", (size,), values))
        for proj, (n, k) in shapes.items():
            sub = np.random.default_rng([seed, i, len(entries)])
            entries.append((f"model.layers.{i}.{proj}.weight", "U8", (n // 4, k),
                            lambda sub=sub, n=n, k=k: random_packed(sub, n // 4, k)))
            # about 1/sqrt(K): each projection's output stays of order one, as in a trained model, so
            # attention scores are moderate and comparisons against other implementations are well conditioned
            scale = f32_to_bf16(np.array([rng.uniform(0.5, 1.5) / np.sqrt(k)], np.float32))
            entries.append((f"model.layers.{i}.{proj}.weight_scale", "BF16", (1,), scale))
    entries.append(("model.norm.weight", "BF16", (d,), f32_to_bf16(np.ones(d, np.float32))))
    return entries


def make_random_2b4t(out_dir, layers=None, seed=0):
    """Write config.json and model.safetensors of a random 2B4T-shaped model into out_dir; returns the Config."""
    config = BITNET_2B4T if layers is None else BITNET_2B4T.replace(num_hidden_layers=layers)
    config = config.replace(quantization_config=dict(RELEASE_QUANTIZATION_CONFIG))
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, SAFETENSORS_FILE), entries_for(config, seed))
    config.to_json(os.path.join(out_dir, CONFIG_FILE))
    return config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run (default: 30)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = time.perf_counter()
    config = make_random_2b4t(args.out_dir, args.layers, args.seed)
    size = os.path.getsize(os.path.join(args.out_dir, SAFETENSORS_FILE))
    print(f"wrote {args.out_dir}: {config.num_hidden_layers} layers, {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
