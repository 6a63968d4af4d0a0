"""Perplexity of a text, computed the way llama.cpp's ``llama-perplexity`` computes it, so the figures
can be put side by side with an engine's on the same file.

llama-perplexity's method (tools/perplexity/perplexity.cpp, the default mode without --ppl-stride):

1. The whole file is tokenized once, with a BOS first if the model adds one.
2. The ids are cut into ``n_chunk = len(ids) // n_ctx`` consecutive chunks of ``n_ctx`` ids; the tail
   shorter than a chunk is dropped, and the file must give at least two chunks (``2 * n_ctx`` ids).
3. Each chunk is run from an empty KV cache at positions 0 .. n_ctx - 1 with its first id replaced by BOS
   (so every chunk starts like a document; the replaced id is never a target).
4. Only the second half is scored: the logits at positions ``first = n_ctx // 2`` .. n_ctx - 2 predict
   ids first + 1 .. n_ctx - 1, i.e. ``n_ctx - first - 1`` predictions per chunk, each with at least
   n_ctx / 2 tokens of context.
5. Each prediction's negative log-likelihood is ``max + log(sum exp(logit - max)) - logit[target]``
   (exp in float32, the sum in float64). After each chunk the running estimate ``exp(mean nll)`` is
   reported; the final figure is ``PPL = exp(mean) +/- PPL * sqrt(var / (count - 1))`` (the standard
   error of the mean nll, carried through exp).

What it is not: llama.cpp's --ppl-stride, --kl-divergence, HellaSwag or Winogrande modes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import RefBitNetError

DEFAULT_CTX = 512       # llama.cpp's usual perplexity context (`-c 512` in its published tables)
FORWARD_BLOCK = 512     # tokens per forward call inside a chunk: bounds the [block, V] logits


@dataclass
class PerplexityResult:
    """ppl: exp(mean nll); ppl_error: its standard error as llama.cpp prints it; nll_mean in nats;
    count: predictions scored; chunks, n_ctx; n_tokens: ids in the file (with its BOS);
    running: the estimate after each chunk (llama.cpp's ``[1]x,[2]y,...``)."""
    ppl: float
    ppl_error: float
    nll_mean: float
    count: int
    chunks: int
    n_ctx: int
    n_tokens: int
    running: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f} "
                f"({self.chunks} chunks of {self.n_ctx} tokens, {self.count} predictions scored)")


def chunk_starts(n_tokens: int, n_ctx: int, max_chunks: int | None = None) -> list[int]:
    """Start offsets of the chunks llama-perplexity scores: n_tokens // n_ctx of them (at most max_chunks);
    fewer than 2 * n_ctx ids is an error, as there."""
    if n_ctx < 4:
        raise RefBitNetError(f"ctx: expected at least 4 tokens per chunk (half of it is scored), found {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise RefBitNetError(f"the text tokenizes to only {n_tokens} tokens; perplexity with a context of "
                             f"{n_ctx} needs at least {2 * n_ctx} (use a longer file or a smaller --ctx)")
    n_chunk = n_tokens // n_ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise RefBitNetError(f"chunks: expected at least 1, found {max_chunks}")
        n_chunk = min(n_chunk, max_chunks)
    return [i * n_ctx for i in range(n_chunk)]


def check_ctx(model, n_ctx) -> int:
    """n_ctx as an int, at most the model's context (max_position_embeddings)."""
    from .checks import check_int
    n_ctx = check_int(n_ctx, "ctx", lo=4)
    context = model.config.max_position_embeddings
    if n_ctx > context:
        raise RefBitNetError(f"ctx: {n_ctx} tokens exceeds the model's context of {context} "
                             f"(max_position_embeddings)")
    return n_ctx


def prediction_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target: logits float32 [N, V], targets int [N] -> float64 [N].

    As llama.cpp: max and logits in float32, exp(logit - max) in float32, their sum in float64."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = logits.max(axis=1, keepdims=True)                                        # [N, 1] float32
    sums = np.exp(logits - peak).sum(axis=1, dtype=np.float64)                       # [N]
    picked = logits[np.arange(len(targets)), targets]                                # [N] float32
    return peak[:, 0].astype(np.float64) + np.log(sums) - picked.astype(np.float64)


def chunk_logits(model, chunk_ids: np.ndarray, first: int, block: int = FORWARD_BLOCK,
                 kv_dtype: str = "float32") -> np.ndarray:
    """Logits float32 [n_ctx - first - 1, V] at positions first .. n_ctx - 2 of one chunk (ids [n_ctx]),
    run from an empty cache in blocks of at most `block` tokens; blocks before `first` skip the LM head."""
    n_ctx = len(chunk_ids)
    cache = model.new_cache(n_ctx, kv_dtype=kv_dtype)
    rows = []
    for start in range(0, n_ctx - 1, block):          # the last position predicts nothing inside the chunk
        stop = min(start + block, n_ctx - 1)
        if stop <= first:
            model.forward(chunk_ids[start:stop], cache=cache, last_only=True)      # fills the cache only
            continue
        logits = model.forward(chunk_ids[start:stop], cache=cache)                 # [stop - start, V]
        rows.append(logits[max(first - start, 0):])
    return np.concatenate(rows, axis=0)


def perplexity(model, ids: Sequence[int], n_ctx: int = DEFAULT_CTX, bos_id: int | None = None,
               max_chunks: int | None = None, block: int = FORWARD_BLOCK, kv_dtype: str = "float32",
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of the ids of a whole file (already tokenized, with its BOS) by llama-perplexity's method.

    bos_id: the id each chunk starts with (None: the chunk's own first id, as llama.cpp without add_bos).
    kv_dtype: the KV cache's element type, "float32" (exact) or "float16" (llama.cpp's default cache).
    on_chunk(done, total, running_ppl) is called after each chunk (progress reports).
    """
    ids = model.check_ids(ids)                          # int64 [N], each in [0, V)
    n_ctx = check_ctx(model, n_ctx)
    starts = chunk_starts(len(ids), n_ctx, max_chunks)
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running = []
    for number, start in enumerate(starts, 1):
        chunk = ids[start:start + n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id                           # every chunk starts like a document
        logits = chunk_logits(model, chunk, first, block, kv_dtype)                   # [n_ctx - first - 1, V]
        nll = prediction_nll(logits, chunk[first + 1:])                               # [n_ctx - first - 1]
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += len(nll)
        running.append(math.exp(nll_sum / count))
        if on_chunk is not None:
            on_chunk(number, len(starts), running[-1])
    mean = nll_sum / count
    variance = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    error = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, ppl_error=error, nll_mean=mean, count=count, chunks=len(starts),
                            n_ctx=n_ctx, n_tokens=len(ids), running=running)


def tokenize_file_text(tokenizer, text: str) -> list[int]:
    """The file's ids as llama-perplexity tokenizes them: the whole text at once, BOS first if the model
    adds one (``tokenizer.add_bos``), special-token strings in the text read as plain text."""
    return tokenizer.encode(text, add_bos=tokenizer.add_bos, parse_special=False)


class ProgressBar:
    """A one-line progress bar on a stream (stderr): done/total, elapsed, ETA and a running figure.

    On a terminal the line is redrawn in place; otherwise (a pipe, a log file) one line per update, at
    most every `min_interval` seconds and always the last, so logs stay short."""

    def __init__(self, total: int, label: str, stream=None, width: int = 24, min_interval: float = 5.0):
        import sys
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = 0.0 if self.tty else min_interval
        self.start = time.perf_counter()
        self._last = -math.inf

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self._last < self.min_interval:
            return
        self._last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"{self.label} [{bar}] {done}/{self.total} {elapsed:.1f} s"
                + (f", ETA {eta:.1f} s" if done < self.total and done else "") + (f" | {note}" if note else ""))
        end = "\n" if (not self.tty or done >= self.total) else ""
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + end)
        self.stream.flush()
