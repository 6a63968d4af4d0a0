"""refbitnet's model against Hugging Face transformers' BitNetForCausalLM, layer by layer.

Each case is a random tiny model written in the release layout by transformers' own tools
(``pack_weights``, bf16 safetensors, the release quantization_config; see _tiny_bitnet.py), loaded by
refbitnet from the directory and by transformers with ``from_pretrained(dir, dtype=float32,
attn_implementation="eager")``, so its projections are AutoBitLinear (fake-quant numerics).

Bounds (relative to the largest |value| of the reference tensor):

- TIGHT = 1e-5 while no int8 activation code differs. Both sides evaluate the same float32
  formulas; they differ only in summation order (matmuls, means) and in cos/sin/exp rounding, a few
  ulps (u = 6e-8) per op. Observed: at most 4e-7 over all cases.
- A code flips when a value x*s lands within that rounding noise of a half-integer (we count them at
  the four quantizer inputs of every layer and print the count). A flipped code moves one activation
  by 1/s = max|x|/127; in these random, untrained layers the change then grows from layer to layer.
  After the first flip we check LOOSE = 5e-2 (observed worst: 1.8e-2 on these seeds) and print
  the count, which is the real finding: it says where and why the two numerics part.
- Single BitLinear, same input (teacher forcing): codes are identical (0 flips, asserted) and the
  outputs obey the float32 dot-product error bound (see test_bitlinear_int_vs_autobitlinear).
"""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import refbitnet  # noqa: E402
from refbitnet.quant import absmax_int8  # noqa: E402

from _tiny_bitnet import (QUANTIZER_SITES, TINY_CONFIGS, check_bitlinear_against_autobitlinear,  # noqa: E402
                          load_transformers, run_transformers, use_integer_bitlinear, write_release_checkpoint)

TIGHT = 1e-5
LOOSE = 5e-2
CASES = [(name, seed) for name in TINY_CONFIGS for seed in (0, 1, 2)]   # gqa-0, mha-0, mha-2 show flips
PROMPT_LEN = 32
_built = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-seed{s}" for n, s in CASES])
def case(request, tmp_path_factory):
    name, seed = request.param
    if request.param not in _built:
        directory = tmp_path_factory.mktemp(f"{name}-{seed}")
        codes = write_release_checkpoint(str(directory), TINY_CONFIGS[name], seed)
        ids = np.random.default_rng(100 + seed).integers(0, TINY_CONFIGS[name]["vocab_size"], PROMPT_LEN)
        _built[request.param] = dict(name=name, seed=seed, dir=str(directory), codes=codes, ids=ids,
                                     sizes=TINY_CONFIGS[name], hf=load_transformers(str(directory)))
    return _built[request.param]


def _flips(ours_trace, ref, layer):
    """Number of int8 activation codes that differ at each quantizer input of a layer."""
    count = 0
    for module, trace_name in QUANTIZER_SITES:
        a, _ = absmax_int8(ours_trace[f"layers.{layer}.{trace_name}"])
        b, _ = absmax_int8(ref[f"layers.{layer}.{module}"])
        count += int((a != b).sum())
    return count


def _compare_free_running(label, ours_logits, trace, ref_logits, ref, n_layers):
    """Print per-layer max diffs and flips; assert TIGHT until the first flip, LOOSE after it."""
    flipped = 0
    for i in range(n_layers):
        flipped += _flips(trace, ref, i)
        want = ref[f"layers.{i}.out"]
        diff = float(np.abs(trace[f"layers.{i}.out"] - want).max())
        rel = diff / float(np.abs(want).max())
        bound = TIGHT if flipped == 0 else LOOSE
        print(f"{label} layer {i}: max|diff| = {diff:.3e} (relative {rel:.1e}), int8 codes flipped so far: "
              f"{flipped}, bound {bound:g}")
        assert rel <= bound, f"{label}: layer {i} hidden state differs by {rel:.2e} (relative) > {bound}"
    rel = float(np.abs(ours_logits - ref_logits).max() / np.abs(ref_logits).max())
    bound = TIGHT if flipped == 0 else LOOSE
    print(f"{label} logits: relative max|diff| = {rel:.1e}, bound {bound:g}")
    assert rel <= bound
    return flipped


# ----------------------------------------------------------------------------------- fake-quant numerics

def test_fake_quant_every_layer_matches_transformers(case):
    model = refbitnet.load(case["dir"], numerics="fake-quant")
    assert model.source_format == "packed"
    ref_logits, ref = run_transformers(case["hf"], case["ids"])
    trace = {}
    logits = model.forward(case["ids"], trace=trace)
    _compare_free_running(f"[{case['name']} seed {case['seed']}] fake-quant", logits, trace, ref_logits, ref,
                          case["sizes"]["num_hidden_layers"])


def test_fake_quant_greedy_32_tokens_identical(case):
    """Greedy continuation of 32 tokens: refbitnet with its KV cache, transformers recomputing from scratch."""
    model = refbitnet.load(case["dir"], numerics="fake-quant")
    prompt = list(case["ids"][:8])
    cache = model.new_cache(len(prompt) + 32)
    logits = model.forward(prompt, cache=cache)
    ours, margins = [], []
    for _ in range(32):
        top2 = np.sort(logits[-1])[-2:]
        margins.append(float(top2[1] - top2[0]))
        ours.append(int(np.argmax(logits[-1])))
        logits = model.forward([ours[-1]], cache=cache)
    theirs, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(32):
            next_id = int(case["hf"](torch.tensor([seq])).logits[0, -1].argmax())
            theirs.append(next_id)
            seq.append(next_id)
    print(f"[{case['name']} seed {case['seed']}] greedy: smallest top-1 margin {min(margins):.3e}")
    assert ours == theirs


# ----------------------------------------------------------------------------------- int numerics

def test_bitlinear_int_vs_autobitlinear_teacher_forced(case):
    """Every projection fed transformers' own input to it: identical int8 codes, and outputs within the
    float32 dot-product error bound (see _tiny_bitnet.check_bitlinear_against_autobitlinear)."""
    model = refbitnet.load(case["dir"], numerics="int")
    _, ref = run_transformers(case["hf"], case["ids"])
    worst = 0.0
    for i, layer in enumerate(model.weights.layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            proj = getattr(layer, module.split(".")[1])
            worst = max(worst, check_bitlinear_against_autobitlinear(
                case["hf"].model.layers[i].get_submodule(module), ref[f"layers.{i}.{module}"], proj.codes(),
                proj.weight_scale, f"layer {i} {module}"))
    print(f"[{case['name']} seed {case['seed']}] BitLinear int vs AutoBitLinear: 0 codes differ, largest "
          f"error {worst:.2f} of the bound")


def test_int_layers_teacher_forced(case):
    """numerics="int", each layer fed transformers' input to that layer; counts flipped int8 codes.

    Inside a layer the int and fake-quant epilogues differ by rounding (previous test), so a value near
    a half-integer at the next quantizer (o_proj, gate/up, down inputs) can round the other way.
    """
    model = refbitnet.load(case["dir"], numerics="int")
    _, ref = run_transformers(case["hf"], case["ids"])
    label = f"[{case['name']} seed {case['seed']}] int, teacher-forced"
    for i in range(case["sizes"]["num_hidden_layers"]):
        trace = {}
        out = model.forward_layer(i, ref[f"layers.{i}.in"], trace=trace)
        flipped = _flips(trace, ref, i)
        want = ref[f"layers.{i}.out"]
        rel = float(np.abs(out - want).max() / np.abs(want).max())
        bound = TIGHT if flipped == 0 else LOOSE
        print(f"{label} layer {i}: relative max|diff| = {rel:.1e}, int8 codes flipped in this layer: {flipped}")
        assert rel <= bound


def test_int_whole_model_vs_integer_torch_twin(case, tmp_path):
    """numerics="int" end to end against transformers' model with every BitLinear in the integer form."""
    twin = use_integer_bitlinear(load_transformers(case["dir"]))
    model = refbitnet.load(case["dir"], numerics="int")
    ref_logits, ref = run_transformers(twin, case["ids"])
    trace = {}
    logits = model.forward(case["ids"], trace=trace)
    _compare_free_running(f"[{case['name']} seed {case['seed']}] int vs integer twin", logits, trace,
                          ref_logits, ref, case["sizes"]["num_hidden_layers"])
