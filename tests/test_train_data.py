"""Corpus, tokenizer and batches of refbitnet.train.data (on the standard library's pydoc_data text)."""

import numpy as np
import pytest

from refbitnet.errors import RefBitNetError
from refbitnet.tokenizer import Tokenizer
from refbitnet.train import data as D


@pytest.fixture(scope="module")
def docs():
    return D.pydoc_documents()[:15]


@pytest.fixture(scope="module")
def tok(docs):
    return D.train_tokenizer(docs, 400)


def test_tokenizer_specials_and_round_trip(docs, tok, tmp_path):
    assert tok.get_vocab_size() == 400
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = Tokenizer.from_file(path)                      # refbitnet's own tokenizer finds the specials by name
    assert (t.bos_id, t.end_of_text_id, t.eot_id) == (D.BOS_ID, D.END_OF_TEXT_ID, D.EOT_ID)
    text = docs[0][1][:500] + " héllo ☃"
    assert t.decode(t.encode(text)) == text            # byte-level: any text round-trips


def test_split_and_batches(docs, tok):
    train, val = D.encode_split(tok, docs, val_fraction=0.1)
    assert train.dtype == np.int32 and 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert train[0] == D.BOS_ID and val[-1] == D.END_OF_TEXT_ID
    x, y = D.sample_batch(train, 3, 20, np.random.default_rng(0))
    assert x.shape == y.shape == (3, 20)
    assert np.array_equal(x[:, 1:], y[:, :-1])         # targets are the inputs shifted by one
    x2, _ = D.sample_batch(train, 3, 20, np.random.default_rng(0))
    assert np.array_equal(x, x2)                       # seeded
    batches = list(D.eval_batches(val, 4, 16))
    n = (len(val) - 1) // 16
    assert sum(b[0].shape[0] for b in batches) == n
    assert np.array_equal(np.concatenate([b[0].reshape(-1) for b in batches]), val[: n * 16])


def test_unigram_baseline(docs, tok):
    train, val = D.encode_split(tok, docs)
    counts = np.bincount(train, minlength=400) + 1.0
    expected = -np.mean(np.log(counts / counts.sum())[val[1:]])
    assert D.unigram_loss(train, val, 400) == pytest.approx(expected, rel=1e-12)
    assert 3.0 < expected < np.log(400)


def test_bad_corpora_are_clear_errors(tok):
    with pytest.raises(RefBitNetError, match="non-empty list"):
        D.train_tokenizer([], 400)
    with pytest.raises(RefBitNetError, match="at least 1 characters"):
        D.train_tokenizer([("empty", "")], 400)
    with pytest.raises(RefBitNetError, match="vocab_size"):
        D.train_tokenizer([("a", "some text")], 100)
    train, val = D.encode_split(tok, [("short", "To be, or not.")])
    with pytest.raises(RefBitNetError, match="corpus too short: expected at least seq_len \\+ 1 = 65 tokens"):
        D.sample_batch(train, 2, 64, np.random.default_rng(0))
    with pytest.raises(RefBitNetError, match="validation data: corpus too short"):
        next(D.eval_batches(val, 2, 64))
    with pytest.raises(RefBitNetError, match="val_fraction"):
        D.encode_split(tok, [("a", "text")], val_fraction=1.5)


def test_sft_examples(docs):
    pairs = D.sft_examples(docs, 10, np.random.default_rng(0))
    assert 0 < len(pairs) <= 10
    assert all(p.startswith("Continue this passage from ") and a for p, a in pairs)
    with pytest.raises(RefBitNetError, match="too few lines"):
        D.sft_examples([("x", "short")], 10, np.random.default_rng(0))
