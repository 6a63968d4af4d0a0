"""The refbitnet command (refbitnet.cli): what it prints, what it honours, and one line per bad input.

The model directory here is a tiny random BitNet with a small BPE tokenizer whose specials are <s> and
</s> (named in tokenizer_config.json, ids in config.json: not the 2B4T names) and a
generation_config.json that samples with a seed, so every point of the issue shows through the command.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _tiny_bitnet import numpy_config, numpy_release_tensors

import refbitnet
from refbitnet import cli
from refbitnet.checkpoint import model_from_tensors

# widths multiples of 128 (I2_S's block, for the GGUF export), V = 333, context 128
SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=333)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GENERATION = {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 4, "eos_token_id": 2}
REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def small_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    from pydoc_data.topics import topics          # enough text to fill the model's 333 ids
    backend.train_from_iterator(["the cat sat on the mat and the dog ran"] * 50 + list(topics.values()),
                                trainer=trainer)
    assert backend.get_vocab_size() == vocab_size
    return backend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    model = model_from_tensors(numpy_config(SIZES), numpy_release_tensors(SIZES, 11), source="tiny")
    refbitnet.save(model, d)
    small_tokenizer(SIZES["vocab_size"]).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps(GENERATION))
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    m, _ = cli.load_model(str(model_dir), backend="numpy")
    return m


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_model_files_specials_and_template_are_used(model):
    tok = model.tokenizer
    assert (tok.bos_id, tok.end_of_text_id, tok.eot_id) == (1, 2, 4)      # <s>, </s>, <|im_end|>
    assert tok.chat_template == CHATML


def test_generate_honours_generation_config_and_prints_the_seed(model_dir, model, capsys):
    code, out, err = run(["generate", "--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens",
                          "12", "--backend", "numpy"], capsys)
    expected = model.generate(model.tokenizer.encode_prompt("the cat"), 12, temperature=0.9, top_k=20,
                              top_p=0.95, seed=4, stop=[2])
    assert code == 0 and out == "the cat" + model.tokenizer.decode(expected) + "\n"
    assert "temperature 0.9, top-k 20, top-p 0.95, seed 4 (generation_config.json)" in err
    assert "prefill" in err and "decode" in err and "peak memory" in err


@pytest.mark.parametrize("flags, kwargs", [
    (["--greedy"], dict(temperature=0.0)),
    (["--temperature", "0"], dict(temperature=0.0)),
    (["--seed", "9", "--top-k", "0"], dict(temperature=0.9, top_k=0, top_p=0.95, seed=9)),
    (["--temperature", "1.5", "--top-p", "0.5"], dict(temperature=1.5, top_k=20, top_p=0.5, seed=4)),
])
def test_flags_override_generation_config(model_dir, model, capsys, flags, kwargs):
    code, out, err = run(["generate", "--model", str(model_dir), "--prompt", "the dog", "--max-new-tokens", "10",
                          "--backend", "numpy"] + flags, capsys)
    expected = model.generate(model.tokenizer.encode_prompt("the dog"), 10, stop=[2], **kwargs)
    assert code == 0 and out == "the dog" + model.tokenizer.decode(expected) + "\n"
    if kwargs["temperature"] == 0:
        assert "[greedy decoding]" in err


def test_a_fresh_seed_is_printed_and_reproduces(tmp_path, model_dir, model, capsys):
    d = tmp_path / "no_seed"
    d.mkdir()
    for name in os.listdir(model_dir):
        os.symlink(model_dir / name, d / name)
    os.unlink(d / "generation_config.json")
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 1.0}))
    code, out, err = run(["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "8",
                          "--backend", "numpy"], capsys)
    seed = int(err.split("seed ")[1].split(" ")[0])
    assert code == 0 and "(fresh)" in err
    again = model.generate(model.tokenizer.encode_prompt("the"), 8, temperature=1.0, top_k=50, seed=seed, stop=[2])
    assert out == "the" + model.tokenizer.decode(again) + "\n"


def test_chat_uses_the_model_template(model_dir, model, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("the dog\n\n"))
    code, out, err = run(["chat", "--model", str(model_dir), "--system", "be brief", "--prompt", "the cat",
                          "--max-new-tokens", "5", "--greedy", "--backend", "numpy"], capsys)
    assert code == 0 and err.count("peak memory") == 2
    first = model.tokenizer.chat_prompt([{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "the cat"}])
    assert first == [1] + model.tokenizer.encode("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n"
                                                  "the cat<|im_end|>\n<|im_start|>assistant\n")   # <s> + template
    assert f"[{len(first)} prompt tokens, " in err


def test_perplexity_command_equals_the_library(model_dir, model, tmp_path, capsys):
    from refbitnet.perplexity import perplexity
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 30, encoding="utf-8")
    code, out, err = run(["perplexity", "--model", str(model_dir), "--file", str(text), "--ctx", "32",
                          "--backend", "numpy"], capsys)
    ids = model.tokenizer.encode(text.read_text(), add_bos=True)
    want = perplexity(model, ids, n_ctx=32, bos_id=1)
    assert code == 0 and out == want.summary() + "\n"                    # the figure on stdout, alone
    assert "perplexity [" in err and f"PPL {want.ppl:.4f}" in err and "[1]" in err


def test_gguf_export_and_info(model_dir, tmp_path, capsys):
    out_file = tmp_path / "m.gguf"
    code, out, err = run(["gguf", "export", str(model_dir), str(out_file)], capsys)
    assert code == 0 and out_file.exists() and "exported in" in err
    code, info, _ = run(["gguf", "info", str(out_file)], capsys)
    assert code == 0 and info == out and "GGUF" in info
    # the exported file loads through --model and computes what the directory computes
    from_gguf, path = cli.load_model(str(out_file), backend="numpy")
    from_dir, _ = cli.load_model(str(model_dir), backend="numpy")
    assert path == out_file
    ids = from_dir.tokenizer.encode_prompt("the cat")
    greedy = dict(temperature=0.0, stop=[2])
    assert from_gguf.generate(ids, 6, **greedy) == from_dir.generate(ids, 6, **greedy)


def test_gguf_export_reports_progress_where_save_gguf_offers_it(model_dir, tmp_path, capsys, monkeypatch):
    import refbitnet.gguf as gguf
    calls = []

    def save_gguf(source, path, *, layout, tokenizer_file, embedding_type, progress):
        for done in (1, 2, 3):
            progress(done, 3, f"tensor{done}")
        open(path, "wb").write(b"x" * 10)
        calls.append((source, layout))
    monkeypatch.setattr(gguf, "save_gguf", save_gguf)
    monkeypatch.setattr(gguf, "describe", lambda path: f"described {path}")
    code, out, err = run(["gguf", "export", str(model_dir), str(tmp_path / "o.gguf"), "--layout", "tq2_0"], capsys)
    assert code == 0 and calls == [(model_dir, "tq2_0")] and out == f"described {tmp_path / 'o.gguf'}\n"
    assert "export [########################] 3/3" in err


def test_a_hub_id_from_the_cache(model_dir, tmp_path, capsys, monkeypatch):
    sha = "a" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-bitnet"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots").mkdir()
    os.symlink(model_dir, repo / "snapshots" / sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = ["--prompt", "the", "--max-new-tokens", "5", "--greedy", "--backend", "numpy"]
    assert run(["generate", "--model", "someone/tiny-bitnet"] + gen, capsys)[:2] == \
        run(["generate", "--model", str(model_dir)] + gen, capsys)[:2]


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, model_dir):
    base = tmp_path_factory.mktemp("bad")
    (base / "empty").mkdir()
    (base / "llama").mkdir()
    (base / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                            "model_type": "llama", "hidden_size": 64}))
    (base / "broken_tok").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(model_dir / name, base / "broken_tok" / name)
    (base / "broken_tok" / "tokenizer.json").write_text("{ nope")
    (base / "no_tok").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(model_dir / name, base / "no_tok" / name)
    (base / "bad_gen").mkdir()
    for name in os.listdir(model_dir):
        if name != "generation_config.json":
            os.symlink(model_dir / name, base / "bad_gen" / name)
    (base / "bad_gen" / "generation_config.json").write_text(json.dumps({"temperature": -2}))
    (base / "text.txt").write_text("short")
    (base / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (base / "not.gguf").write_text("hello")
    return base


BAD = [
    (["generate", "--model", "{b}/empty"], "config.json: file not found"),
    (["generate", "--model", "{b}/llama"], "architectures: expected one of"),
    (["chat", "--model", "{b}/llama"], "architectures: expected one of"),
    (["generate", "--model", "{b}/broken_tok"], "not a valid tokenizer.json"),
    (["generate", "--model", "{b}/bad_gen"], "temperature: expected a number >= 0"),
    (["generate", "--model", "{b}/no_tok"], "has no tokenizer.json"),
    (["perplexity", "--model", "{b}/no_tok", "--file", "{b}/text.txt"], "has no tokenizer.json"),
    (["generate", "--model", "{b}/missing"], "expected a model directory, a .gguf file or a Hugging Face id"),
    (["generate", "--model", "nobody/nothing"], "huggingface-cli download nobody/nothing"),
    (["generate", "--model", "{b}/text.txt"], "expected a model directory or a .gguf file"),
    (["generate", "--model", "{b}/not.gguf"], "not.gguf"),
    (["generate", "--model", "{m}", "--top-p", "2"], "top_p must be in"),
    (["generate", "--model", "{m}", "--temperature", "-1"], "temperature must be"),
    (["generate", "--model", "{m}", "--top-k", "-1"], "top_k must be"),
    (["generate", "--model", "{m}", "--max-new-tokens", "0"], "max_new_tokens: expected 1 <="),
    (["generate", "--model", "{m}", "--max-new-tokens", "1000"], "exceeds the model's context"),
    (["perplexity", "--model", "{m}", "--file", "{b}/text.txt"], "needs at least"),
    (["perplexity", "--model", "{m}", "--file", "{b}/nothing.txt"], "No such file"),
    (["perplexity", "--model", "{m}", "--file", "{b}"], "Is a directory"),
    (["perplexity", "--model", "{m}", "--file", "{b}/latin1.txt"], "not UTF-8 text"),
    (["perplexity", "--model", "{m}", "--file", "{b}/text.txt", "--ctx", "4096"], "exceeds the model's context"),
    (["gguf", "info", "{b}/not.gguf"], "not a GGUF file"),
    (["gguf", "info", "{b}/nothing.gguf"], "nothing.gguf"),
    (["gguf", "export", "{b}/llama", "{b}/out.gguf"], "architectures: expected one of"),
    (["gguf", "export", "{m}", "{b}/no/such/dir/out.gguf"], "out.gguf"),
]


@pytest.mark.parametrize("argv, match", BAD)
def test_bad_input_is_one_line_and_a_nonzero_exit(bad_dirs, model_dir, capsys, monkeypatch, argv, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a.format(b=bad_dirs, m=model_dir) for a in argv]
    argv += ["--backend", "numpy"] if argv[0] != "gguf" else []
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(lines) == 1 and match in lines[0], (out, err)
    assert "Traceback" not in err


def test_the_console_entry_point_in_a_fresh_process(bad_dirs):
    """No traceback from the real process either (python -m refbitnet.cli is what the script runs)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv in (["generate", "--model", str(bad_dirs / "empty")], ["gguf", "info", str(bad_dirs / "not.gguf")]):
        done = subprocess.run([sys.executable, "-m", "refbitnet.cli"] + argv, capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
    done = subprocess.run([sys.executable, "-m", "refbitnet.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert all(c in done.stdout for c in ("generate", "chat", "perplexity", "gguf", "dump"))


def test_dump_is_the_oracles_dump(model_dir, tmp_path, capsys):
    pytest.importorskip("refbitnet.testing.__main__")
    from safetensors.numpy import load_file
    out = tmp_path / "acts.safetensors"
    code, text, err = run(["dump", "activations", "--model", str(model_dir), "--ids", "1,5,9", "--out", str(out)],
                          capsys)
    assert code == 0 and out.exists() and "wrote" in text
    assert len(load_file(str(out))) > 0
    code, _, err = run(["dump", "activations", "--model", str(tmp_path / "none"), "--ids", "1", "--out",
                        str(out)], capsys)
    assert code != 0 and "Traceback" not in err and err.count("error:") == 1


def test_examples_generate_is_the_generate_command():
    import importlib.util
    path = os.path.join(REPO, "examples", "generate.py")
    spec = importlib.util.spec_from_file_location("example_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is cli.generate_main and module.DEFAULT_PROMPT == cli.DEFAULT_PROMPT


def test_the_shipped_model_samples_its_defaults_and_greedy_is_one_flag_away(capsys):
    code, sampled, err = run(["generate", "--max-new-tokens", "16"], capsys)
    assert code == 0 and "seed 1 (generation_config.json)" in err
    code, again, _ = run(["generate", "--max-new-tokens", "16"], capsys)
    assert again == sampled                                                 # the printed seed reproduces
    code, greedy, err = run(["generate", "--max-new-tokens", "16", "--greedy"], capsys)
    model = refbitnet.load()
    want = model.generate(cli.DEFAULT_PROMPT, 16, temperature=0.0)
    assert greedy == cli.DEFAULT_PROMPT + model.tokenizer.decode(want) + "\n" and "[greedy decoding]" in err
    assert greedy != sampled


def test_a_model_without_a_tokenizer_loads_and_runs_on_ids(bad_dirs, model):
    m, _ = cli.load_model(str(bad_dirs / "no_tok"), backend="numpy")
    assert m.tokenizer is None
    assert m.generate([1, 5, 9], 4, temperature=0.0) == model.generate([1, 5, 9], 4, temperature=0.0, stop=[2])


def test_numbers_arrays_for_the_test_are_real(model):
    # a guard: the tiny model's logits are not degenerate, so equal texts above mean equal choices
    logits = model.forward(np.array([1, 5, 9]))
    assert np.isfinite(logits).all() and logits.std() > 0
