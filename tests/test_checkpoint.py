"""Reading and writing model directories: formats, round trips, and bad input.

Every bad-input test checks that the exception names the file (or source), the tensor, what was
expected and what was found.
"""

import json
import os
import shutil

import numpy as np
import pytest

import refbitnet
from refbitnet.bf16 import bf16_to_f32, f32_to_bf16
from refbitnet.checkpoint import (model_from_tensors, read_safetensors, save_checkpoint, write_safetensors)
from refbitnet.config import Config
from refbitnet.errors import CheckpointError, ConfigError, RefBitNetTypeError, TokenizerError

from _tiny_bitnet import TINY_CONFIGS, numpy_config, numpy_release_tensors, projection_shapes

SIZES = TINY_CONFIGS["odd_sizes"]


def _write_dir(directory, tensors, config=None, quantization_mode="offline"):
    config = config or numpy_config(SIZES)
    os.makedirs(directory, exist_ok=True)
    d = config.to_dict()
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": quantization_mode}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(d, f)
    dtypes = {np.dtype(np.uint16): "BF16", np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    write_safetensors(os.path.join(directory, "model.safetensors"),
                      [(k, dtypes[v.dtype], v.shape, v) for k, v in tensors.items()])
    return str(directory)


@pytest.fixture
def packed_dir(tmp_path):
    return _write_dir(tmp_path / "packed", numpy_release_tensors(SIZES, 5))


def _master_tensors(seed=7):
    """A bf16 master: the release names with real-valued bf16 [N, K] projections and no weight_scale."""
    rng = np.random.default_rng(seed)
    t = {k: v for k, v in numpy_release_tensors(SIZES, seed).items() if not k.endswith(("_proj.weight", "weight_scale"))}
    for i in range(SIZES["num_hidden_layers"]):
        for proj, (n, k) in projection_shapes(SIZES).items():
            t[f"model.layers.{i}.{proj}.weight"] = f32_to_bf16((rng.standard_normal((n, k)) * 0.05).astype(np.float32))
    return t


def _ids(n=11, seed=0):
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], n)


# ----------------------------------------------------------------------------------- formats and round trips

def test_packed_load_is_memory_mapped_and_reports_format(packed_dir):
    model = refbitnet.load(packed_dir)
    assert model.source_format == "packed"
    assert isinstance(model.weights.embed_tokens, np.memmap) and model.weights.embed_tokens.dtype == np.uint16
    assert isinstance(model.weights.layers[0].q_proj.packed, np.memmap)
    assert model.weights.layers[0].q_proj.packed.dtype == np.uint8


@pytest.mark.parametrize("numerics", ["int", "fake-quant"])
def test_bf16_master_and_its_packed_export_give_identical_logits(tmp_path, numerics):
    master_tensors = _master_tensors()
    master_dir = _write_dir(tmp_path / "master", master_tensors, quantization_mode="online")
    master = refbitnet.load(master_dir, numerics=numerics)
    assert master.source_format == "bf16-master"
    # export 1: refbitnet.save of the loaded master
    refbitnet.save(master, tmp_path / "export")
    exported = refbitnet.load(tmp_path / "export", numerics=numerics)
    assert exported.source_format == "packed"
    # export 2: save_checkpoint from the master's latent weights (what a trainer does)
    save_checkpoint(tmp_path / "export2", master.config, {k: bf16_to_f32(v) for k, v in master_tensors.items()})
    exported2 = refbitnet.load(tmp_path / "export2", numerics=numerics)
    ids = _ids()
    want = master.forward(ids)
    assert np.array_equal(exported.forward(ids), want)
    assert np.array_equal(exported2.forward(ids), want)
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                                       "quantization_mode": "offline"}


def test_master_weight_scale_is_bf16_rounded_absmean():
    from refbitnet.quant import absmean_ternary
    t = _master_tensors()
    model = model_from_tensors(numpy_config(SIZES), t, source="master")
    w = bf16_to_f32(t["model.layers.1.mlp.down_proj.weight"])
    codes, gamma = absmean_ternary(w)
    proj = model.weights.layers[1].down_proj
    assert np.array_equal(proj.codes(), codes)
    assert proj.weight_scale == bf16_to_f32(f32_to_bf16(np.float32(gamma)))


def test_save_load_round_trip_is_exact_and_files_are_standard_safetensors(packed_dir, tmp_path):
    model = refbitnet.load(packed_dir)
    refbitnet.save(model, tmp_path / "again")
    again = refbitnet.load(tmp_path / "again")
    assert np.array_equal(again.forward(_ids()), model.forward(_ids()))
    original, written = read_safetensors(os.path.join(packed_dir, "model.safetensors")), \
        read_safetensors(tmp_path / "again" / "model.safetensors")
    assert original.keys() == written.keys()
    for key in original:
        assert np.array_equal(original[key], written[key]), key
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    loaded = safetensors_torch.load_file(str(tmp_path / "again" / "model.safetensors"))
    assert loaded["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert loaded["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.bfloat16
    emb = loaded["model.embed_tokens.weight"].float().numpy()
    assert np.array_equal(emb, bf16_to_f32(np.asarray(original["model.embed_tokens.weight"])))


def test_sharded_checkpoint_loads_like_a_single_file(packed_dir, tmp_path):
    tensors = read_safetensors(os.path.join(packed_dir, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(packed_dir, "config.json"), sharded / "config.json")
    dtypes = {np.dtype(np.uint16): "BF16", np.dtype(np.uint8): "U8"}
    for shard, keys in shards.items():
        write_safetensors(sharded / shard, [(k, dtypes[tensors[k].dtype], tensors[k].shape, tensors[k]) for k in keys])
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert np.array_equal(refbitnet.load(sharded).forward(_ids()), refbitnet.load(packed_dir).forward(_ids()))
    index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00003-of-00002.safetensors: file not found"):
        refbitnet.load(sharded)


def test_transformers_reads_what_refbitnet_writes(packed_dir, tmp_path):
    """refbitnet.save output is a checkpoint transformers loads and runs (fake-quant logits within 1e-5)."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from _tiny_bitnet import load_transformers
    model = refbitnet.load(packed_dir, numerics="fake-quant")
    refbitnet.save(model, tmp_path / "for_hf")
    hf = load_transformers(str(tmp_path / "for_hf"))
    ids = _ids(16)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    ours = model.forward(ids)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"refbitnet-written checkpoint in transformers: relative max|diff| of logits {rel:.1e}")
    assert rel <= 1e-5


def test_tokenizer_json_is_loaded_and_saved(packed_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "hello", "world"] + specials)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(os.path.join(packed_dir, "tokenizer.json"))
    config_path = os.path.join(packed_dir, "config.json")     # config.json's ids name the same specials
    config = json.load(open(config_path))
    json.dump(dict(config, bos_token_id=3, eos_token_id=4), open(config_path, "w"))
    model = refbitnet.load(packed_dir)
    assert model.tokenizer is not None and model.tokenizer.encode("hello world") == [1, 2]
    new_ids = model.generate("hello world", 4)                    # text prompt: encoded with BOS
    cache = model.new_cache(8)
    logits = model.forward([3, 1, 2], cache=cache)
    first = int(np.argmax(logits[-1]))
    assert new_ids[:1] == ([] if first in model.tokenizer.eos_ids else [first])
    refbitnet.save(model, tmp_path / "with_tok")
    assert (tmp_path / "with_tok" / "tokenizer.json").read_bytes() == \
        open(os.path.join(packed_dir, "tokenizer.json"), "rb").read()


def test_in_memory_tokenizer_is_written_on_save(tmp_path):
    # A tokenizer with no file behind it (e.g. rebuilt from a GGUF file's keys) is saved, not dropped.
    tokenizers = pytest.importorskip("tokenizers")
    from refbitnet.tokenizer import Tokenizer
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "hello", "world"] + specials)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    model = model_from_tensors(numpy_config(SIZES).replace(bos_token_id=3, eos_token_id=4),
                               numpy_release_tensors(SIZES, 5), source="memory",
                               tokenizer=Tokenizer(backend))
    refbitnet.save(model, tmp_path / "saved")
    loaded = refbitnet.load(tmp_path / "saved")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("hello world") == [1, 2]
    assert loaded.tokenizer.eos_ids == model.tokenizer.eos_ids == (5, 4)


def test_load_without_path_explains_what_to_pass(monkeypatch, tmp_path):
    """A build without refbitnet/shipped: load() says what to pass (the package is pointed at an empty
    directory, since this build does ship a model)."""
    import refbitnet as rb
    from refbitnet import loading
    monkeypatch.setattr(loading, "SHIPPED", tmp_path / "shipped")
    with pytest.raises(CheckpointError, match="pass a model directory"):
        rb.load()


# ----------------------------------------------------------------------------------- bad input

def test_missing_directory_and_files(tmp_path, packed_dir):
    with pytest.raises(CheckpointError, match="expected a model directory"):
        refbitnet.load(tmp_path / "nope")
    os.remove(os.path.join(packed_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        refbitnet.load(packed_dir)
    os.remove(os.path.join(packed_dir, "config.json"))
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        refbitnet.load(packed_dir)


def test_truncated_file_names_file_and_tensor(packed_dir):
    path = os.path.join(packed_dir, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor [\w.]+: truncated file"):
        refbitnet.load(packed_dir)
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: expected an 8-byte header length, "
                                              r"found a 5-byte file"):
        refbitnet.load(packed_dir)


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000000 bytes, but the file has 10 bytes"):
        read_safetensors(path)
    path.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_safetensors(path)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(10))
    with pytest.raises(CheckpointError, match=r"tensor w: expected 12 bytes for BF16 \[2, 3\], found data_offsets "
                                              r"\[0, 10\]"):
        read_safetensors(path)
    header = json.dumps({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(2))
    with pytest.raises(CheckpointError, match="tensor w: unsupported dtype: expected one of .* found 'Q4'"):
        read_safetensors(path)


def _load_modified(tmp_path, change, config=None):
    tensors = numpy_release_tensors(SIZES, 5)
    change(tensors)
    return refbitnet.load(_write_dir(tmp_path / "m", tensors, config=config))


def test_wrong_projection_shape(tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"

    def change(t):
        t[name] = np.zeros((12, 100), np.uint8)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: expected shape \[12, 120\] \(from the config\), "
                                              rf"found \[12, 100\]"):
        _load_modified(tmp_path, change)


def test_wrong_dtype(tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def change(t):
        t[name] = np.zeros((24, 48), np.float32)        # a float [N, K] among packed projections
    with pytest.raises(CheckpointError, match=rf"tensor {name}: expected dtype uint8 \(packed format, like layer 0 "
                                              rf"q_proj\), found float32"):
        _load_modified(tmp_path, change)

    def no_scale(t):
        del t["model.layers.1.mlp.up_proj.weight_scale"]
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight_scale: missing"):
        _load_modified(tmp_path, no_scale)

    def bad_scale(t):
        t["model.layers.0.mlp.up_proj.weight_scale"] = f32_to_bf16(np.array([np.nan], np.float32))
    with pytest.raises(CheckpointError, match="up_proj.weight_scale: expected a positive finite scale, found nan"):
        _load_modified(tmp_path, bad_scale)


def test_invalid_packed_code(tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight"

    def change(t):
        t[name] = t[name].copy()
        t[name][2, 5] = 0xFF
    with pytest.raises(CheckpointError, match=rf"tensor {name}: expected 2-bit codes in \{{0, 1, 2\}}, found byte "
                                              rf"0xff .* at \[2, 5\]"):
        _load_modified(tmp_path, change)


def test_config_contradicting_tensors(tmp_path):
    more_layers = numpy_config(SIZES).replace(num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.2\.input_layernorm\.weight: missing"):
        _load_modified(tmp_path, lambda t: None, config=more_layers)
    fewer_layers = numpy_config(SIZES).replace(num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) for a config with 1 layers .*model\.layers\.1\."):
        _load_modified(tmp_path, lambda t: None, config=fewer_layers)
    other_vocab = numpy_config(SIZES).replace(vocab_size=400)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: expected shape \[400, 48\] \(from the "
                                              r"config\), found \[333, 48\]"):
        _load_modified(tmp_path, lambda t: None, config=other_vocab)
    untied = numpy_config(SIZES).replace(tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight: missing"):
        _load_modified(tmp_path, lambda t: None, config=untied)


def test_token_ids_are_validated(packed_dir):
    model = refbitnet.load(packed_dir)
    with pytest.raises(TokenizerError, match=r"expected token ids in \[0, 333\) \(vocab_size\), found 333 at position 2"):
        model.forward([1, 2, 333])
    with pytest.raises(TokenizerError, match="found -1 at position 0"):
        model.forward(np.array([-1, 4]))
    with pytest.raises(RefBitNetTypeError, match="expected integer token ids, found dtype float64"):
        model.forward(np.array([1.0, 2.0]))
    with pytest.raises(RefBitNetTypeError, match="found a string"):
        model.forward("hello")
    with pytest.raises(refbitnet.errors.RefBitNetError, match=r"expected a 1-D sequence \[S\]"):
        model.forward(np.zeros((2, 3), np.int64))
    with pytest.raises(refbitnet.errors.RefBitNetError, match="empty"):
        model.forward([])
    cache = model.new_cache(8)
    with pytest.raises(TokenizerError):
        model.forward([5, 1000], cache=cache)
    assert cache.length == 0


def test_model_from_tensors_rejects_non_arrays():
    with pytest.raises(RefBitNetTypeError, match="tensors: expected a mapping"):
        model_from_tensors(numpy_config(SIZES), [1, 2], source="x")
    with pytest.raises(RefBitNetTypeError, match="config: expected a refbitnet Config"):
        model_from_tensors(SIZES, {}, source="x")
    t = numpy_release_tensors(SIZES, 0)
    t["model.norm.weight"] = [1.0] * 48
    with pytest.raises(CheckpointError, match=r"gguf:x: tensor model\.norm\.weight: expected a numpy array, found list"):
        model_from_tensors(numpy_config(SIZES), t, source="gguf:x")


def test_float32_tables_and_scales_are_kept_exactly(tmp_path):
    """A GGUF import may hand float32 scales and float16 embeddings: used as given and saved without loss."""
    t = numpy_release_tensors(SIZES, 3)
    t["model.embed_tokens.weight"] = np.random.default_rng(0).standard_normal((333, 48)).astype(np.float16)
    t["model.layers.0.self_attn.q_proj.weight_scale"] = np.array([0.123456789], np.float32)
    model = model_from_tensors(numpy_config(SIZES), t, source="gguf:test")
    assert model.weights.layers[0].q_proj.weight_scale == np.float32(0.123456789)
    refbitnet.save(model, tmp_path / "kept")
    again = refbitnet.load(tmp_path / "kept")
    assert np.array_equal(again.forward(_ids()), model.forward(_ids()))


def test_save_checkpoint_validates_names_and_config(tmp_path):
    cfg = numpy_config(SIZES)
    weights = {k: bf16_to_f32(v) for k, v in _master_tensors().items()}
    del weights["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: missing"):
        save_checkpoint(tmp_path / "x", cfg, weights)
    with pytest.raises(RefBitNetTypeError, match="config"):
        save_checkpoint(tmp_path / "x", {"hidden_size": 48}, weights)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_config_json_key_variants(tmp_path):
    d = numpy_config(SIZES).to_dict()
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Config.from_json(tmp_path / "config.json") == numpy_config(SIZES)


# ----------------------------------------------------------------------------------- reading mapped tables

def _mapped_table(tmp_path, rows, cols, offset=24):
    """A uint16 [rows, cols] table written after `offset` header bytes and opened as np.memmap, as
    checkpoint.read_safetensors opens a tensor; and its values in memory."""
    values = np.random.default_rng(1).integers(0, 0x7F00, (rows, cols)).astype(np.uint16)
    path = tmp_path / "table.bin"
    with open(path, "wb") as f:
        f.write(b"h" * offset + values.tobytes())
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(rows, cols)), values


def test_read_rows_of_a_mapped_table_reads_the_right_bytes(tmp_path):
    from refbitnet.weights import in_memory, read_rows
    mapped, values = _mapped_table(tmp_path, 37, 10)
    for r0, r1 in ((0, 37), (0, 1), (5, 6), (11, 30), (36, 37), (20, 20)):
        rows = read_rows(mapped, r0, r1)
        assert type(rows) is np.ndarray and np.array_equal(rows, values[r0:r1]), (r0, r1)
    own = in_memory(mapped)                      # a file read into fresh memory, not the mapping
    assert type(own) is np.ndarray and np.array_equal(own, values)
    assert in_memory(values) is values           # already in memory: itself, no copy
    view = mapped[3:9]                           # a view keeps its parent's offset: not read from the file
    assert in_memory(view) is view


def test_a_nan_in_a_later_block_of_a_mapped_table_is_named_at_its_place(tmp_path):
    from refbitnet.weights import _finite_bf16_bits
    mapped, values = _mapped_table(tmp_path, 2048, 4096)          # 1024 rows per validation block
    assert _finite_bf16_bits("f", "t", mapped) is mapped
    del mapped
    with open(tmp_path / "table.bin", "r+b") as f:                # a bf16 NaN at [1500, 7]
        f.seek(24 + 2 * (1500 * 4096 + 7))
        f.write(np.array([0x7FC1], np.uint16).tobytes())
    mapped = np.memmap(tmp_path / "table.bin", dtype=np.uint16, mode="r", offset=24, shape=(2048, 4096))
    with pytest.raises(CheckpointError, match=r"f: tensor t: .*0x7fc1.* at \[1500, 7\]"):
        _finite_bf16_bits("f", "t", mapped)
