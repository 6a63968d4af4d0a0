"""The tokenizer inside a GGUF file: HF tokenizer.json <-> ``tokenizer.ggml.*`` metadata.

GGUF stores a byte-level BPE vocabulary (Llama-3's and GPT-2's kind, ``tokenizer.ggml.model = "gpt2"``)
as parallel arrays: token strings, token types (1 NORMAL, 3 CONTROL, 4 USER_DEFINED), merges, and the
name of the pre-tokenizer split (``tokenizer.ggml.pre``: "llama-bpe" or "gpt-2"). Writing converts a
tokenizer.json into those keys as llama.cpp's converter does; reading rebuilds a tokenizer.json that
the ``tokenizers`` library loads, so refbitnet tokenizes a GGUF file's text as the engines do.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ..errors import GGUFError

# Llama-3's pre-tokenizer split (tokenizer.ggml.pre = "llama-bpe"), as in its tokenizer.json.
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                      r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The chat format of docs/SPEC.md §6 as a Jinja template (what llama.cpp's server and bitnet.cpp apply).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
                 "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")


def tokenizer_metadata(tokenizer_file, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer keys (Llama-3 style byte-level BPE, ``tokenizer.ggml.model = "gpt2"``) from a HF
    tokenizer.json. Ids the file does not define up to vocab_size become "[PAD{id}]" (USER_DEFINED),
    as llama.cpp's converter writes them."""
    path = os.fspath(tokenizer_file)
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj["model"]
        if model.get("type") != "BPE":
            raise GGUFError(f"{path}: expected a BPE tokenizer, found model type {model.get('type')!r}")
        vocab: dict[str, int] = model["vocab"]
        merges = model.get("merges", [])
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise GGUFError(f"{path}: model.vocab: expected an object of token -> integer id")
    except FileNotFoundError:
        raise GGUFError(f"{path}: tokenizer file not found") from None
    except GGUFError:
        raise
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:   # ValueError: bad JSON
        raise GGUFError(f"{path}: not a HF tokenizer.json ({type(e).__name__}: {e})") from None
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size                                         # NORMAL
    for tok, i in vocab.items():
        if 0 <= i < vocab_size:
            tokens[i] = tok
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if 0 <= i < vocab_size:
            tokens[i] = added["content"]
            types[i] = 3 if added.get("special") else 4                 # CONTROL / USER_DEFINED
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i], types[i] = f"[PAD{i}]", 4
    if max(vocab.values(), default=-1) >= vocab_size:
        raise GGUFError(f"{path}: tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                        f"vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    by_name = {t: i for i, t in enumerate(tokens)}
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(tj, path),
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    for key, name in (("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>"), ("eot", "<|eot_id|>")):
        if name in by_name:
            meta[f"tokenizer.ggml.{key}_token_id"] = by_name[name]
    return meta


def _pre_tokenizer_name(tj: dict, path: str) -> str:
    """tokenizer.ggml.pre for a tokenizer.json: "llama-bpe" (Llama-3's split regex + byte-level) or
    "gpt-2" (plain byte-level with GPT-2's regex, what refbitnet's trainer makes). Anything else would
    be split differently by llama.cpp, so it is refused."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any((p.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT_REGEX for p in parts):
        return "llama-bpe"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is neither Llama-3's nor GPT-2's byte-level "
                    f"split; llama.cpp and bitnet.cpp would tokenize text differently")


def tokenizer_json_from_metadata(metadata: Mapping[str, Any], source: str = "GGUF") -> dict:
    """Rebuild a HF tokenizer.json (as a dict) from GGUF tokenizer keys of a byte-level BPE vocabulary
    (tokenizer.ggml.model "gpt2"). All tokens form the BPE vocabulary; CONTROL tokens are also special
    added tokens, USER_DEFINED ones plain added tokens. pre "llama-bpe" gets Llama-3's split regex,
    anything else GPT-2's byte-level regex."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model is {model!r}; refbitnet rebuilds byte-level BPE "
                        f"('gpt2') vocabularies only")
    try:
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]
        merges = list(metadata.get("tokenizer.ggml.merges", []))
    except KeyError as e:
        raise GGUFError(f"{source}: missing tokenizer key {e}") from None
    except (TypeError, ValueError) as e:       # e.g. tokens given as one int, token types as strings
        raise GGUFError(f"{source}: tokenizer.ggml.* keys have the wrong types ({type(e).__name__}: {e})") from None
    if not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens: expected an array of strings, found "
                        f"{type(next(t for t in tokens if not isinstance(t, str))).__name__} items")
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    # Every token is in the BPE vocabulary under its id (tokenizers would renumber an added token that is
    # not, when ids have gaps); CONTROL / USER_DEFINED tokens are also added tokens, matched before BPE.
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        vocab.setdefault(tok, i)
        if kind in (3, 4):                                         # CONTROL, USER_DEFINED
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == 3})
    llama3 = metadata.get("tokenizer.ggml.pre") == "llama-bpe"
    if llama3:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    else:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                               "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": llama3, "vocab": vocab, "merges": merges}}


def gguf_tokenizer(gf):
    """The file's tokenizer (gf: a refbitnet.gguf.reader.GGUFFile) as a refbitnet Tokenizer, or None if
    the file has none. Raises TokenizerError if the vocabulary lacks the specials refbitnet's Tokenizer
    needs."""
    if "tokenizer.ggml.tokens" not in gf.metadata:
        return None
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer
    tj = tokenizer_json_from_metadata(gf.metadata, gf.path)
    try:
        backend = HFTokenizer.from_str(json.dumps(tj))
    except Exception as e:               # tokenizers raises a bare Exception on a bad vocabulary
        raise GGUFError(f"{gf.path}: cannot build a tokenizer from its tokenizer.ggml keys: {e}") from None
    return Tokenizer(backend, source=f"{gf.path} (tokenizer.ggml.*)")
