"""The small BitNet b1.58 that ships inside the package (refbitnet/shipped), trained by examples/train.py.

It loads through the same path as a downloaded 2B4T (refbitnet.load -> checkpoint.load_model_dir:
packed uint8 projections + bf16 weight_scale, bf16 embedding and norms, tokenizer.json), and its greedy
continuation of a fixed prompt is asserted token for token (llama2.c's test_all.py idea): any change to
the forward pass, the loader or the tokenizer that alters the numerics shows up here.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import refbitnet

SHIPPED = Path(refbitnet.__file__).parent / "shipped"
pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model in this build")

PROMPT = "ROMEO.\n"
# greedy (temperature 0), int numerics, numpy backend, 24 new tokens; recorded when the model was trained
EXPECTED_GREEDY = "I'll, I have not, I have not.\n\n[Enter CA.]\n\n[Enter CAT"


@pytest.fixture(scope="module")
def model():
    return refbitnet.load()


def test_loads_like_a_release_checkpoint(model):
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["BitNetForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert model.config.hidden_size == config["hidden_size"] and model.config.tie_word_embeddings
    tok = model.tokenizer
    assert (tok.bos_id, tok.end_of_text_id, tok.eot_id) == (0, 1, 2)
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size < 8 * 2**20                                   # a few MB


def test_greedy_continuation_is_fixed(model):
    ids = model.generate(PROMPT, max_new_tokens=24, temperature=0.0)   # greedy (the shipped defaults sample)
    text = model.tokenizer.decode(ids)
    print(repr(text))
    assert text == EXPECTED_GREEDY


def test_predicts_shakespeare_better_than_unigram(model):
    """Loss on a famous passage (in the training plays, so this is a sanity check, not a validation
    number: that is in TRAINING.json) is far below the unigram baseline of the training corpus."""
    info = json.loads((SHIPPED / "TRAINING.json").read_text())
    passage = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
               "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n")
    ids = model.tokenizer.encode(passage, add_bos=True)
    logits = model.forward(np.array(ids[:-1]))                 # [S, V]
    z = logits - logits.max(-1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(ids) - 1), ids[1:]]))
    print(f"loss {loss:.3f} (ppl {math.exp(loss):.1f}); unigram {info['unigram_val_loss']:.3f}")
    assert loss < info["unigram_val_loss"] - 1.0
