"""Config: HF key names, the 2B4T preset, round trips through transformers' BitNetConfig, clear errors."""

import json

import pytest

from refbitnet.config import BITNET_2B4T, Config
from refbitnet.errors import ConfigError

# config.json of microsoft/bitnet-b1.58-2B-4T as SPEC §1 lists it
RELEASE_CONFIG = {
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": 2560,
    "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20, "num_key_value_heads": 5,
    "vocab_size": 128256, "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
    "hidden_act": "relu2", "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16", "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}


def test_release_config_reads_as_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASE_CONFIG))
    cfg = Config.from_json(path)
    assert cfg == BITNET_2B4T
    assert (cfg.head_dim, cfg.kv_groups, cfg.eos_ids) == (128, 4, [128001])
    assert cfg.num_parameters == 2_412_820_480


def test_to_dict_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = BITNET_2B4T.to_dict()
    assert d["tie_word_embeddings"] is True and d["max_position_embeddings"] == 4096   # the SPEC §1 trap
    hf = transformers.BitNetConfig(**d)
    assert hf.tie_word_embeddings is True and hf.max_position_embeddings == 4096
    assert hf.rope_parameters["rope_theta"] == 500000.0
    hf.save_pretrained(tmp_path)                     # transformers 5 writes rope_parameters, not rope_theta
    assert Config.from_json(tmp_path / "config.json") == BITNET_2B4T
    # what transformers' defaults would have given: the trap, visible
    default = transformers.BitNetConfig()
    assert default.tie_word_embeddings is False and default.max_position_embeddings == 2048


def test_eos_list_and_missing_optional_keys():
    d = {k: RELEASE_CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")}
    d["eos_token_id"] = [128001, 128009]
    cfg = Config.from_dict(d)
    assert cfg.eos_ids == [128001, 128009] and cfg.tie_word_embeddings is True and cfg.rope_theta == 500000.0


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, r"architectures: expected one of \['BitNetForCausalLM', "
                                              r"'BitnetForCausalLM'\], found \['LlamaForCausalLM'\]"),
    ({"model_type": "llama"}, "model_type: expected 'bitnet', found 'llama'"),
    ({"num_attention_heads": 24}, "hidden_size 2560 is not divisible by num_attention_heads 24"),
    ({"num_key_value_heads": 3}, "num_attention_heads 20 is not divisible by num_key_value_heads 3"),
    ({"hidden_act": "silu"}, "hidden_act: expected 'relu2'.*found 'silu'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling: expected null"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type: expected 'default', found 'yarn'"),
    ({"vocab_size": 0}, "vocab_size: expected a positive integer, found 0"),
    ({"hidden_size": "2560"}, "hidden_size: expected a positive integer, found '2560'"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps: expected a positive number"),
    ({"head_dim": 64}, "head_dim: expected hidden_size / num_attention_heads = 128, found 64"),
    ({"intermediate_size": 6910}, "intermediate_size = 6910 must be a multiple of 4"),
    ({"eos_token_id": 200000}, r"eos_token_id: expected token ids in \[0, 128256\)"),
    ({"attention_bias": True}, "attention_bias: expected false"),
])
def test_bad_config_names_key_expected_found(change, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**RELEASE_CONFIG, **change}))
    with pytest.raises(ConfigError, match=message) as err:
        Config.from_json(path)
    assert str(path) in str(err.value)


def test_missing_keys_and_bad_files(tmp_path):
    d = dict(RELEASE_CONFIG)
    del d["num_key_value_heads"], d["vocab_size"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['num_key_value_heads', 'vocab_size'\]"):
        Config.from_dict(d)
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="expected JSON"):
        Config.from_json(path)
    with pytest.raises(ConfigError, match="file not found"):
        Config.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        Config.from_dict([1, 2])


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="num_key_value_heads 7"):
        BITNET_2B4T.replace(num_key_value_heads=7)
    assert BITNET_2B4T.replace(num_hidden_layers=2).num_hidden_layers == 2
