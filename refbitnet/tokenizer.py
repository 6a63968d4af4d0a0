"""The Llama-3 tokenizer of BitNet b1.58 2B4T and its chat format (SPEC §6).

What it is: a thin wrapper around the `tokenizers` library reading a ``tokenizer.json`` (byte-level
BPE), plus the three special tokens the model needs, looked up by name so that any tokenizer defining
them works (the released 128256-token Llama-3 file, or a small one trained for the shipped model):

    <|begin_of_text|>   BOS, prepended by the chat format (never added by ``encode`` unless asked)
    <|end_of_text|>     end of a document: generation stops
    <|eot_id|>          end of a chat turn: generation stops

The chat format of SPEC §6: the ``chat_template`` of the released ``tokenizer_config.json``,
written out, behind a BOS:

    <|begin_of_text|>System: {content.strip()}<|eot_id|>User: {...}<|eot_id|>Assistant: 

The role is capitalised (``system`` -> ``System``), the content trimmed of surrounding whitespace,
every turn ends with ``<|eot_id|>``, and the generation prompt is ``Assistant: `` whose trailing
space is a token of its own (220 in Llama-3). The released template itself renders no BOS (and
transformers adds none when it tokenizes a chat); SPEC §6 puts one first, as bitnet.cpp does for
every prompt. What it is not: a general Jinja template engine.

``TextStream`` turns ids produced one at a time into text that is safe to print: a character split
across several byte-level tokens is held back until its last byte arrives.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from .errors import RefBitNetTypeError, TokenizerError

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
GENERATION_PROMPT = "Assistant: "


class Tokenizer:
    """A byte-level BPE tokenizer with the specials and chat format BitNet b1.58 2B4T uses.

    Attributes: ``bos_id`` (``<|begin_of_text|>``), ``eot_id``, ``end_of_text_id``, ``eos_ids``
    (the stop ids: eot first, then end-of-text), ``vocab_size`` (including added tokens), ``path``.
    """

    def __init__(self, backend: _HFTokenizer, source: str = "<tokenizers.Tokenizer>"):
        if not isinstance(backend, _HFTokenizer):
            raise RefBitNetTypeError(
                f"Tokenizer: expected a tokenizers.Tokenizer, found {type(backend).__name__}")
        self._backend = backend
        self.path = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(BOS_TOKEN)
        self.end_of_text_id = self._special_id(END_OF_TEXT_TOKEN)
        self.eot_id = self._special_id(EOT_TOKEN)
        self.eos_ids = (self.eot_id, self.end_of_text_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a ``tokenizer.json`` (or the one in a directory); a missing or unreadable file is a
        TokenizerError naming it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path!r} does not exist")
        try:
            backend = _HFTokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON or models
            raise TokenizerError(
                f"tokenizer file {path!r} is not a valid tokenizer.json: {exc}") from exc
        return cls(backend, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a ``tokenizer.json`` (e.g. next to a saved model)."""
        self._backend.save(os.fspath(path))

    def _special_id(self, name: str) -> int:
        token_id = self._backend.token_to_id(name)
        if token_id is None:
            raise TokenizerError(
                f"tokenizer {self.path!r} does not define the special token {name!r} "
                f"(needed: {BOS_TOKEN}, {END_OF_TEXT_TOKEN}, {EOT_TOKEN})")
        return int(token_id)

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` become their ids; BOS only if asked."""
        if not isinstance(text, str):
            raise RefBitNetTypeError(f"encode: text must be str, found {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else list(ids)

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

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` -> ids.

        ``<|begin_of_text|>`` + for each message ``Role: content.strip()<|eot_id|>`` + (if asked)
        ``Assistant: ``. Same ids as transformers' ``apply_chat_template`` with the released
        template: the text between special tokens is tokenized piece by piece, exactly as a
        tokenizer splits a rendered template string at its special tokens.
        """
        if isinstance(messages, Mapping) or isinstance(messages, str):
            raise RefBitNetTypeError(
                "apply_chat_template: messages must be a list of {'role', 'content'} dicts, "
                f"found {type(messages).__name__}")
        if len(messages) == 0:  # as transformers: an empty chat is an error, not a bare prompt
            raise TokenizerError("apply_chat_template: needs at least one message, found none")
        ids = [self.bos_id]
        for number, message in enumerate(messages):
            role, content = _check_message(message, number)
            ids += self.encode(f"{CHAT_ROLES[role]}: {content.strip()}")
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids += self.encode(GENERATION_PROMPT)
        return ids

    def text_stream(self) -> "TextStream":
        """A fresh incremental decoder for ids produced one at a time (see TextStream)."""
        return TextStream(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _check_message(message: object, number: int) -> tuple[str, str]:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise TokenizerError(
            f"apply_chat_template: message {number} must be a dict with 'role' and 'content', "
            f"found {message!r}")
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise TokenizerError(
            f"apply_chat_template: message {number} has role {role!r}; expected one of "
            f"{sorted(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise RefBitNetTypeError(
            f"apply_chat_template: message {number} content must be str, "
            f"found {type(content).__name__}")
    return role, content


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

