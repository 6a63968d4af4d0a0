"""generation_config.json: the file's defaults as transformers reads them, arguments override them."""

import json
import os

import pytest

from refbitnet.errors import RefBitNetError
from refbitnet.generation_config import GenerationDefaults, Sampling

SHIPPED = os.path.join(os.path.dirname(__file__), os.pardir, "refbitnet", "shipped")


def write(tmp_path, data):
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    return GenerationDefaults.from_dir(tmp_path)


def test_no_file_is_greedy(tmp_path):
    d = GenerationDefaults.from_dir(tmp_path)
    assert d.source is None and d.sampling() == Sampling() and d.sampling().greedy
    assert d.resolve(temperature=0.7) == Sampling(temperature=0.7)          # refbitnet's own defaults: k, p off
    assert d.resolve(do_sample=True) == Sampling(temperature=1.0)


def test_file_with_sampling_and_hf_defaults_for_missing_keys(tmp_path):
    d = write(tmp_path, {"do_sample": True, "temperature": 0.6, "eos_token_id": [1, 7], "seed": 3,
                         "bos_token_id": 0, "transformers_version": "4.52"})
    assert d.eos_token_id == (1, 7)
    assert d.sampling() == Sampling(temperature=0.6, top_k=50, top_p=1.0, seed=3)    # top_k 50: transformers'


def test_transformers_reads_the_same_values(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128009]}
    d = write(tmp_path, data)
    hf = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    # transformers 5 leaves unset keys None and fills them at generate() from this table (top_k 50)
    fill = transformers.GenerationConfig._get_default_generation_params()
    hf_values = [getattr(hf, k) if getattr(hf, k) is not None else fill[k]
                 for k in ("do_sample", "temperature", "top_k", "top_p")]
    s = d.sampling()
    assert hf_values == [True, s.temperature, s.top_k, s.top_p]
    assert list(d.eos_token_id) == hf.eos_token_id


def test_do_sample_false_is_greedy_whatever_the_temperature(tmp_path):
    d = write(tmp_path, {"do_sample": False, "temperature": 0.9, "top_k": 5})
    assert d.sampling().greedy
    assert d.resolve(do_sample=True) == Sampling(temperature=0.9, top_k=5)      # the caller asked to sample
    assert d.resolve(temperature=0.5).temperature == 0.5


def test_arguments_override_the_file(tmp_path):
    d = write(tmp_path, {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 11,
                         "max_new_tokens": 64})
    assert d.resolve() == Sampling(0.8, 40, 0.95, 11, 64)
    assert d.resolve(temperature=0) == Sampling(0.0, 40, 0.95, 11, 64)          # greedy one flag away
    assert d.resolve(do_sample=False).greedy
    assert d.resolve(temperature=1.2, top_k=0, top_p=1.0, seed=5, max_new_tokens=8) == Sampling(1.2, 0, 1.0, 5, 8)


@pytest.mark.parametrize("data, match", [
    ({"temperature": -1}, "temperature: expected a number >= 0"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, r"top_p: expected a number in \(0, 1\]"),
    ({"top_k": 2.5}, "top_k: expected an int"),
    ({"do_sample": "yes"}, "do_sample: expected true or false"),
    ({"do_sample": 1}, "do_sample: expected true or false"),
    ({"top_k": True}, "top_k: expected an int"),
    ({"eos_token_id": ["</s>"]}, "eos_token_id: expected a token id"),
    ({"max_new_tokens": 0}, "max_new_tokens: expected an int >= 1"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_values_name_the_file_and_key(tmp_path, data, match):
    with pytest.raises(RefBitNetError, match=match):
        write(tmp_path, data)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{ nope")
    with pytest.raises(RefBitNetError, match="generation_config.json: not valid JSON"):
        GenerationDefaults.from_dir(tmp_path)


def test_save_round_trip(tmp_path):
    d = write(tmp_path, {"do_sample": True, "temperature": 0.7, "eos_token_id": [1, 2], "seed": 0})
    (tmp_path / "out").mkdir()
    d.save(tmp_path / "out")
    again = GenerationDefaults.from_dir(tmp_path / "out")
    assert again.sampling() == d.sampling() and again.eos_token_id == d.eos_token_id


def test_the_shipped_model_samples_with_a_fixed_seed():
    d = GenerationDefaults.from_dir(SHIPPED)
    assert d.source is not None, "refbitnet/shipped/generation_config.json is missing"
    s = d.sampling()
    assert not s.greedy and s.seed is not None
    assert d.resolve(temperature=0).greedy
