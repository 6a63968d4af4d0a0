"""refbitnet.perplexity against a hand computation of llama-perplexity's method on a tiny random model."""

import io
import math

import numpy as np
import pytest
from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors

from refbitnet.checkpoint import model_from_tensors
from refbitnet.errors import RefBitNetError
from refbitnet.perplexity import ProgressBar, chunk_starts, perplexity, prediction_nll

SIZES = TINY_CONFIGS["gqa"]          # V = 256, context 128


@pytest.fixture(scope="module")
def model():
    return model_from_tensors(numpy_config(SIZES), numpy_release_tensors(SIZES, 3), source="tiny")


def hand_perplexity(model, ids, n_ctx, bos):
    """llama-perplexity written out: n // n_ctx chunks, BOS over each chunk's first id, one full forward
    from scratch per chunk, logits at n_ctx//2 .. n_ctx-2 scored against the next ids, log-softmax in
    float64."""
    nlls = []
    for c in range(len(ids) // n_ctx):
        chunk = list(ids[c * n_ctx:(c + 1) * n_ctx])
        chunk[0] = bos
        logits = model.forward(np.array(chunk)).astype(np.float64)          # [n_ctx, V]
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j]
            log_z = row.max() + math.log(np.exp(row - row.max()).sum())
            nlls.append(log_z - row[chunk[j + 1]])
    nlls = np.array(nlls)
    return math.exp(nlls.mean()), nlls


@pytest.mark.parametrize("n_tokens, n_ctx, block", [(37, 8, 512), (40, 10, 3), (64, 16, 5), (33, 11, 4)])
def test_equals_the_hand_computation(model, n_tokens, n_ctx, block):
    ids = np.random.default_rng(n_tokens).integers(0, 256, size=n_tokens)
    ids[0] = 1                                                               # the file's BOS
    result = perplexity(model, ids, n_ctx=n_ctx, bos_id=1, block=block)
    expected, nlls = hand_perplexity(model, ids, n_ctx, bos=1)
    assert result.chunks == n_tokens // n_ctx
    assert result.count == result.chunks * (n_ctx - n_ctx // 2 - 1) == len(nlls)
    # exp in float32 (as llama.cpp) vs float64 here: a few float32 ulps of each nll
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert result.running[-1] == result.ppl
    assert result.running[0] == pytest.approx(math.exp(nlls[:n_ctx - n_ctx // 2 - 1].mean()), rel=1e-6)
    sem = math.sqrt(nlls.var() / (len(nlls) - 1))                         # llama.cpp's +/-
    assert result.ppl_error == pytest.approx(expected * sem, rel=1e-4)


def test_chunking_and_scored_positions(model):
    # 2 chunks of 8 from 23 ids (the 7-id tail dropped); only ids 5, 6, 7 of each chunk are targets, so
    # changing any other id after the chunk's prefix changes nothing, and the chunk's first id never counts
    ids = np.arange(23) % 200 + 3
    base = perplexity(model, ids, n_ctx=8, bos_id=1)
    tail = ids.copy()
    tail[16:] = 9                                                            # the dropped tail
    assert perplexity(model, tail, n_ctx=8, bos_id=1).ppl == base.ppl
    first = ids.copy()
    first[[0, 8]] = 77                                                       # replaced by BOS anyway
    assert perplexity(model, first, n_ctx=8, bos_id=1).ppl == base.ppl
    target = ids.copy()
    target[8 + 7] = 42                                                       # a scored id of chunk 2
    assert perplexity(model, target, n_ctx=8, bos_id=1).ppl != base.ppl
    assert chunk_starts(23, 8) == [0, 8] and chunk_starts(100, 8, max_chunks=3) == [0, 8, 16]


def test_prediction_nll_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 10).astype(np.float32)
    targets = rng.integers(0, 300, 5)
    x = logits.astype(np.float64)
    want = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - x[np.arange(5), targets]
    np.testing.assert_allclose(prediction_nll(logits, targets), want, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=list(range(15)), n_ctx=8), "only 15 tokens.*at least 16"),
    (dict(ids=[5] * 300, n_ctx=200), "exceeds the model's context of 128"),
    (dict(ids=list(range(30)), n_ctx=3), "ctx: expected 4 <= ctx"),
    (dict(ids=list(range(30)), n_ctx=8, max_chunks=0), "chunks: expected at least 1"),
    (dict(ids=[1, 2, 999] * 10, n_ctx=8), r"\[0, 256\)"),
])
def test_bad_input(model, kwargs, match):
    with pytest.raises(RefBitNetError, match=match):
        perplexity(model, **kwargs)


def test_progress_callback_and_bar(model):
    seen = []
    perplexity(model, np.arange(40) % 250, n_ctx=8, bos_id=1, on_chunk=lambda *a: seen.append(a))
    assert [(d, t) for d, t, _ in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    out = io.StringIO()
    bar = ProgressBar(5, "perplexity", stream=out, min_interval=0)
    for d, _, ppl in seen:
        bar.update(d, f"PPL {ppl:.4f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("perplexity [#") and f"PPL {seen[-1][2]:.4f}" in lines[-1]


def test_float16_kv_cache_as_llama_cpp_stores_it(model):
    # keys and values rounded to float16 when stored: the same chunks, a nearby figure (not the same bits)
    ids = np.random.default_rng(5).integers(0, 256, size=48)
    exact = perplexity(model, ids, n_ctx=16, bos_id=1)
    half = perplexity(model, ids, n_ctx=16, bos_id=1, kv_dtype="float16")
    assert half.count == exact.count and half.nll_mean == pytest.approx(exact.nll_mean, rel=1e-2)


def test_the_file_is_tokenized_as_llama_perplexity_does():
    # one encode of the whole text, BOS first, a special token's spelling in the text is plain text
    import refbitnet
    from refbitnet.perplexity import tokenize_file_text
    tok = refbitnet.load().tokenizer
    ids = tokenize_file_text(tok, "To be<|eot_id|>, or not")
    assert ids[0] == tok.bos_id and tok.eot_id not in ids
    assert tok.decode(ids[1:]) == "To be<|eot_id|>, or not"
    assert tok.eot_id in tok.encode("To be<|eot_id|>")                       # chat text parses it
