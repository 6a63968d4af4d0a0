"""The architecture name an export writes, and what `info` says each engine builds for it.

Engines choose their compute graph by general.architecture alone (refbitnet.gguf.mapping.ARCH_GRAPHS):
"bitnet-b1.58" is 2B4T's ReLU²-gated FFN in bitnet.cpp and ik_llama.cpp; "bitnet" is a SiLU-gated FFN
in every engine, upstream llama.cpp included. So every layout is written as "bitnet-b1.58", and
"bitnet" only when asked, with an EngineGraphWarning.
"""

import warnings

import numpy as np
import pytest

from refbitnet.errors import GGUFError
from refbitnet.gguf import describe, gguf_to_tensors, main, read_gguf, write_gguf
from refbitnet.gguf.mapping import (ARCH_GRAPHS, BITNET_ARCHS, ENGINES, GRAPH_2B4T, GRAPH_SILU,
                                    EngineGraphWarning)
from test_gguf import TINY, release_tensors

LAYOUTS = ("i2_s", "tq2_0", "tq1_0")


@pytest.fixture(scope="module")
def tensors():
    return release_tensors(TINY, seed=11)


def assert_same_codes(back, tensors):
    for name, a in tensors.items():
        if a.dtype == np.uint8:
            assert np.array_equal(back[name], a), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_written_as_bitnet_b158(tmp_path, tensors, layout):
    path = tmp_path / f"{layout}.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the default writes no warning
        write_gguf(path, TINY, tensors, layout=layout)
    gf = read_gguf(path)
    assert gf.metadata["general.architecture"] == "bitnet-b1.58"
    assert gf.metadata["bitnet-b1.58.block_count"] == TINY.num_hidden_layers
    assert gf.metadata["bitnet-b1.58.hidden_activation"] == "relu2"     # llama.cpp's key for the FFN act
    assert not any("rope.scaling" in k for k in gf.metadata)
    config, back = gguf_to_tensors(path)
    assert config == TINY
    assert_same_codes(back, tensors)          # the codes round-trip unchanged


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitnet_only_when_asked_and_with_a_warning(tmp_path, tensors, layout):
    path = tmp_path / f"{layout}-bitnet.gguf"
    with pytest.warns(EngineGraphWarning, match=r"arch 'bitnet'.*SiLU-gated FFN.*not 2B4T's ReLU²"):
        write_gguf(path, TINY, tensors, layout=layout, arch="bitnet")
    gf = read_gguf(path)
    assert gf.metadata["general.architecture"] == "bitnet"
    assert gf.metadata["bitnet.rope.scaling.type"] == "linear"          # as llama.cpp's converter writes
    assert gf.metadata["bitnet.hidden_activation"] == "relu2"
    config, back = gguf_to_tensors(path)
    assert config == TINY
    assert_same_codes(back, tensors)
    b158 = tmp_path / f"{layout}-b158.gguf"
    write_gguf(b158, TINY, tensors, layout=layout)
    _, back158 = gguf_to_tensors(b158)                   # the same tensors under either name
    assert all(np.array_equal(np.asarray(back158[k]), np.asarray(back[k])) for k in back)


def test_bitnet_25_is_2b4t_too_and_other_names_are_refused(tmp_path, tensors):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_gguf(tmp_path / "b25.gguf", TINY, tensors, layout="tq2_0", arch="bitnet-25")
    assert read_gguf(tmp_path / "b25.gguf").metadata["general.architecture"] == "bitnet-25"
    with pytest.raises(GGUFError, match=r"arch: expected one of \['bitnet-b1.58', 'bitnet-25', 'bitnet'\], "
                                        r"found 'llama'"):
        write_gguf(tmp_path / "llama.gguf", TINY, tensors, arch="llama")


def test_engine_table():
    assert set(ARCH_GRAPHS) == set(BITNET_ARCHS)
    for arch, graphs in ARCH_GRAPHS.items():
        assert set(graphs) == set(ENGINES), arch
    assert all(g == GRAPH_SILU for g in ARCH_GRAPHS["bitnet"].values())
    for arch in ("bitnet-b1.58", "bitnet-25"):
        assert ARCH_GRAPHS[arch]["bitnet.cpp"] == ARCH_GRAPHS[arch]["ik_llama.cpp"] == GRAPH_2B4T
        assert ARCH_GRAPHS[arch]["llama.cpp"] is None                   # upstream refuses the name


def test_info_says_what_each_engine_builds(tmp_path, tensors):
    write_gguf(tmp_path / "i2s.gguf", TINY, tensors, layout="i2_s")
    write_gguf(tmp_path / "tq2.gguf", TINY, tensors, layout="tq2_0")
    with pytest.warns(EngineGraphWarning):
        write_gguf(tmp_path / "tq2-bitnet.gguf", TINY, tensors, layout="tq2_0", arch="bitnet")
        write_gguf(tmp_path / "i2s-bitnet.gguf", TINY, tensors, layout="i2_s", arch="bitnet")

    def engines(name):
        lines = describe(tmp_path / name).splitlines()
        return {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}

    refused = "refuses the file: architecture 'bitnet-b1.58' is unknown to it"
    assert engines("tq2.gguf") == {"bitnet.cpp": GRAPH_2B4T, "ik_llama.cpp": GRAPH_2B4T, "llama.cpp": refused}
    assert engines("i2s.gguf")["llama.cpp"].startswith("refuses the file: architecture")
    assert engines("tq2-bitnet.gguf") == {e: GRAPH_SILU for e in ENGINES}
    assert engines("i2s-bitnet.gguf")["llama.cpp"] == ("refuses the file: tensor type I2_S (type 36) is "
                                                       "unknown to it")


def test_command_line_arch(tmp_path, capsys):
    from refbitnet.checkpoint import save_checkpoint
    from test_gguf import latent_weights
    save_checkpoint(tmp_path / "ckpt", TINY, latent_weights(TINY))
    out = tmp_path / "cli.gguf"
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--layout", "tq2_0", "--arch", "bitnet"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: arch 'bitnet'") and "SiLU-gated FFN" in captured.err
    assert "architecture: 'bitnet', which selects in each engine:" in captured.out
    assert read_gguf(out).metadata["general.architecture"] == "bitnet"
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--layout", "tq1_0"]) == 0
    assert capsys.readouterr().err == ""
    assert read_gguf(out).metadata["general.architecture"] == "bitnet-b1.58"


def test_a_file_that_says_another_activation_is_refused(tmp_path):
    from test_gguf import gguf_bytes, hand_built_model
    kv, tensors, *_ = hand_built_model(TINY)
    path = tmp_path / "silu.gguf"
    path.write_bytes(gguf_bytes(kv + [("bitnet-b1.58.hidden_activation", 8, "silu")], tensors))
    with pytest.raises(GGUFError, match=r"hidden_activation: expected 'relu2'.*found 'silu'"):
        gguf_to_tensors(path)
    path.write_bytes(gguf_bytes(kv + [("bitnet-b1.58.hidden_activation", 8, "relu2")], tensors))
    assert gguf_to_tensors(path)[0] == TINY


def test_progress_and_a_tokenizer_rebuilt_from_gguf(tmp_path, tensors):
    """save_gguf reports each tensor, then the written file; a model loaded from a GGUF file (its
    tokenizer rebuilt from metadata, no tokenizer.json behind it) exports with its tokenizer."""
    from refbitnet.gguf import load_gguf, save_gguf
    from test_gguf import TEXTS, make_tokenizer_json
    first = tmp_path / "first.gguf"
    tok_file = make_tokenizer_json(tmp_path, TINY.vocab_size - 10)
    write_gguf(first, TINY, tensors, layout="i2_s", tokenizer_file=tok_file)
    model = load_gguf(first, backend="numpy")
    calls = []
    second = tmp_path / "second.gguf"
    save_gguf(model, second, layout="tq2_0", progress=lambda *call: calls.append(call))
    per_layer = 4 + 7
    total = 2 + TINY.num_hidden_layers * per_layer + 1
    assert [c[0] for c in calls] == list(range(1, total + 1)) and all(c[1] == total for c in calls)
    assert calls[0][2] == "token_embd.weight" and calls[-1][2] == str(second)
    again = load_gguf(second, backend="numpy")
    assert again.tokenizer is not None
    for text in TEXTS:
        assert again.tokenizer.encode(text) == model.tokenizer.encode(text), text
    assert np.array_equal(again.forward(np.arange(8)), model.forward(np.arange(8)))
