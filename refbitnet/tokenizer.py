"""The model's tokenizer: its ``tokenizer.json``, its special tokens and its chat template (docs/SPEC.md §6).

What it is: a thin wrapper around the `tokenizers` library (byte-level BPE or whatever the
``tokenizer.json`` describes) that knows the ids generation needs, taken from the model's own files as
transformers takes them (``load_tokenizer(model_dir)``):

    bos_id          the token a prompt starts with        tokenizer_config.json ``bos_token``, else
                                                          special_tokens_map.json, else config.json
                                                          ``bos_token_id``, else ``<|begin_of_text|>``
    end_of_text_id  the tokenizer's end-of-sequence token same files, ``eos_token`` / ``eos_token_id``,
                                                          else ``<|end_of_text|>``
    eot_id          end of a chat turn                    ``<|eot_id|>``, ``<|im_end|>``,
                                                          ``<end_of_turn>`` or ``<|end|>`` if defined
    eos_ids         every id that stops generation        eot, eos, then config.json's and
                                                          generation_config.json's ``eos_token_id``s

Any of the first three may be None (a tokenizer without that token); the 2B4T names are a fallback,
not a requirement. ``add_bos``: whether a prompt starts with BOS (tokenizer_config.json
``add_bos_token``, else whether there is a BOS at all, as llama.cpp defaults it: BitNet 2B4T and the
shipped model were trained with one, and Llama-3 tokenizer.json files do not all add it themselves).

The chat format: a ``chat_template`` in tokenizer_config.json is rendered with jinja2 in an immutable
sandbox configured as transformers configures it (trim_blocks, lstrip_blocks, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, loop controls, the ``{% generation %}`` tag),
with the special tokens' strings as variables, and the text is tokenized with no specials added:
the ids equal transformers' ``apply_chat_template``. A tokenizer without a template gets the format
of docs/SPEC.md §6 (the released 2B4T template written out, behind a BOS):

    <|begin_of_text|>System: {content.strip()}<|eot_id|>User: {...}<|eot_id|>Assistant: 

``chat_prompt`` is what generation feeds the model: the template's ids with a BOS in front when the
tokenizer adds one and the template did not render it (llama.cpp and bitnet.cpp do the same; the
released 2B4T template renders none, so transformers' ids lack the BOS the model was trained with).

``TextStream`` turns ids produced one at a time into text that is safe to print: a character split
across several byte-level tokens is held back until its last byte arrives.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from .errors import RefBitNetTypeError, TokenizerError

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
# end-of-turn tokens of common chat formats, the first one the vocabulary defines is the end of a turn
END_OF_TURN_TOKENS = (EOT_TOKEN, "<|im_end|>", "<end_of_turn>", "<|end|>")
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
GENERATION_PROMPT = "Assistant: "

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# the special-token strings a chat template sees as variables (transformers passes its special_tokens_map)
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")


class Tokenizer:
    """A tokenizer with the special ids and chat format of one model.

    Attributes: ``bos_id``, ``end_of_text_id``, ``eot_id`` (each an int or None), ``eos_ids`` (tuple of
    stop ids: eot first, then end-of-text, then the files' other eos ids), ``add_bos``,
    ``chat_template`` (str or None), ``template_tokens`` ({"bos_token": "<s>", ...} for the template),
    ``vocab_size`` (including added tokens), ``path``.

    Built by ``load_tokenizer(model_dir)`` (all the files) or ``Tokenizer.from_file(tokenizer.json)``
    (that file alone: specials found by the 2B4T names). The keyword arguments override what the
    names give (e.g. a GGUF file's ``tokenizer.ggml.*`` ids).
    """

    def __init__(self, backend: _HFTokenizer, source: str = "<tokenizers.Tokenizer>", *,
                 bos_id: int | None = None, eos_id: int | None = None, eot_id: int | None = None,
                 stop_ids: Sequence[int] = (), add_bos: bool | None = None, chat_template: str | None = None,
                 template_tokens: Mapping[str, str] | None = None, files: Mapping[str, dict] | None = None):
        if not isinstance(backend, _HFTokenizer):
            raise RefBitNetTypeError(
                f"Tokenizer: expected a tokenizers.Tokenizer, found {type(backend).__name__}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"{source}: chat_template: expected a string, found "
                                 f"{type(chat_template).__name__}")
        self._backend = backend
        self.path = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._checked_id(bos_id, "bos") if bos_id is not None else self._named_id(BOS_TOKEN)
        self.end_of_text_id = (self._checked_id(eos_id, "eos") if eos_id is not None
                               else self._named_id(END_OF_TEXT_TOKEN))
        if eot_id is None:
            eot_id = next((i for i in map(self._named_id, END_OF_TURN_TOKENS) if i is not None), None)
        self.eot_id = self._checked_id(eot_id, "end-of-turn") if eot_id is not None else None
        stops = [i for i in (self.eot_id, self.end_of_text_id) if i is not None]
        stops += [self._checked_id(i, "stop") for i in stop_ids]
        self.eos_ids = tuple(dict.fromkeys(stops))      # ordered, without repeats
        self.add_bos = (True if add_bos is None else bool(add_bos)) and self.bos_id is not None
        self.chat_template = chat_template
        if template_tokens is None:         # tokenizer.json alone: the specials found by name
            template_tokens = {"bos_token": self._token(self.bos_id),
                               "eos_token": self._token(self.end_of_text_id)}
        self.template_tokens = {k: v for k, v in template_tokens.items() if isinstance(v, str)}
        self.files = dict(files or {})                  # the JSON of the files read, for save_pretrained

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a ``tokenizer.json`` (or the one in a directory) alone: specials by the 2B4T names, no
        template. A missing or unreadable file is a TokenizerError naming it. ``load_tokenizer`` reads a
        model directory's other files too."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        return cls(_read_backend(path), source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a ``tokenizer.json`` (e.g. next to a saved model)."""
        self._backend.save(os.fspath(path))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and the tokenizer_config.json / special_tokens_map.json this tokenizer was
        read with (or, for one built from tokenizer.json alone, a tokenizer_config.json naming its BOS,
        EOS and chat template), so that load_tokenizer gives back the same specials and template.
        tokenizer.json is the file read, byte for byte, where there is one and nothing was added to it."""
        import shutil
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, TOKENIZER_FILE)
        unchanged = os.path.isfile(self.path) and (self._backend.get_vocab_size(with_added_tokens=True)
                                                   == _HFTokenizer.from_file(self.path).get_vocab_size(True))
        if not unchanged:
            self.save(target)
        elif not (os.path.exists(target) and os.path.samefile(self.path, target)):
            shutil.copyfile(self.path, target)
        tokenizer_config = dict(self.files.get(TOKENIZER_CONFIG_FILE) or {})
        for name in ("bos_token", "eos_token"):
            if name not in tokenizer_config and name in self.template_tokens:
                tokenizer_config[name] = self.template_tokens[name]
        if self.chat_template is not None:
            tokenizer_config["chat_template"] = self.chat_template
        tokenizer_config.setdefault("add_bos_token", self.add_bos)
        _write_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), tokenizer_config)
        if self.files.get(SPECIAL_TOKENS_MAP_FILE) is not None:
            _write_json(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE), self.files[SPECIAL_TOKENS_MAP_FILE])

    def _named_id(self, name: str) -> int | None:
        token_id = self._backend.token_to_id(name)
        return None if token_id is None else int(token_id)

    def _checked_id(self, token_id, what: str) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"{self.path}: {what} token id: expected an id in [0, {self.vocab_size}), "
                                 f"found {token_id!r}")
        return token_id

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def token_id(self, token: str) -> int | None:
        """The id of a token string (e.g. a special's), or None if the vocabulary lacks it."""
        return self._named_id(token)

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` become their ids (parse_special=False: they are
        plain text, as llama.cpp tokenizes a perplexity file); BOS only if asked (and only if the tokenizer
        has one: see ``encode_prompt`` for the model's own choice)."""
        if not isinstance(text, str):
            raise RefBitNetTypeError(f"encode: text must be str, found {type(text).__name__}")
        if parse_special:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            self._backend.encode_special_tokens = True
            try:
                ids = self._backend.encode(text, add_special_tokens=False).ids
            finally:
                self._backend.encode_special_tokens = False
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else list(ids)

    def encode_prompt(self, text: str) -> list[int]:
        """A plain-text prompt -> ids, with the BOS the model expects first (``add_bos``)."""
        return self.encode(text, add_bos=self.add_bos)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Ids outside ``[0, vocab_size)`` are a TokenizerError, never skipped."""
        ids = self.check_ids(ids, "decode")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int], what: str = "ids") -> list[int]:
        """Return ``ids`` as a list of Python ints, raising if any is not a valid token id."""
        try:
            as_list = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise RefBitNetTypeError(f"{what}: expected a sequence of integer token ids ({exc})") from exc
        bad = [i for i in as_list if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) "
                f"of tokenizer {self.path!r} ({len(bad)} such ids)")
        return as_list

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # -- chat format ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **template_vars) -> list[int]:
        """Messages ``[{"role": ..., "content": ...}, ...]`` -> ids, equal to transformers'
        ``apply_chat_template`` with the same template.

        chat_template: a Jinja template overriding the tokenizer's own. With neither, the built-in
        2B4T format (module docstring; roles system / user / assistant). template_vars: extra variables
        for the template (as transformers' keyword arguments, e.g. ``tools``, ``date_string``).
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            return self._builtin_chat(messages, add_generation_prompt)
        text = self.render_chat(messages, add_generation_prompt, template, **template_vars)
        return self._backend.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                    chat_template: str | None = None, **template_vars) -> str:
        """The template's text for messages (what transformers returns with ``tokenize=False``)."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            return self.decode(self._builtin_chat(messages, add_generation_prompt))
        messages = _check_messages(messages, any_role=True)
        variables = {**self.template_tokens, **template_vars}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **variables)

    def chat_prompt(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """The ids generation feeds the model for a chat: ``apply_chat_template``, with a BOS first where
        the tokenizer adds one and the template did not render it (never two)."""
        ids = self.apply_chat_template(messages, add_generation_prompt)
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def _builtin_chat(self, messages, add_generation_prompt: bool) -> list[int]:
        """docs/SPEC.md §6: ``<|begin_of_text|>`` + for each message ``Role: content.strip()<|eot_id|>`` + (if
        asked) ``Assistant: ``; the text between special tokens is tokenized piece by piece, exactly as
        a tokenizer splits a rendered template string at its special tokens."""
        messages = _check_messages(messages, any_role=False)
        missing = [name for name, i in ((BOS_TOKEN, self.bos_id), (EOT_TOKEN, self.eot_id)) if i is None]
        if missing:
            raise TokenizerError(f"apply_chat_template: tokenizer {self.path!r} has no chat_template and "
                                 f"does not define {' or '.join(missing)}, which the built-in 2B4T chat "
                                 f"format needs; add a chat_template to tokenizer_config.json")
        ids = [self.bos_id]
        for message in messages:
            ids += self.encode(f"{CHAT_ROLES[message['role']]}: {message['content'].strip()}")
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids += self.encode(GENERATION_PROMPT)
        return ids

    def text_stream(self) -> "TextStream":
        """A fresh incremental decoder for ids produced one at a time (see TextStream)."""
        return TextStream(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _check_messages(messages, any_role: bool) -> list[dict]:
    """Messages as plain dicts (keys whose value is None dropped, as transformers does). The built-in
    format needs role in CHAT_ROLES and str content; a template may use any roles and keys."""
    if isinstance(messages, (Mapping, str, bytes)) or not isinstance(messages, Sequence):
        raise RefBitNetTypeError(
            "apply_chat_template: messages must be a list of {'role', 'content'} dicts, "
            f"found {type(messages).__name__}")
    if len(messages) == 0:  # as transformers: an empty chat is an error, not a bare prompt
        raise TokenizerError("apply_chat_template: needs at least one message, found none")
    checked = []
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TokenizerError(
                f"apply_chat_template: message {number} must be a dict with 'role' and 'content', "
                f"found {message!r:.80}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or (not any_role and role not in CHAT_ROLES):
            raise TokenizerError(
                f"apply_chat_template: message {number} has role {role!r}; expected one of "
                f"{sorted(CHAT_ROLES)}" + ("" if any_role else " (the built-in format's roles)"))
        if not any_role and not isinstance(content, str):
            raise RefBitNetTypeError(
                f"apply_chat_template: message {number} content must be str, "
                f"found {type(content).__name__}")
        checked.append({k: v for k, v in message.items() if v is not None})
    return checked


# ================================================================================ chat templates

def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         **variables) -> str:
    """Render a chat template as transformers does: jinja2's ImmutableSandboxedEnvironment (templates
    come from downloaded files: no attribute access to Python internals, no mutation of the inputs)
    with trim_blocks and lstrip_blocks; ``messages``, ``add_generation_prompt`` and the variables.
    A template error (including the template's own ``raise_exception``) is a TokenizerError."""
    import jinja2
    try:
        compiled = _compile_template(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **{"tools": None, "documents": None, **variables})
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"chat_template: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks an assistant turn for training masks; it
        renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


# ================================================================================ a model's files

def load_tokenizer(model_dir: str | os.PathLike, config=None) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model directory, or None if it has no tokenizer.json.

    Reads tokenizer.json, and where present tokenizer_config.json (bos_token, eos_token, add_bos_token,
    added_tokens_decoder, chat_template), special_tokens_map.json, config.json (bos_token_id,
    eos_token_id) and generation_config.json (eos_token_id, an int or a list). config: the model's
    refbitnet Config, if loaded: the tokenizer may not have more tokens than its vocab_size.
    Any malformed file is a TokenizerError naming it.
    """
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    backend = _read_backend(path)
    tokenizer_config = _read_json(model_dir, TOKENIZER_CONFIG_FILE)
    special_map = _read_json(model_dir, SPECIAL_TOKENS_MAP_FILE)
    model_config = _read_json(model_dir, CONFIG_FILE) or {}
    generation_config = _read_json(model_dir, GENERATION_CONFIG_FILE) or {}
    where = os.path.join(model_dir, TOKENIZER_CONFIG_FILE)
    _add_declared_tokens(backend, (tokenizer_config or {}).get("added_tokens_decoder"), where)

    # transformers 5: special_tokens_map.json's entries override tokenizer_config.json's only for files
    # without added_tokens_decoder (the older layout); otherwise tokenizer_config.json alone counts
    declared = dict(tokenizer_config or {})
    if special_map and "added_tokens_decoder" not in declared:
        declared.update(special_map)
    elif special_map:
        declared = {**special_map, **declared}
    tokens = {name: _token_content(declared.get(name), name, model_dir) for name in TEMPLATE_TOKEN_NAMES}

    def by_token(name):
        content = tokens.get(name)
        if content is None:
            return None
        token_id = backend.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"{model_dir}: {name} {content!r} (tokenizer_config.json / "
                                 f"special_tokens_map.json) is not a token of {path}")
        return int(token_id)

    def from_config(key, first_only):
        value = model_config.get(key)
        ids = value if isinstance(value, list) else ([] if value is None else [value])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TokenizerError(f"{os.path.join(model_dir, CONFIG_FILE)}: {key}: expected a token id or a "
                                 f"list of them, found {value!r}")
        return (ids[0] if ids else None) if first_only else ids

    bos_id = by_token("bos_token")
    if bos_id is None:
        bos_id = from_config("bos_token_id", True)
    eos_id = by_token("eos_token")
    if eos_id is None:
        eos_id = from_config("eos_token_id", True)
    stop_ids = from_config("eos_token_id", False) + _generation_eos_ids(generation_config, model_dir)
    add_bos = declared.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{where}: add_bos_token: expected true or false, found {add_bos!r}")
    template = declared.get("chat_template")
    if isinstance(template, list):      # several named templates: transformers' default is "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        template = _read_text(model_dir, "chat_template.jinja")
    template_tokens = {name: value for name, value in tokens.items() if value is not None}
    files = {TOKENIZER_CONFIG_FILE: tokenizer_config, SPECIAL_TOKENS_MAP_FILE: special_map}
    tokenizer = Tokenizer(backend, source=path, bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids,
                          add_bos=add_bos, chat_template=template, template_tokens=template_tokens,
                          files={k: v for k, v in files.items() if v is not None})
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                             f"vocab_size = {vocab_size} in {os.path.join(model_dir, CONFIG_FILE)}")
    return tokenizer


def _read_backend(path: str) -> _HFTokenizer:
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist"
                             + (" as a regular file" if os.path.exists(path) else ""))
    try:
        return _HFTokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON or models
        raise TokenizerError(f"tokenizer file {path!r} is not a valid tokenizer.json: {exc}") from exc


def _read_json(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: expected a regular file, found a directory, FIFO or device")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_text(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _token_content(value, name: str, model_dir: str) -> str | None:
    """A special token as the files write it: a string, an AddedToken dict {"content": ...}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{model_dir}: {name}: expected a token string or {{'content': ...}}, "
                             f"found {value!r:.80}")
    return value


def _generation_eos_ids(generation_config: dict, model_dir: str) -> list[int]:
    value = generation_config.get("eos_token_id")
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{os.path.join(model_dir, GENERATION_CONFIG_FILE)}: eos_token_id: expected a "
                             f"token id or a list of them, found {value!r}")
    return ids


def _add_declared_tokens(backend: _HFTokenizer, decoder, where: str) -> None:
    """tokenizer_config.json's added_tokens_decoder {"id": {"content": ...}}: every token must have its
    declared id; one the tokenizer.json lacks is added (as transformers does) if it lands on that id."""
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder: expected an object, found {type(decoder).__name__}")
    from tokenizers import AddedToken
    entries = []
    for key, token in decoder.items():
        content = token.get("content") if isinstance(token, dict) else None
        if not (isinstance(key, str) and key.isdigit() and isinstance(content, str)):
            raise TokenizerError(f"{where}: added_tokens_decoder[{key!r}]: expected an id and "
                                 f"{{'content': ...}}, found {token!r:.80}")
        entries.append((int(key), content, bool(token.get("special", False))))
    for token_id, content, special in sorted(entries):
        found = backend.token_to_id(content)
        if found is None:
            size = backend.get_vocab_size(with_added_tokens=True)
            if token_id != size:
                raise TokenizerError(f"{where}: added_tokens_decoder: token {content!r} with id {token_id} is "
                                     f"not in tokenizer.json, whose next free id is {size}")
            backend.add_tokens([AddedToken(content, special=special, normalized=not special)])
        elif found != token_id:
            raise TokenizerError(f"{where}: added_tokens_decoder: token {content!r} has id {token_id} here "
                                 f"but {found} in tokenizer.json")


class TextStream:
    """Incremental detokenizer: ``push(id) -> str`` returns the text that id completes.

    Byte-level BPE may split one character (an emoji, a CJK character) over several tokens; decoding
    such a prefix gives U+FFFD. We decode a short window of recent ids, and emit new text only once it
    no longer ends in U+FFFD. Concatenating every ``push`` and the final ``flush`` gives exactly
    ``decode(all ids)`` whenever that text does not itself end in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._window_start = 0   # decoding starts here so that the first token keeps its context
        self._emitted_upto = 0   # ids[:_emitted_upto] have been turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tokenizer.decode(self.ids[self._window_start:self._emitted_upto])
        text = self.tokenizer.decode(self.ids[self._window_start:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""  # an incomplete character: wait for its remaining bytes
        self._window_start, self._emitted_upto = self._emitted_upto, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is left (possibly U+FFFD for a truly incomplete character at the end)."""
        done = self.tokenizer.decode(self.ids[self._window_start:self._emitted_upto])
        text = self.tokenizer.decode(self.ids[self._window_start:])
        self._window_start = self._emitted_upto = len(self.ids)
        return text[len(done):]
