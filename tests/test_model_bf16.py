"""numerics="transformers-bf16" (refbitnet.model_bf16) against transformers' BitNetForCausalLM in bf16.

Each case is a model in the release layout: 12 random tiny ones and one with 2B4T's widths
(tests/_tiny_bitnet.py: transformers' own pack_weights, bf16 safetensors), and the trained model shipped
in the package. transformers loads it with ``dtype=torch.bfloat16, attn_implementation="eager"`` (its
projections are offline AutoBitLinear) and runs it eagerly (TORCHDYNAMO_DISABLE=1); refbitnet loads it
with ``numerics="transformers-bf16"``.

What is bit-exact and what is not, and why:

- (a) every op without a sum (the RoPE tables and rotation, relu²·up, the residual adds, the
  attention scale) is bit-identical to transformers' own modules on the same bf16 inputs. RMSNorm and
  softmax, rounded to bf16, are bit-identical except where torch's float32 values and ours (a sum in
  another order; exp) lie on either side of a bf16 rounding boundary; counted and bounded.
- (b) each BitLinear fed transformers' own input: ActQuant is bit-exact (tests/test_numerics.py), the
  products in the bf16 matmul are exact, so only the float32 accumulator's summation order (torch's
  oneDNN kernel vs our BLAS) can differ, by far less than a bf16 ulp: an output can then differ by one
  step at each of the two roundings that follow (the sum's and the product with weight_scale).
- (c) each layer fed transformers' input hidden state: the only ops that mix tokens or sum in another
  order are the attention (softmax, p @ v), RMSNorm's mean and the BitLinear sums. A layer output row
  may differ only where one of those differed first; the test asserts that, and counts.
- (d) the whole model: the first such difference then travels (an int8 activation code one apart at
  the next quantizer moves a whole row), so logits are compared with the LOOSE bound of
  tests/test_model_vs_transformers.py and greedy tokens must agree.
- (e) the test can fail: the float32 integer path (numerics="int") is measurably further from
  transformers-bf16 than this is, and refbitnet.model's float64-evaluated inv_freq gives other cos/sin.
"""

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refbitnet  # noqa: E402
from refbitnet import model as model_f32  # noqa: E402
from refbitnet import model_bf16  # noqa: E402
from refbitnet.bitlinear import bitlinear_fake_quant  # noqa: E402
from refbitnet.errors import RefBitNetError  # noqa: E402
from refbitnet.layouts import unpack_hf  # noqa: E402
from refbitnet.quant import bf16_values as bf16  # noqa: E402

from _tiny_bitnet import TINY_CONFIGS, write_release_checkpoint  # noqa: E402

from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.bitnet import modeling_bitnet  # noqa: E402

PROMPT_LEN = 96
# 12 tiny random models; 2B4T's widths (D 2560, F 6912, 20 heads of 128, 5 KV heads, theta 500000) with
# 2 layers and a small vocabulary; and the trained model shipped in the package on a line of its corpus
WIDTHS_2B4T = dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=2, num_attention_heads=20,
                   num_key_value_heads=5, vocab_size=512)
CASES = [(name, seed) for name in TINY_CONFIGS for seed in (0, 1, 2)] + [("2b4t_widths", 0), ("shipped", 0)]
SHIPPED_PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the "
                  "sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with grief")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LOOSE = 5e-2          # tests/test_model_vs_transformers.py's bound once an int8 code has flipped
_built = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def bf16_ulps(a, b) -> np.ndarray:
    """Distance in bf16 steps between arrays of bf16 values (float32 holding them), elementwise (int64)."""
    def ordered(x):
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)       # monotone in the value; -0 == +0
    assert not (np.asarray(a, np.float32).view(np.uint32) & 0xFFFF).any(), "not bf16 values"
    return np.abs(ordered(a) - ordered(b)) >> 16


def load_hf_bf16(directory):
    model = transformers.BitNetForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                           attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    return model.eval()


def run_hf(model, ids):
    """Forward ids [S] recording, per layer i, "{i}.in" / "{i}.out" and the input and output of every
    leaf submodule ("{i}.<module>.in" / ".out", e.g. "0.self_attn.q_proj.in"): returns
    (logits [S, V], {name: float32 array of bf16 values})."""
    got, hooks = {}, []

    def keep(key, value):
        got[key] = (value[0] if isinstance(value, tuple) else value)[0].detach().float().numpy().copy()

    def keep_both(key, module, args, out):          # returns None: a hook's return value replaces the output
        keep(key + ".in", args[0])
        keep(key + ".out", out)

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: keep(f"{i}.in", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, args, out, i=i: keep(f"{i}.out", out)))
        for name, module in layer.named_modules():
            if name and not list(module.children()):       # the leaves: norms, projections, act_fn
                hooks.append(module.register_forward_hook(partial(keep_both, f"{i}.{name}")))
    hooks.append(model.model.norm.register_forward_hook(lambda m, args, out: keep("norm", out)))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, got


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def case(request, tmp_path_factory):
    name, seed = request.param
    if request.param not in _built:
        if name == "shipped":
            directory = str(Path(refbitnet.__file__).parent / "shipped")
            sizes = {k: v for k, v in json.loads(Path(directory, "config.json").read_text()).items()
                     if k in WIDTHS_2B4T}
            ids = np.array(refbitnet.load(directory, backend="numpy").tokenizer.encode(SHIPPED_PROMPT))
        else:
            directory = str(tmp_path_factory.mktemp(f"bf16-{name}-{seed}"))
            sizes = WIDTHS_2B4T if name == "2b4t_widths" else TINY_CONFIGS[name]
            write_release_checkpoint(directory, sizes, seed, max_position_embeddings=4096)
            if name == "2b4t_widths":
                config = json.loads(Path(directory, "config.json").read_text())
                Path(directory, "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
            ids = np.random.default_rng(100 + seed).integers(0, sizes["vocab_size"], PROMPT_LEN)
        hf = load_hf_bf16(directory)
        assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
        logits, got = run_hf(hf, ids)
        model = refbitnet.load(directory, numerics="transformers-bf16")
        _built[request.param] = dict(name=name, seed=seed, dir=directory, ids=ids, hf=hf, logits=logits,
                                     got=got, sizes=sizes, model=model)
    return _built[request.param]


# ============================================================================ (a) the ops

def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)


def test_ops_bit_exact_against_transformers_modules():
    """Each op without a sum, on the same bf16 inputs as transformers' own module or function."""
    rng = np.random.default_rng(0)
    with torch.no_grad():
        # RoPE: BitNetRotaryEmbedding's bf16 tables and apply_rotary_pos_emb, 2B4T's head_dim and theta
        for head_dim, theta in ((128, 500000.0), (16, 10000.0), (12, 10000.0)):
            heads = dict(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2)
            cfg = transformers.BitNetConfig(**heads, rope_theta=theta, max_position_embeddings=4096)
            positions = np.arange(4096)
            q = bf16(rng.standard_normal((4096, 4, head_dim)) * 3)
            cos_t, sin_t = modeling_bitnet.BitNetRotaryEmbedding(cfg)(_t(q), torch.as_tensor(positions)[None])
            cos, sin = model_bf16.rope_tables_bf16(positions, head_dim, theta)
            assert np.array_equal(cos, cos_t[0].float().numpy())
            assert np.array_equal(sin, sin_t[0].float().numpy())
            q_heads_first = _t(q).transpose(0, 1)[None]                                 # [1, heads, S, HD]
            q_t, _ = modeling_bitnet.apply_rotary_pos_emb(q_heads_first, q_heads_first, cos_t, sin_t)
            assert np.array_equal(model_bf16.rope(q, cos, sin), q_t[0].transpose(0, 1).float().numpy())
        # ReLU² (ACT2FN["relu2"]) times up, the residual add, the attention scale of head_dim 128
        g, u = bf16(rng.standard_normal((256, 6912)) * 4), bf16(rng.standard_normal((256, 6912)) * 4)
        assert np.array_equal(bf16(model_bf16.relu2(g) * u), (ACT2FN["relu2"](_t(g)) * _t(u)).float().numpy())
        a, b = bf16(rng.standard_normal((256, 2560)) * 10), bf16(rng.standard_normal((256, 2560)) * 0.3)
        assert np.array_equal(bf16(a + b), (_t(a) + _t(b)).float().numpy())
        scores = bf16(rng.standard_normal((2000, 300)) * 40)
        scaled = (_t(scores) * 128 ** -0.5).float().numpy()
        assert np.array_equal(bf16(scores * np.float32(128 ** -0.5)), scaled)


def test_rms_norm_differs_only_across_a_bf16_rounding_boundary():
    """BitNetRMSNorm (bf16) vs model_bf16.rms_norm on 100,000 rows of width 64 and 5,000 of 2560 (2B4T's D).

    The mean of x² is a float32 sum whose order differs (torch's vectorized cascade, NumPy's pairwise):
    the variances differ by a few float32 ulps in about 40% of rows (each order is within (N - 1) ulps
    of the exact sum: Higham's bound for positive terms), so x * rsqrt(var + eps) moves by as many
    ulps, about 2**-16 of a bf16 step each. Rounded to bf16 that changes an element only where it sits
    that close to a rounding boundary: then by one step, and the product with the bf16 weight, rounded
    again, by at most one step more. Measured: 15 of 6,400,000 outputs at width 64 and 62 of 12,800,000
    at width 2560 differ, by at most 2 steps."""
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for width in (64, 2560):
            x = bf16(rng.standard_normal((100000 if width == 64 else 5000, width))
                     * rng.uniform(0.01, 50, (100000 if width == 64 else 5000, 1)))
            w = bf16(1 + 0.2 * rng.standard_normal(width))
            norm = modeling_bitnet.BitNetRMSNorm(width, eps=1e-5).to(torch.bfloat16)
            norm.weight.copy_(_t(w))
            var_torch = torch.from_numpy(x).pow(2).mean(-1).numpy()
            var_ours = np.mean(x * x, axis=-1, dtype=np.float32)
            assert (np.abs(var_ours.view(np.int32) - var_torch.view(np.int32)) <= width - 1).all()
            steps = bf16_ulps(model_bf16.rms_norm(x, w, 1e-5), norm(_t(x)).float().numpy())
            print(f"rms_norm width {width}: variance differs in {np.mean(var_ours != var_torch):.2f} of rows; "
                  f"{int((steps != 0).sum())} of {steps.size} outputs differ, by at most {steps.max()} step")
            assert steps.max() <= 2 and (steps != 0).sum() <= 1e-4 * steps.size


def test_softmax_cast_differs_only_across_a_bf16_rounding_boundary():
    """torch.softmax(x, dtype=float32).to(bf16) (eager_attention_forward) vs bf16(model_bf16.softmax(x)).

    Both compute exp(x - max) * fl(1 / sum) in float32, but exp is evaluated differently (torch's
    vectorized float32 exp, ours float64 rounded once: each within 1 ulp) and the sum of T terms in
    another order (each order within (T - 1) ulps of the exact sum: Higham's bound for positive terms),
    so the float32 values differ by at most about T + 4 ulps (measured: 12 for T = 300). Rounded to bf16
    (2**16 float32 ulps apart) they are equal unless the two float32 values lie on either side of a bf16
    rounding boundary: then they differ by exactly one bf16 step."""
    rng = np.random.default_rng(1)
    scores = bf16(rng.standard_normal((4000, 300)) * 3)                            # T = 300 keys
    theirs32 = torch.softmax(_t(scores), -1, dtype=torch.float32).numpy()
    ours32 = model_bf16.softmax(scores)
    f32_ulps = np.abs(ours32.view(np.int32).astype(np.int64) - theirs32.view(np.int32))   # all positive values
    assert f32_ulps.max() <= scores.shape[1] + 4, f32_ulps.max()
    steps = bf16_ulps(bf16(ours32), torch.softmax(_t(scores), -1, dtype=torch.float32).to(torch.bfloat16)
                      .float().numpy())
    differ = steps != 0
    print(f"softmax: float32 values differ by up to {f32_ulps.max()} ulps; after rounding to bf16 "
          f"{int(differ.sum())} of {steps.size} differ, each by {steps.max()} step")
    assert steps.max() <= 1 and differ.sum() <= 1e-4 * steps.size
    # where they differ, a bf16 rounding boundary (a float32 whose low 16 bits are 0x8000) lies between
    lo, hi = np.minimum(ours32, theirs32)[differ], np.maximum(ours32, theirs32)[differ]
    boundary = ((lo.view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    assert ((lo <= boundary) & (boundary <= hi)).all()


def test_float32_path_rope_tables_are_not_transformers():
    """The test above can fail: refbitnet.model.rope_tables evaluates inv_freq in float64 and rounds once;
    transformers computes it in float32 ops, and the two differ by an ulp in 18 of 2B4T's 64 entries,
    which moves bf16 cos/sin at large positions. model_bf16 follows transformers."""
    cfg = transformers.BitNetConfig(hidden_size=2560, num_attention_heads=20, num_key_value_heads=5,
                                    rope_theta=500000.0, max_position_embeddings=4096)
    inv_ref = modeling_bitnet.BitNetRotaryEmbedding(cfg).inv_freq.numpy()
    angle = np.arange(4096, dtype=np.float32)[:, None] * inv_ref[None, :]
    ours_cos = model_bf16.rope_tables_bf16(np.arange(4096), 128, 500000.0)[0][:, :64]
    assert np.array_equal(ours_cos, bf16(np.cos(angle.astype(np.float64)).astype(np.float32)))
    f32_cos = bf16(model_f32.rope_tables(np.arange(4096), 128, 500000.0)[0][:, :64])
    print(f"float32 path's bf16 cos differs from transformers' in {int((f32_cos != ours_cos).sum())} of "
          f"{ours_cos.size}")
    assert (f32_cos != ours_cos).sum() > 0


# ============================================================================ (b) each BitLinear

def test_each_bitlinear_on_transformers_input(case):
    """Every projection of every layer fed transformers' own input to it (teacher forcing)."""
    got, model = case["got"], case["model"]
    differ = total = worst = 0
    for i, layer in enumerate(model.weights.layers):
        for module in PROJECTIONS:
            p = layer.ternary(module.split(".")[1])
            ours = bitlinear_fake_quant(got[f"{i}.{module}.in"], p.codes(), p.weight_scale, "transformers-bf16")
            steps = bf16_ulps(ours, got[f"{i}.{module}.out"])
            differ, total = differ + int((steps != 0).sum()), total + steps.size
            worst = max(worst, int(steps.max()))
    print(f"[{case['name']} seed {case['seed']}] BitLinear on transformers' input: {differ} of {total} outputs "
          f"differ, by at most {worst} bf16 steps")
    assert worst <= 2                      # one step at each rounding after the float32 sum (module docstring)
    # another order moves a float32 sum by a few ulps, about 2**-16 of a bf16 step each, so it crosses a
    # rounding boundary in about that fraction of outputs (measured: none of 6.07 M); 1e-3 leaves room
    # for sums that cancel (their ulps are the partial sums', larger than the result's)
    assert differ <= 1e-3 * total


# ============================================================================ (c) layer by layer

def _rows(mask):
    return set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist())


NORMS = ("input_layernorm", "self_attn.attn_sub_norm", "post_attention_layernorm", "mlp.ffn_sub_norm")
WEIGHT_OF = {"input_layernorm": "input_layernorm", "self_attn.attn_sub_norm": "attn_sub_norm",
             "post_attention_layernorm": "post_attention_layernorm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
AFTER_ATTENTION = ("self_attn.attn_sub_norm", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.ffn_sub_norm", "mlp.down_proj")


def test_each_layer_on_transformers_input(case):
    """Each layer fed transformers' input hidden state: a row of its output differs only where a sum in
    another order differed first; every other row is bit-identical.

    The sums: RMSNorm's mean, each BitLinear's accumulator (checked on transformers' own input to that
    module: "teacher-forced"), and the attention (softmax, p @ v). Everything after the attention works on
    each token's row alone, and the output is h + o + down with h transformers' own input, so a differing
    output row must be a row where the attention output (in this run) differed, or where a norm or
    BitLinear after the attention differs on transformers' own input. A difference before the attention
    (input_layernorm, q/k/v) can only reach the output through the attention output, which is compared.
    The size of a difference, once an int8 activation code has flipped, is the LOOSE bound's."""
    got, model, label = case["got"], case["model"], f"[{case['name']} seed {case['seed']}]"
    eps = model.config.rms_norm_eps
    for i, layer in enumerate(model.weights.layers):
        trace = {}
        out = model.forward_layer(i, got[f"{i}.in"], trace=trace)
        want = got[f"{i}.out"]
        steps = bf16_ulps(out, want)
        teacher_forced = {}
        for module in NORMS:
            y = model_bf16.rms_norm(got[f"{i}.{module}.in"], getattr(layer, WEIGHT_OF[module]), eps)
            teacher_forced[module] = _rows(y != got[f"{i}.{module}.out"])
        for module in PROJECTIONS:
            p = layer.ternary(module.split(".")[1])
            y = bitlinear_fake_quant(got[f"{i}.{module}.in"], p.codes(), p.weight_scale, "transformers-bf16")
            teacher_forced[module] = _rows(y != got[f"{i}.{module}.out"])
        attn_steps = bf16_ulps(trace[f"layers.{i}.attn"], got[f"{i}.self_attn.attn_sub_norm.in"])
        sources = _rows(attn_steps != 0).union(*(teacher_forced[m] for m in AFTER_ATTENTION))
        rel = float(np.abs(out - want).max() / np.abs(want).max())
        print(f"{label} layer {i}: {np.mean(steps == 0):.4f} of the output bit-identical, max {steps.max()} "
              f"bf16 steps (relative {rel:.1e}); rows differing {sorted(_rows(steps != 0))}; first causes: "
              f"attention output rows {sorted(_rows(attn_steps != 0))} (max {attn_steps.max()} steps), "
              f"teacher-forced { {m: sorted(r) for m, r in teacher_forced.items() if r} }")
        assert _rows(steps != 0) <= sources, f"layer {i}: rows differ with no earlier summation-order cause"
        assert rel <= LOOSE


# ============================================================================ (d) the whole model

def test_whole_model_logits_and_greedy_tokens(case):
    model, label = case["model"], f"[{case['name']} seed {case['seed']}]"
    trace = {}
    logits = model.forward(case["ids"], trace=trace)
    steps = bf16_ulps(logits, case["logits"])
    rel = float(np.abs(logits - case["logits"]).max() / np.abs(case["logits"]).max())
    same_argmax = np.mean(logits.argmax(-1) == case["logits"].argmax(-1))
    print(f"{label} logits: {np.mean(steps == 0):.4f} bit-identical, max {steps.max()} bf16 steps, relative "
          f"max|diff| {rel:.1e}; same argmax at {same_argmax:.3f} of positions")
    assert rel <= LOOSE
    # greedy decoding: ours with the KV cache, transformers recomputing the whole sequence
    prompt = list(case["ids"][:8])
    new = 4 if case["name"] == "2b4t_widths" else 24       # a step there takes a second (unpacking 2 layers)
    cache = model.new_cache(len(prompt) + new)
    step_logits = model.forward(prompt, cache=cache)
    ours = []
    for _ in range(new):
        ours.append(int(np.argmax(step_logits[-1])))
        step_logits = model.forward([ours[-1]], cache=cache)
    theirs, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(new):
            theirs.append(int(case["hf"](torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(theirs[-1])
    assert ours == theirs


def test_decode_with_cache_equals_prefill(case):
    """One token at a time with the cache gives the prefill's bits: each query's attention is computed on
    its own, with the same shapes, and the BitLinear matmul sums each row in an order that does not
    depend on how many rows there are (true of the BLAS here; asserted, so a BLAS where it is not shows)."""
    model = case["model"]
    ids = case["ids"][:8] if case["name"] == "2b4t_widths" else case["ids"][:24]
    split = len(ids) - 4 if case["name"] == "2b4t_widths" else 16
    full = model.forward(ids)
    cache = model.new_cache(len(ids))
    steps = [model.forward(ids[:split], cache=cache)] + [model.forward([t], cache=cache) for t in ids[split:]]
    assert np.array_equal(np.concatenate(steps), full)
    assert np.array_equal(model.forward(ids, last_only=True), full[-1:])


# ============================================================================ (e) the test can fail

def test_float32_path_is_further_from_transformers_bf16(case):
    """numerics="int" (float32 throughout, rounded to bf16 here to be fair) is measurably further from
    transformers' bf16 model than numerics="transformers-bf16", layer by layer and in the logits."""
    got, ours_model = case["got"], case["model"]
    int_model = refbitnet.load(case["dir"], numerics="int", backend="numpy")
    for i in range(case["sizes"]["num_hidden_layers"]):
        want = got[f"{i}.out"]
        ours = np.mean(ours_model.forward_layer(i, got[f"{i}.in"]) == want)
        f32 = np.mean(bf16(int_model.forward_layer(i, got[f"{i}.in"])) == want)
        # measured: ours >= 0.9914 (at most one token row of 96 differs), the float32 path 0.11 to 0.31
        assert ours > 0.97 and f32 < 0.5, (i, ours, f32)
    ref = case["logits"]
    ours = ours_model.forward(case["ids"])
    f32 = int_model.forward(case["ids"])
    d_ours, d_f32 = np.abs(ours - ref), np.abs(f32 - ref)
    print(f"[{case['name']} seed {case['seed']}] logits: mean |diff| {d_ours.mean():.2e} (transformers-bf16) "
          f"vs {d_f32.mean():.2e} (int); bit-identical {np.mean(d_ours == 0):.3f} vs "
          f"{np.mean(bf16(f32) == ref):.3f}")
    assert d_ours.mean() < 0.5 * d_f32.mean()
    assert np.mean(d_ours == 0) > np.mean(bf16(f32) == ref) + 0.2


# ============================================================================ the legacy BitLinear

def test_legacy_bitlinear_checkpoint(tmp_path):
    """A divide-convention checkpoint (no linear_class): transformers builds its legacy BitLinear (bf16
    activation_quant, F.linear of the integer codes, y / (weight_scale * s)), and
    numerics="transformers-legacy-bf16" follows it; numerics="transformers-bf16" is refused for it."""
    from test_scale_convention import write_divide_checkpoint
    sizes = TINY_CONFIGS["gqa"]
    write_divide_checkpoint(tmp_path, sizes, 0, {"quant_method": "bitnet"})
    hf = load_hf_bf16(str(tmp_path))
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "BitLinear"
    ids = np.random.default_rng(7).integers(0, sizes["vocab_size"], 64)
    ref_logits, got = run_hf(hf, ids)
    model = refbitnet.load(tmp_path, numerics="transformers-legacy-bf16")
    trace = {}
    logits = model.forward(ids, trace=trace)
    for i in range(sizes["num_hidden_layers"]):
        assert np.array_equal(model.forward_layer(i, got[f"{i}.in"]), got[f"{i}.out"]), i
        # the legacy sums are of integers (exact in float32), so only attention orders differ: none here
        assert np.array_equal(trace[f"layers.{i}.out"], got[f"{i}.out"]), i
    steps = bf16_ulps(logits, ref_logits)
    print(f"legacy: logits {np.mean(steps == 0):.4f} bit-identical, max {steps.max()} bf16 step (LM head sums)")
    assert steps.max() <= 1
    with pytest.raises(RefBitNetError, match="use numerics='transformers-legacy-bf16'"):
        refbitnet.load(tmp_path, numerics="transformers-bf16")


# ============================================================================ the door

def test_the_door(case):
    model = case["model"]
    assert model.backend == "numpy" and model.numerics == "transformers-bf16"
    with pytest.raises(RefBitNetError, match="runs on backend='numpy' only"):
        refbitnet.load(case["dir"], numerics="transformers-bf16", backend="numba")
    with pytest.raises(RefBitNetError, match="trace_integers"):
        model.forward(case["ids"][:4], trace={}, trace_integers=True)
    with pytest.raises(RefBitNetError, match="use numerics='transformers-bf16'"):
        refbitnet.load(case["dir"], numerics="transformers-legacy-bf16")
    trace_bf16, trace_f32 = {}, {}
    model.forward(case["ids"][:4], trace=trace_bf16)
    from refbitnet import testing as oracle               # the oracle API passes the numerics through
    reference = oracle.reference_activations(case["dir"], case["ids"][:4], numerics="transformers-bf16")
    assert reference.keys() == trace_bf16.keys()
    assert all(np.array_equal(reference[k], trace_bf16[k]) for k in reference)
    refbitnet.load(case["dir"], numerics="int", backend="numpy").forward(case["ids"][:4], trace=trace_f32)
    assert trace_bf16.keys() == trace_f32.keys()
    for name, value in trace_bf16.items():        # every intermediate is a bf16 value
        assert not (value.view(np.uint32) & 0xFFFF).any(), name


def test_bf16_master_is_refused(tmp_path):
    """transformers quantizes a bf16 master online (WeightQuant) from weights refbitnet does not keep."""
    sizes = TINY_CONFIGS["mha"]
    write_release_checkpoint(str(tmp_path), sizes, 0)
    master = refbitnet.load(tmp_path, numerics="int", backend="numpy")
    tensors = dict(master.release_tensors())
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        w = name[: -len("weight_scale")] + "weight"
        tensors[w] = unpack_hf(tensors[w]).astype(np.float32) * tensors.pop(name)[0]
    with pytest.raises(RefBitNetError, match="bf16-master"):
        refbitnet.Model(master.config, tensors, numerics="transformers-bf16")
    same = refbitnet.Model(master.config, tensors, numerics="int", backend="numpy")
    assert same.source_format == "bf16-master"
