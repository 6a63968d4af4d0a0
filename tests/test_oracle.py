"""refbitnet.testing used the way another project's test suite would use it.

The "other implementation" here is a small NumPy BitNet forward written from docs/SPEC.md alone: it
reads a GGUF file's bytes, decodes I2_S with its own decoder, and runs its own integer BitLinear, norms,
RoPE and attention. Switches reproduce bugs real runtimes shipped: SiLU instead of ReLU² in the FFN, dividing
by the weight scale instead of multiplying, and reading I2_S with a 64-element block (ARM builds).
The oracle must pass the correct implementation and name the layer and tensor where each bug starts.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import testing as oracle
from refbitnet.config import Config
from refbitnet.errors import RefBitNetError

CONFIG = Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, bos_token_id=0,
                eos_token_id=1)
IDS = np.array([0, 5, 77, 301, 12, 12, 9, 250, 33, 1])


def latent_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
              "mlp.down_proj": (d, f)}
    w = {"model.embed_tokens.weight": rng.standard_normal((config.vocab_size, d)).astype(np.float32) * 0.5,
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(d).astype(np.float32)}
    for i in range(config.num_hidden_layers):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = (rng.standard_normal(shape) * rng.uniform(0.02, 0.2)
                                                    ).astype(np.float32)
        for name, width in (("input_layernorm", d), ("post_attention_layernorm", d),
                            ("self_attn.attn_sub_norm", d), ("mlp.ffn_sub_norm", f)):
            w[f"model.layers.{i}.{name}.weight"] = 1 + 0.1 * rng.standard_normal(width).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint directory and its I2_S GGUF export."""
    from refbitnet.checkpoint import save_checkpoint
    from refbitnet.gguf import save_gguf
    d = tmp_path_factory.mktemp("oracle")
    save_checkpoint(d / "ckpt", CONFIG, latent_weights(CONFIG))
    save_gguf(d / "ckpt", d / "model-i2_s.gguf", layout="i2_s")
    return {"checkpoint": d / "ckpt", "i2_s": d / "model-i2_s.gguf"}


@pytest.fixture(scope="module")
def reference(files):
    model = oracle.load_reference_model(files["i2_s"])
    return oracle.reference_activations(model, IDS)


# ================================================================ the other implementation (docs/SPEC.md only)
def decode_i2s(raw, n, k, block=128):
    """I2_S as docs/SPEC.md §5 describes it, with the block size a parameter: element j of a block is in
    byte j % (block/4) of the block at shift 6 - 2*(j // (block/4)). bitnet.cpp x86 uses 128."""
    group = block // 4
    body = np.asarray(raw[: n * k // 4]).reshape(-1, group)                   # [blocks, block/4]
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8)
    codes = ((body[:, None, :] >> shifts[None, :, None]) & 3).astype(np.int8) - 1  # [blocks, 4, block/4]
    scale = np.frombuffer(np.asarray(raw[n * k // 4: n * k // 4 + 4]).tobytes(), "<f4")[0]
    return codes.reshape(n, k), np.float32(scale)


class OtherImplementation:
    """A from-docs/SPEC.md BitNet forward over a bitnet.cpp I2_S GGUF file, with bug switches."""

    def __init__(self, path, ffn="relu2", scale_op="multiply", i2s_block=128, qkv_scale_thirds=False):
        from refbitnet.gguf import read_gguf
        gf = read_gguf(path)             # any GGUF reader would do; we only use its byte ranges
        a = gf.metadata["general.architecture"]
        self.eps = float(gf.metadata[f"{a}.attention.layer_norm_rms_epsilon"])
        self.theta = float(gf.metadata[f"{a}.rope.freq_base"])
        self.n_heads = int(gf.metadata[f"{a}.attention.head_count"])
        self.n_kv = int(gf.metadata[f"{a}.attention.head_count_kv"])
        self.n_layers = int(gf.metadata[f"{a}.block_count"])
        self.ffn, self.scale_op, self.qkv_scale_thirds = ffn, scale_op, qkv_scale_thirds
        self.t = {}
        for name, info in gf.tensors.items():
            raw = gf.raw(name)
            if info.type_id == 36:
                self.t[name] = decode_i2s(raw, *info.shape, block=i2s_block)
            elif info.type_id == 1:
                self.t[name] = raw.view("<f2").reshape(info.shape).astype(np.float32)
            else:
                self.t[name] = raw.view("<f4").reshape(info.shape)

    def rms_norm(self, x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps)))

    def bitlinear(self, x, name, codes=None, scale=None):
        if codes is None:
            codes, scale = self.t[name]
        absmax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
        s = np.float32(127) / absmax
        xq = np.clip(np.round(x * s), -128, 127).astype(np.int64)
        acc = (xq @ codes.T.astype(np.int64)).astype(np.float32)
        return (acc / s) / scale if self.scale_op == "divide" else (acc / s) * scale

    def qkv(self, x, b):
        """q, k, v as one fused matrix with a scale per row (how GPU kernels do it). The bug: the three
        scales indexed by equal thirds of the rows instead of the q / k / v row counts."""
        parts = [self.t[b + f"attn_{p}.weight"] for p in "qkv"]
        codes = np.concatenate([c for c, _ in parts])                                # [Q + 2 KV, D]
        rows = [c.shape[0] for c, _ in parts]
        if self.qkv_scale_thirds:
            third = codes.shape[0] // 3
            rows = [third, third, codes.shape[0] - 2 * third]
        scale = np.concatenate([np.full(r, s, np.float32) for r, (_, s) in zip(rows, parts)])
        y = self.bitlinear(x, None, codes, scale)
        q_rows, kv_rows = parts[0][0].shape[0], parts[1][0].shape[0]
        return y[:, :q_rows], y[:, q_rows:q_rows + kv_rows], y[:, q_rows + kv_rows:]

    def rope(self, x, pos):
        hd = x.shape[-1]
        inv = 1.0 / self.theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
        ang = pos[:, None].astype(np.float32) * inv[None, :]                     # [S, HD/2]
        cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :].astype(np.float32)
        sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :].astype(np.float32)
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    def forward(self, ids):
        t, trace = self.t, {}
        s_len = len(ids)
        h = t["token_embd.weight"][ids]
        trace["embed"] = h
        pos = np.arange(s_len)
        for i in range(self.n_layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            x = self.rms_norm(h, t[b + "attn_norm.weight"])
            q, k, v = self.qkv(x, b)
            q, k, v = q.reshape(s_len, self.n_heads, -1), k.reshape(s_len, self.n_kv, -1), v.reshape(s_len, self.n_kv, -1)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = self.n_heads // self.n_kv
            kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)          # [S, H, HD]
            scores = np.einsum("shd,thd->hst", q, kk) / np.float32(np.sqrt(q.shape[-1]))
            scores = scores + np.triu(np.full((s_len, s_len), -np.inf, np.float32), 1)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w = w / w.sum(-1, keepdims=True)
            attn = np.einsum("hst,thd->shd", w, vv).reshape(s_len, -1)
            attn_n = self.rms_norm(attn, t[b + "attn_sub_norm.weight"])
            o = self.bitlinear(attn_n, b + "attn_output.weight")
            h_attn = h + o
            x2 = self.rms_norm(h_attn, t[b + "ffn_norm.weight"])
            gate = self.bitlinear(x2, b + "ffn_gate.weight")
            up = self.bitlinear(x2, b + "ffn_up.weight")
            act = (np.maximum(gate, 0) ** 2 if self.ffn == "relu2" else gate / (1 + np.exp(-gate))) * up
            act_n = self.rms_norm(act, t[b + "ffn_sub_norm.weight"])
            down = self.bitlinear(act_n, b + "ffn_down.weight")
            h = h_attn + down
            trace.update({p + "input_layernorm": x, p + "q": q, p + "k": k, p + "v": v, p + "attn": attn,
                          p + "attn_sub_norm": attn_n, p + "o_proj": o, p + "resid_attn": h_attn,
                          p + "post_attention_layernorm": x2, p + "gate": gate, p + "up": up,
                          p + "ffn_act": act, p + "ffn_sub_norm": act_n, p + "down_proj": down,
                          p + "out": h})
        trace["norm"] = self.rms_norm(h, t["output_norm.weight"])
        trace["logits"] = trace["norm"] @ t["token_embd.weight"].T
        return trace


# Tolerances for the whole-model comparison: both sides use the integer BitLinear, so differences start
# at float32 rounding in norms, RoPE, softmax (1e-6 relative); one such rounding can move an int8
# activation code by 1 at the next quantizer, changing a BitLinear output by about scale / s (here
# <= 2e-3 absolute). The bugs below produce errors of the size of the values (>= 1e-1).
TOL = dict(atol=5e-3, rtol=1e-3)


# ================================================================ whole-model tests
def test_correct_implementation_passes(files, reference):
    lines = []
    other = OtherImplementation(files["i2_s"]).forward(IDS)
    report = oracle.assert_activations_match(reference, other, print_fn=lines.append, **TOL)
    assert report.ok and report.first_divergence is None and report.skipped == []
    assert len(report.checks) == len(oracle.trace_names(CONFIG.num_hidden_layers))
    assert all(line.startswith("TENSOR OK, maxdiff = ") for line in lines[:-1])
    assert lines[-1] == f"all {len(report.checks)} tensors OK"


@pytest.mark.parametrize("bug, first_layer, first_tensor", [
    (dict(ffn="silu"), 0, "ffn_act"),                 # bitnet.cpp's FFN with SiLU
    (dict(scale_op="divide"), 0, "q"),                # converters that divide by weight_scale
    (dict(i2s_block=64), 0, "q"),                     # ARM I2_S kernels: 64-element blocks
    (dict(qkv_scale_thirds=True), 0, "q"),            # GPU qkv kernel: scales by equal thirds of rows
])
def test_bug_is_located(files, reference, bug, first_layer, first_tensor):
    other = OtherImplementation(files["i2_s"], **bug).forward(IDS)
    lines = []
    report = oracle.compare_activations(reference, other, print_fn=lines.append, **TOL)
    first = report.first_divergence
    assert first is not None and (first.layer, first.tensor) == (first_layer, first_tensor)
    assert first.max_diff > 100 * TOL["atol"]
    # every tensor before it passed, and the printed report says where
    before = report.checks[:report.checks.index(first)]
    assert before and all(c.ok for c in before)
    assert any(line.startswith("TENSOR NOT OK, maxdiff = ") and line.split()[6] == first.name for line in lines)
    assert f"layer {first_layer}, tensor '{first_tensor}'" in lines[-1]
    with pytest.raises(AssertionError, match=f"layer {first_layer}, tensor '{first_tensor}'"):
        oracle.assert_activations_match(reference, other, print_fn=None, **TOL)


def test_subset_of_tensors_and_flattened_shapes(files, reference):
    """A runtime that exposes only some tensors, q as [S, H*HD]: the rest are listed as skipped."""
    other = OtherImplementation(files["i2_s"]).forward(IDS)
    subset = {"layers.1.q": other["layers.1.q"].reshape(len(IDS), -1), "logits": other["logits"]}
    report = oracle.compare_activations(reference, subset, print_fn=None, **TOL)
    assert report.ok and [c.name for c in report.checks] == ["layers.1.q", "logits"]
    assert len(report.skipped) == len(reference) - 2


def test_reference_from_checkpoint_equals_reference_from_gguf(files, reference):
    from_dir = oracle.reference_activations(files["checkpoint"], IDS)
    assert list(from_dir) == list(reference) == oracle.trace_names(CONFIG.num_hidden_layers)
    for name in reference:
        assert np.array_equal(from_dir[name], reference[name]), name
    assert reference["layers.0.q"].shape == (len(IDS), 4, 64)
    assert reference["layers.1.ffn_act"].shape == (len(IDS), 512)
    assert reference["logits"].shape == (len(IDS), CONFIG.vocab_size)


def test_comparison_edge_cases(reference):
    ref = {"a": np.ones((2, 3), np.float32), "layers.4.gate": np.zeros(3, np.float32)}
    with pytest.raises(RefBitNetError, match="unknown tensor name"):
        oracle.compare_activations(ref, {"layers.0.qq": np.ones(3)}, print_fn=None)
    with pytest.raises(RefBitNetError, match=r"expected the candidate's shape \[2, 3\].*found \[5\]"):
        oracle.compare_tensor("a", ref["a"], np.ones(5))                      # never reshaped silently
    bad_shape = oracle.compare_activations(ref, {"a": np.ones(6)}, print_fn=None).checks[0]
    assert not bad_shape.ok and bad_shape.max_diff == float("inf") and "shape [6]" in bad_shape.detail
    nan = oracle.compare_tensor("a", ref["a"], np.array([[1, np.nan, 1], [1, 1, 1]]))
    assert not nan.ok and "at (0, 1): reference 1, candidate nan" in nan.detail
    exact = oracle.compare_tensor("a", ref["a"], ref["a"] + 1e-7, atol=0, rtol=0)
    assert not exact.ok and exact.mode == "exact" and exact.n_differ == 6
    loose = oracle.compare_activations(ref, {"layers.4.gate": np.full(3, 0.5)}, print_fn=None,
                                       tolerances={"gate": (1.0, 0.0)})
    assert loose.ok and loose.checks[0].layer == 4 and loose.checks[0].tensor == "gate"
    with pytest.raises(AssertionError, match="no tensor compared"):
        oracle.assert_activations_match(ref, {}, print_fn=None)


# ================================================================ BitLinear and layouts
@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 512)).astype(np.float32) * 0.1
    codes, gamma = oracle.quantize_weights(w)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    return x, codes, gamma


def test_reference_bitlinear_is_the_same_in_every_layout(weight):
    x, codes, gamma = weight
    base = oracle.reference_bitlinear(x, codes, "codes", weight_scale=gamma)
    xq, s = oracle.quantize_activations(x)
    assert np.array_equal(base.xq, xq) and np.array_equal(base.s, s)
    assert base.acc.dtype == np.int32
    assert np.array_equal(base.acc, (xq.astype(np.int64) @ codes.T.astype(np.int64)).astype(np.int32))
    assert np.array_equal(base.y, (base.acc.astype(np.float32) / s[:, None]) * gamma)
    for layout in ("hf", "kernel", "i2_s", "tq2_0", "tq1_0", "bitnet_gpu"):
        data = oracle.encode(codes, layout, scale=gamma)
        back, stored = oracle.decode(data, layout, shape=codes.shape)
        assert np.array_equal(back, codes), layout
        if layout == "i2_s":
            assert stored == gamma
        elif layout.startswith("tq"):
            assert stored == np.float32(np.float16(gamma))
        else:
            assert stored is None
        out = oracle.reference_bitlinear(x, data, layout, shape=codes.shape, weight_scale=gamma)
        for field in ("y", "acc", "xq", "s"):
            assert np.array_equal(getattr(out, field), getattr(base, field)), (layout, field)
    fq = oracle.reference_bitlinear(x, codes, weight_scale=gamma, numerics="fake-quant")
    assert np.array_equal(fq.acc, base.acc)
    assert np.allclose(fq.y, base.y, rtol=1e-5, atol=1e-5)


def test_kernel_accumulators_checked_exactly(weight):
    """How a kernel project checks its int32 accumulators: exact equality (atol = rtol = 0), and how a
    kernel reading I2_S with 64-element blocks shows up."""
    x, codes, gamma = weight
    data = oracle.encode(codes, "i2_s", scale=gamma)
    ref = oracle.reference_bitlinear(x, data, "i2_s", shape=codes.shape)

    def kernel(block):                     # the project's kernel: decode, then int matmul
        c, scale = decode_i2s(data, *codes.shape, block=block)
        acc = ref.xq.astype(np.int32) @ c.T.astype(np.int32)
        return acc, (acc.astype(np.float32) / ref.s[:, None]) * scale

    acc, y = kernel(128)
    assert oracle.compare_tensor("acc", ref.acc, acc, atol=0, rtol=0).ok
    assert oracle.compare_tensor("y", ref.y, y, atol=0, rtol=0).ok
    acc64, _ = kernel(64)
    check = oracle.compare_tensor("acc", ref.acc, acc64, atol=0, rtol=0)
    assert not check.ok and check.max_diff >= 1


def test_layout_argument_errors(weight):
    _, codes, gamma = weight
    with pytest.raises(RefBitNetError, match="layout"):
        oracle.encode(codes, "q4_0", scale=gamma)
    with pytest.raises(RefBitNetError, match="scale="):
        oracle.encode(codes, "i2_s")
    with pytest.raises(RefBitNetError, match="shape="):
        oracle.decode(oracle.encode(codes, "tq2_0", scale=gamma), "tq2_0")
    with pytest.raises(RefBitNetError, match="weight_scale="):
        oracle.reference_bitlinear(np.ones((1, 512), np.float32), codes, "codes")
    with pytest.raises(RefBitNetError, match="expected 8224 bytes"):
        oracle.decode(oracle.encode(codes, "i2_s", scale=gamma)[:-1], "i2_s", shape=codes.shape)


@settings(max_examples=30)
@given(n_tiles=st.integers(1, 3), k_blocks=st.integers(1, 2), seed=st.integers(0, 2**32 - 1),
       zero_rows=st.booleans())
def test_every_layout_round_trips_and_gives_the_same_bitlinear(n_tiles, k_blocks, seed, zero_rows):
    rng = np.random.default_rng(seed)
    n, k = 16 * n_tiles, 256 * k_blocks
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    if zero_rows:
        codes[: n // 2] = 0                       # all-zero TQ blocks carry d = 0
    gamma = np.float32(rng.uniform(0.01, 4.0))
    x = (rng.standard_normal((2, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    base = oracle.reference_bitlinear(x, codes, weight_scale=gamma)
    for layout in oracle.LAYOUTS:
        data = oracle.encode(codes, layout, scale=gamma)
        assert np.array_equal(oracle.decode(data, layout, shape=(n, k))[0], codes), layout
        out = oracle.reference_bitlinear(x, data, layout, shape=(n, k), weight_scale=gamma)
        assert np.array_equal(out.acc, base.acc) and np.array_equal(out.y, base.y), layout


def gpu_pack_as_microsoft_writes_it(codes):
    """microsoft/BitNet gpu/pack_weight.py (convert_weight_int8_to_int2), transcribed step by step
    with plain loops: +2, 16x32 tile permutation, 4 codes per byte, interleave within each int32."""
    w = codes.astype(np.int64) + 2
    n, k = w.shape
    perm = np.zeros((n // 16, k // 32, 16, 32), np.int64)
    for bi in range(n // 16):
        for bj in range(k // 32):
            for ii in range(16):
                for jj in range(32):
                    t = ii * 2 + jj // 16
                    row, col = (t // 16) * 8 + t % 8, jj % 16 + 16 * ((t % 16) // 8)
                    perm[bi, bj, ii, jj] = w[bi * 16 + row, bj * 32 + col]
    comp = np.zeros((n // 16, k // 32, 16, 8), np.int64)
    for j in range(8):
        for b in range(4):
            comp[..., j] |= perm[..., 4 * j + b] << (2 * b)
    q = comp.astype(np.uint8).view("<i4")
    new = np.zeros_like(q)
    for i in range(4):
        for j in range(4):
            offset = i * 4 + j
            shift = (offset % 4) * 8 + (offset // 4) * 2
            new |= ((q >> (2 * offset)) & 3) << shift
    return new.view(np.int8).reshape(n, k // 4)


def test_bitnet_gpu_layout_matches_microsofts_packer():
    rng = np.random.default_rng(11)
    codes = rng.integers(-1, 2, size=(32, 64)).astype(np.int8)
    packed = oracle.encode(codes, "bitnet_gpu")
    assert packed.dtype == np.int8 and packed.shape == (32, 16)
    assert np.array_equal(packed, gpu_pack_as_microsoft_writes_it(codes))
    assert np.array_equal(oracle.decode(packed, "bitnet_gpu")[0], codes)
    with pytest.raises(RefBitNetError, match="field equal to 0"):
        oracle.decode(np.zeros((32, 16), np.int8), "bitnet_gpu")
    with pytest.raises(RefBitNetError, match="divisible by 16"):
        oracle.encode(codes[:8], "bitnet_gpu")


# The README's "Use refbitnet as an oracle" example, verbatim; test_readme_example runs it as an outside
# project would (its own pytest process) against this module's tiny I2_S file.
README_EXAMPLE = r'''# tests/test_against_refbitnet.py -- in your project
import os

import numpy as np
import pytest

from refbitnet import testing as oracle

MODEL = os.environ.get("BITNET_MODEL", "models/ggml-model-i2_s.gguf")  # a .gguf file or a HF model directory
IDS = np.array([128000, 791, 4062, 14198, 39935, 35308, 927])


@pytest.fixture(scope="session")
def reference():
    if not os.path.exists(MODEL):
        pytest.skip(f"no model at {MODEL}")
    model = oracle.load_reference_model(MODEL)             # load once per session
    ids = IDS % model.config.vocab_size
    return model, ids, oracle.reference_activations(model, ids)


def my_forward(model_path, ids):
    """YOUR runtime: return the intermediates it exposes under refbitnet's names (any subset of
    oracle.trace_names(num_layers)). Stand-in so this file runs as is: refbitnet itself."""
    return oracle.reference_activations(oracle.load_reference_model(model_path), ids)


def my_kernel_acc(xq, packed, n, k):
    """YOUR int8 x ternary kernel on an I2_S tensor -> int32 [S, N]. Stand-in: NumPy."""
    codes, _ = oracle.decode(packed, "i2_s", shape=(n, k))
    return xq.astype(np.int32) @ codes.T.astype(np.int32)


def test_forward_matches_refbitnet(reference):
    _, ids, ref = reference
    # prints "TENSOR OK, maxdiff = ..." per tensor; raises naming the first layer and tensor that diverges
    oracle.assert_activations_match(ref, my_forward(MODEL, ids), atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("n, k", [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)])
def test_kernel_is_bit_exact(n, k):
    rng = np.random.default_rng(n + k)
    codes, gamma = oracle.quantize_weights(rng.standard_normal((n, k)).astype(np.float32))
    packed = oracle.encode(codes, "i2_s", scale=gamma)                  # the bytes bitnet.cpp stores
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = oracle.reference_bitlinear(x, packed, "i2_s", shape=(n, k))   # .y .acc .xq .s
    acc = my_kernel_acc(ref.xq, packed, n, k)
    assert oracle.compare_tensor("acc", ref.acc, acc, atol=0, rtol=0).ok
    y = (acc.astype(np.float32) / ref.s[:, None]) * gamma                # multiply by the scale, never divide
    assert np.array_equal(y, ref.y)
'''


def test_readme_example(files, tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "test_against_refbitnet.py").write_text(README_EXAMPLE)
    env = dict(os.environ, BITNET_MODEL=str(files["i2_s"]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "test_against_refbitnet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "5 passed" in run.stdout


def test_missing_reference_model(tmp_path):
    from refbitnet.errors import CheckpointError, GGUFError
    with pytest.raises(GGUFError, match="file not found"):
        oracle.load_reference_model(tmp_path / "model.gguf")
    with pytest.raises(CheckpointError, match="expected a model directory"):
        oracle.reference_activations(tmp_path / "no-such-dir", IDS)
