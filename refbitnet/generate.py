"""The generation loop: prefill the prompt once, then decode one token at a time from the KV cache.

    ids = model.generate(prompt, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=1, stream=True)
    for token_id in ids: ...            # an iterator: each new id as soon as it is chosen

``Model.generate`` (refbitnet.api) is the API; it calls ``generate`` below, which works on any object
with the few attributes listed next (the tests drive it with scripted logits).

What the loop needs from ``model``: ``model.config.max_position_embeddings``, ``vocab_size`` and ``eos_ids``,
``model.new_cache(max_tokens[, kv_dtype]) -> cache`` and ``model.forward(ids [S], cache=cache) -> logits [S, V]``
(appending to the cache); ``model.tokenizer`` only for the default stop ids and for stop strings.

Stopping, whichever comes first:
- ``max_new_tokens`` ids have been yielded;
- the chosen id is a stop id (default: the tokenizer's end-of-turn and end-of-text ids, e.g.
  ``<|eot_id|>`` and ``<|end_of_text|>``, plus any ids in ``stop``). The stop id itself is not yielded;
- the text of the yielded ids contains a stop string (the strings in ``stop``). As in transformers' ``stop_strings``, the
  id that completes the stop string is yielded (its text is part of the output), then the loop ends.

Prefill: the prompt goes through the model as one block of up to ``PREFILL_BLOCK`` tokens (longer
prompts in consecutive blocks through the same cache), because ``forward`` returns logits for every
position and at V = 128256 a 4096-token block would be 2.1 GB of float32 logits of which only the
last row is used.

A conversation: pass the same ``cache`` (``model.new_cache()``) to every turn with the whole conversation
as the prompt. The cached positions whose ids match the start of the prompt are kept
(``KVCache.keep_prefix``: their keys and values are exactly what a fresh prefill computes) and only the
rest of the prompt runs, so a turn costs its own tokens, not the conversation's. Where a turn's prompt
differs from what the cache holds (e.g. the reply re-tokenized differently, or old turns dropped to
fit the context), the prefill restarts at the first differing position.

Every argument is checked when ``generate`` is called, before the cache is allocated or any forward
pass runs; only the iteration itself does work.
"""


from __future__ import annotations

from typing import Iterator

import numpy as np

from .checks import check_int, check_token_ids
from .errors import RefBitNetError, RefBitNetTypeError, TokenizerError
from .kv_cache import KVCache, check_kv_dtype
from .sampling import Sampler

PREFILL_BLOCK = 512   # tokens per prefill forward: bounds one block's activations ([512, F] float32 per op)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop=None, ignore_eos: bool = False,
             kv_dtype: str | None = None, cache=None) -> Iterator[int]:
    """Validate everything, then return an iterator over the new token ids (see module docstring).

    ``Model.generate`` is this function (with text prompts encoded first). stop: extra stop conditions,
    a string, a token id, or a sequence of them, added to the default stop ids (the tokenizer's
    end-of-turn ids, else the config's eos ids) unless ignore_eos. kv_dtype: the KV cache's element type,
    "float32" or "float16" (``model.new_cache``); None: float32, exact. cache: a KVCache to continue
    (None: a new one for this call); it needs room for the prompt and max_new_tokens - 1 more positions."""
    prompt = check_token_ids(prompt_ids, model.config.vocab_size, "prompt_ids")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", lo=1)
    context = model.config.max_position_embeddings
    if len(prompt) + max_new_tokens > context:
        raise RefBitNetError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt) + max_new_tokens} exceeds the model's context of {context} tokens "
            f"(max_position_embeddings); shorten the prompt or ask for at most "
            f"{max(context - len(prompt), 0)} new tokens")
    sampler = Sampler(temperature, top_k, top_p, seed)
    tokenizer = getattr(model, "tokenizer", None)
    stop_ids, stop_strings = _check_stop(stop, ignore_eos, model, tokenizer)
    cache_args = {}
    if kv_dtype is not None:
        cache_args["kv_dtype"] = check_kv_dtype(kv_dtype).name
    if cache is not None:
        _check_cache(cache, len(prompt) + max_new_tokens - 1, cache_args.get("kv_dtype"))
    return _generate(model, prompt, max_new_tokens, sampler, stop_ids, stop_strings, tokenizer, cache_args,
                     cache)


def _generate(model, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler,
              stop_ids: frozenset[int], stop_strings: tuple[str, ...], tokenizer, cache_args,
              cache=None) -> Iterator[int]:
    if cache is None:
        # the last new token is never fed back, so the cache needs one slot less than this
        cache = model.new_cache(len(prompt) + max_new_tokens, **cache_args)
        first = 0
    else:   # continue: keep what matches the prompt, but run at least its last token (its logits are sampled)
        first = cache.keep_prefix(prompt[:-1])
    for start in range(first, len(prompt), PREFILL_BLOCK):     # prefill: usually a single block
        # only the last position's logits are sampled: the LM head runs on it alone
        logits = model.forward(prompt[start:start + PREFILL_BLOCK], cache=cache, last_only=True)  # [1, V]
    new_ids: list[int] = []
    while True:
        token_id = sampler(logits[-1])                     # [V] -> id
        if token_id in stop_ids:
            return
        new_ids.append(token_id)
        yield token_id
        if len(new_ids) == max_new_tokens or _ends_with_stop_string(new_ids, stop_strings, tokenizer):
            return
        logits = model.forward(np.array([token_id], dtype=np.int64), cache=cache)  # decode: [1, V]


def _check_cache(cache, positions: int, kv_dtype: str | None) -> None:
    if not isinstance(cache, KVCache):
        raise RefBitNetTypeError(f"cache: expected a KVCache from model.new_cache(), found {type(cache).__name__}")
    if positions > cache.capacity:
        raise RefBitNetError(f"cache: the prompt and max_new_tokens need {positions} positions, the cache holds "
                             f"{cache.capacity} (make it with model.new_cache(max_tokens))")
    if kv_dtype is not None and kv_dtype != cache.dtype:
        raise RefBitNetError(f"kv_dtype: {kv_dtype!r} given, but the cache passed stores {cache.dtype!r}")


def default_stop_ids(model, tokenizer) -> list[int]:
    """The ids that end generation unless ignore_eos: the tokenizer's end-of-turn / end-of-text ids, else
    the config's eos ids; and generation_config.json's eos ids (model.generation_defaults) where it has them."""
    ids = list(tokenizer.eos_ids) if tokenizer is not None else list(model.config.eos_ids)
    defaults = getattr(model, "generation_defaults", None)
    return ids + list(defaults.eos_token_id) if defaults is not None else ids


def _check_stop(stop, ignore_eos, model, tokenizer) -> tuple[frozenset[int], tuple[str, ...]]:
    """stop (None, a string, a token id, or a sequence of them) plus the default stop ids -> (ids, strings)."""
    if not isinstance(ignore_eos, bool):
        raise RefBitNetTypeError(f"ignore_eos: expected a bool, found {type(ignore_eos).__name__}")
    if stop is None or isinstance(stop, (str, int, np.integer)):
        items = [] if stop is None else [stop]
    elif isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
        raise RefBitNetTypeError(f"stop: expected a string, a token id or a sequence of them, "
                                 f"found {type(stop).__name__} {stop!r:.60}")
    else:
        items = list(stop)
    vocab_size = model.config.vocab_size
    ids = [] if ignore_eos else default_stop_ids(model, tokenizer)
    strings = []
    for item in items:
        if isinstance(item, str):
            if item == "":
                raise RefBitNetError("stop: expected non-empty stop strings, found ''")
            strings.append(item)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < vocab_size:
                raise TokenizerError(f"stop: token id {item} is outside the vocabulary [0, {vocab_size})")
            ids.append(int(item))
        else:
            raise RefBitNetTypeError(f"stop: expected strings or token ids, found {item!r:.60}")
    if strings and tokenizer is None:
        raise RefBitNetError("stop: stop strings need a tokenizer, but the model has none (model.tokenizer)")
    return frozenset(ids), tuple(strings)


def _ends_with_stop_string(new_ids: list[int], stop_strings: tuple[str, ...], tokenizer) -> bool:
    """Whether the text of the new ids now contains a stop string (it was absent one id ago).

    Only a tail of the ids is decoded: every token is at least one byte and a character at most
    four, so the last ``4 * len(stop) + 8`` ids hold the whole of any stop string that the last id
    completed, with room to spare at the front for a character cut in half by the window.
    """
    if not stop_strings:
        return False
    window = 4 * max(len(stop) for stop in stop_strings) + 8
    text = tokenizer.decode(new_ids[-window:])
    return any(stop in text for stop in stop_strings)
