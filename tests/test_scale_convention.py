"""The weight_scale convention a packed checkpoint declares is the one refbitnet follows.

2B4T's files say ``linear_class: "autobitlinear"``: the output is multiplied by weight_scale. A
``quantization_config`` without ``linear_class``, or with ``"bitlinear"``, is what transformers runs with
its legacy ``BitLinear``, which divides by it (y = acc / (s * weight_scale); onebitllms writes such files
with scales 1 / mean|W|). refbitnet loads both, says which (``model.scale_convention``), and refuses a
packed file that declares neither. The divide files below are written with transformers' own packing
and compared with transformers' legacy BitLinear on the same directory, layer by layer, with the bounds
of test_model_vs_transformers: TIGHT until an int8 activation code flips (the two epilogues
acc / s * fl(1 / ws) and acc / fl(s * ws) differ by float rounding), LOOSE after.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import refbitnet  # noqa: E402
from refbitnet.errors import ConfigError  # noqa: E402

from _tiny_bitnet import TINY_CONFIGS, load_transformers, run_transformers, write_release_checkpoint  # noqa: E402
from test_model_vs_transformers import LOOSE, _compare_free_running  # noqa: E402


def write_divide_checkpoint(directory, sizes, seed, quantization_config):
    """A release-layout checkpoint whose weight_scale values are divisors (about sqrt(K)), under the given
    quantization_config (no linear_class, or "bitlinear")."""
    write_release_checkpoint(str(directory), sizes, seed)
    from safetensors.torch import load_file, save_file
    path = f"{directory}/model.safetensors"
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        tensors[name] = (1.0 / tensors[name].float()).to(torch.bfloat16)     # the output is divided by it
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("quantization_config", [
    {"quant_method": "bitnet"},
    {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
], ids=["no-linear_class", "bitlinear"])
@pytest.mark.parametrize("name", ["gqa", "odd_sizes"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_divide_convention_equals_transformers_legacy_bitlinear(tmp_path, quantization_config, name, backend):
    sizes = TINY_CONFIGS[name]
    write_divide_checkpoint(tmp_path, sizes, 0, quantization_config)
    hf = load_transformers(str(tmp_path))
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "BitLinear"      # the legacy, dividing class
    ids = np.random.default_rng(7).integers(0, sizes["vocab_size"], 24)
    ref_logits, ref = run_transformers(hf, ids)

    model = refbitnet.load(tmp_path, backend=backend)
    assert model.scale_convention == "divide"
    trace = {}
    logits = model.forward(ids, trace=trace)
    _compare_free_running(f"[{name}, {backend}] divide convention", logits, trace, ref_logits, ref,
                          sizes["num_hidden_layers"])

    # the test can fail: the same files read with the multiply convention are another model
    (tmp_path / "config.json").write_text(json.dumps({
        **json.loads((tmp_path / "config.json").read_text()),
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"}}))
    wrong = refbitnet.load(tmp_path, backend=backend)
    assert wrong.scale_convention == "multiply"
    assert np.abs(wrong.forward(ids) - ref_logits).max() > LOOSE * np.abs(ref_logits).max()


def test_multiply_convention_is_the_release(tmp_path):
    write_release_checkpoint(str(tmp_path), TINY_CONFIGS["gqa"], 0)
    assert refbitnet.load(tmp_path).scale_convention == "multiply"


def test_saving_a_divide_checkpoint_writes_the_multiply_release_layout(tmp_path):
    sizes = TINY_CONFIGS["gqa"]
    (tmp_path / "in").mkdir()
    write_divide_checkpoint(tmp_path / "in", sizes, 1, {"quant_method": "bitnet"})
    model = refbitnet.load(tmp_path / "in")
    refbitnet.save(model, tmp_path / "out")
    again = refbitnet.load(tmp_path / "out")
    assert again.scale_convention == "multiply"
    ids = np.arange(10)
    assert np.array_equal(again.forward(ids), model.forward(ids))


@pytest.mark.parametrize("quantization_config, match", [
    (None, "quantization_config: expected one"),
    ({"quant_method": "bitnet", "linear_class": "ternarylinear"}, "linear_class: expected 'autobitlinear'"),
])
def test_an_undeclared_or_unknown_convention_is_refused(tmp_path, quantization_config, match):
    write_release_checkpoint(str(tmp_path), TINY_CONFIGS["gqa"], 0)
    config = json.loads((tmp_path / "config.json").read_text())
    if quantization_config is None:
        del config["quantization_config"]
    else:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        refbitnet.load(tmp_path)
