"""Hostile files for the Hugging Face loader: model.safetensors, config.json, tokenizer.json.

Every file starts as a real tiny checkpoint written by ``refbitnet.checkpoint.save_checkpoint`` and is
then corrupted (truncated, bytes flipped, header rewritten). Each variant is loaded in a separate worker
process (tests/_corrupt.py: faulthandler on, address space capped, 30 s per case), so a segfault or a
hang fails the test instead of killing or stalling it. What each variant must do:

- a structural fault (truncation, header length, JSON, dtype, shape vs byte count, offsets out of range,
  overlapping, holes or trailing bytes, missing / extra / renamed tensors, wrong config types or sizes,
  tokenizer file unreadable): a RefBitNetError subclass whose message names the file (or model
  directory) and the problem;
- a flipped byte in the header that leaves the same meaning (whitespace, ``__metadata__``): either that
  error, or a model with bit-identical logits;
- a flipped byte inside tensor DATA: the file is then a different but well-formed model unless the new
  value is invalid, and without checksums nothing else can be detected. Invalid, and therefore rejected:
  a 2-bit field equal to 3 in a packed projection, a bf16 NaN or inf in the embedding or a norm, a
  weight_scale that is not a positive finite number. Valid values must load (no false alarms).
"""

import json
import shutil
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refbitnet

import _corrupt as C

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def worker():
    w = C.LoaderWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(directory, bytes of model.safetensors, spans, fingerprint of the unmodified model)."""
    d = C.write_checkpoint_dir(tmp_path_factory.mktemp("hostile") / "ckpt")
    raw = (d / "model.safetensors").read_bytes()
    return d, raw, C.safetensors_spans(raw)


@pytest.fixture(scope="module")
def reference(worker, pristine):
    # the worker's first load may compile the kernels (a cold Numba cache, e.g. right after an edit to
    # refbitnet): no hang or slowness check here, only on the hostile variants that follow
    out = worker.run("dir", pristine[0], timeout=600, slow=600)
    assert out["outcome"] == "loaded", out
    return out["fingerprint"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, pristine):
    """A copy of the model directory whose files the tests overwrite, one variant at a time."""
    d = tmp_path_factory.mktemp("scratch") / "model"
    shutil.copytree(pristine[0], d)
    return d


@pytest.fixture(autouse=True)
def restore(scratch, pristine):
    """Each test corrupts one file of the scratch directory; put all of them back afterwards."""
    yield
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copyfile(pristine[0] / name, scratch / name)
    (scratch / "model.safetensors.index.json").unlink(missing_ok=True)


def load_variant(worker, directory, reference, fmt, **kw):
    out = worker.run("dir", directory, reference=reference, **kw)
    C.record(fmt, out, out["wall"])
    return out


def assert_error(out, *names, match=None):
    """A RefBitNetError naming (one of) the given files / the directory."""
    assert out["outcome"] == "error", f"expected a RefBitNetError, got {out}"
    assert any(str(n) in out["message"] for n in names), f"message does not name {names}: {out['message']}"
    if match is not None:
        assert any(m in out["message"].lower() for m in match), f"message lacks {match}: {out['message']}"


# ============================================================================ model.safetensors

def put_safetensors(scratch, raw: bytes):
    (scratch / "model.safetensors").write_bytes(raw)
    return scratch / "model.safetensors"


def truncation_points(raw, spans):
    """Every offset in the first 24 bytes, both sides of the header's end, and the first, middle and
    last byte of every tensor."""
    points = set(range(0, 24)) | {spans["header_end"] - 1, spans["header_end"], spans["header_end"] + 1}
    for *_, begin, end in spans["tensors"]:
        points |= {begin, begin + 1, (begin + end) // 2, end - 1}
    return sorted(p for p in points if p < len(raw))


def test_truncated_at_every_structural_offset(worker, pristine, scratch, reference):
    _, raw, spans = pristine
    for cut in truncation_points(raw, spans):
        path = put_safetensors(scratch, raw[:cut])
        out = load_variant(worker, scratch, reference, "safetensors")
        assert_error(out, path, match=("truncated", "header", "expected"))


@given(cut=st.integers(0, 10**9))
def test_truncated_anywhere(worker, pristine, scratch, reference, cut):
    _, raw, _ = pristine
    path = put_safetensors(scratch, raw[:cut % len(raw)])
    assert_error(load_variant(worker, scratch, reference, "safetensors"), path, match=("truncated", "header"))


def invalid_after_flip(spans, new: bytes, offset: int) -> bool:
    """Whether the value holding `offset` is invalid after the flip (see the module docstring)."""
    name, dtype, shape, begin, end = C.tensor_at(spans, offset)
    if dtype == "U8":
        return C.byte_has_code_3(new[offset])
    assert dtype == "BF16", dtype
    element = begin + (offset - begin) // 2 * 2
    bits = struct.unpack("<H", new[element:element + 2])[0]
    if name.endswith("weight_scale"):
        return C.bf16_is_invalid(bits) or bits & 0x8000 != 0 or bits & 0x7FFF == 0    # must be > 0 and finite
    return C.bf16_is_invalid(bits)


@given(data=st.data())
def test_flipped_bytes_in_tensor_data(worker, pristine, scratch, reference, data):
    _, raw, spans = pristine
    offset = data.draw(st.integers(spans["header_end"], len(raw) - 1), label="offset")
    check_data_flip(worker, pristine, scratch, reference, offset, data.draw(st.integers(1, 255), label="xor"))


def check_data_flip(worker, pristine, scratch, reference, offset, mask):
    _, raw, spans = pristine
    new = bytearray(raw)
    new[offset] ^= mask
    put_safetensors(scratch, bytes(new))
    out = load_variant(worker, scratch, reference, "safetensors")
    tensor = C.tensor_at(spans, offset)[0]
    if invalid_after_flip(spans, new, offset):
        assert_error(out, scratch, match=(tensor,))
    else:
        assert out["outcome"] == "loaded", f"valid data in {tensor} was rejected: {out}"


@given(data=st.data())
def test_flipped_bytes_in_header(worker, pristine, scratch, reference, data):
    _, raw, spans = pristine
    flips = data.draw(st.lists(st.tuples(st.integers(0, spans["header_end"] - 1), st.integers(1, 255)),
                               min_size=1, max_size=3), label="flips")
    check_header_flips(worker, pristine, scratch, reference, flips)


def check_header_flips(worker, pristine, scratch, reference, flips):
    _, raw, spans = pristine
    new = bytearray(raw)
    for offset, mask in flips:
        new[offset] ^= mask
    path = put_safetensors(scratch, bytes(new))
    out = load_variant(worker, scratch, reference, "safetensors")
    if out["outcome"] == "loaded":
        assert out["same"], f"a header flip {flips} loaded a different model silently"
    else:
        assert_error(out, path, scratch)


@pytest.mark.slow
@settings(max_examples=1500)
@given(data=st.data())
def test_sweep_flipped_bytes(worker, pristine, scratch, reference, data):
    """The larger sweep: 1500 single flips in the data and header (one in four in the header)."""
    _, raw, spans = pristine
    if data.draw(st.integers(0, 3)) == 0:
        flips = [(data.draw(st.integers(0, spans["header_end"] - 1)), data.draw(st.integers(1, 255)))]
        check_header_flips(worker, pristine, scratch, reference, flips)
    else:
        check_data_flip(worker, pristine, scratch, reference, data.draw(st.integers(spans["header_end"], len(raw) - 1)),
                        data.draw(st.integers(1, 255)))


def rewrite(raw: bytes, edit=None, header_len=None, data_edit=None) -> bytes:
    """Re-serialize a safetensors file after edit(header dict) / data_edit(bytearray of the data)."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = bytearray(raw[8 + n:])
    if edit is not None:
        edit(header)
    if data_edit is not None:
        data_edit(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + bytes(data)


Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


def _swap_offsets(a, b):
    def edit(h):
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return edit


def _alias(a, b):           # a points at b's bytes (overlap); a's own bytes become a hole
    def edit(h):
        h[a]["data_offsets"] = list(h[b]["data_offsets"])
    return edit


def _overlap_by(name, delta):
    def edit(h):
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [begin - delta, end - delta]
    return edit


def _rename(old, new):
    def edit(h):
        h[new] = h.pop(old)
    return edit


def _drop(name):
    def edit(h):
        del h[name]
    return edit


def _extra(h):
    h["model.layers.7.self_attn.q_proj.weight"] = dict(h[NORM])


STRUCTURAL = {
    # header length
    "header length past the end": dict(header_len=10**6),
    "header length 2**64-1": dict(header_len=2**64 - 1),
    "header length 0": dict(header_len=0),
    "header length cuts the JSON": dict(header_len=100),
    # header content
    "header is a list": dict(edit=lambda h: (h.clear(), h.update({"__list__": []}))),
    "entry without data_offsets": dict(edit=lambda h: h[NORM].pop("data_offsets")),
    "entry is a string": dict(edit=lambda h: h.__setitem__(NORM, "BF16")),
    "unknown dtype": dict(edit=_set(NORM, "dtype", "F8_E4M3")),
    "dtype not a string": dict(edit=_set(NORM, "dtype", ["BF16"])),
    # shapes vs byte counts
    "shape disagrees with bytes": dict(edit=_set(NORM, "shape", [255])),
    "shape negative": dict(edit=_set(NORM, "shape", [-256])),
    "shape float": dict(edit=_set(NORM, "shape", [256.0])),
    "shape string": dict(edit=_set(NORM, "shape", "256")),
    "shape 2**64": dict(edit=_set(NORM, "shape", [2**64])),
    "shape overflowing int64": dict(edit=_set(NORM, "shape", [2**32, 2**32, 2**32])),
    "shape product wraps to 0 in int64": dict(edit=_set(NORM, "shape", [2**32, 2**32])),
    "shape with a 0 and a huge dim": dict(edit=_set(NORM, "shape", [0, 2**62])),
    "shape with 100000 dims": dict(edit=_set(NORM, "shape", [1] * 100000 + [256])),
    # offsets
    "offsets out of range": dict(edit=_set(NORM, "data_offsets", [10**12, 10**12 + 512])),
    "offsets negative": dict(edit=_set(NORM, "data_offsets", [-512, 0])),
    "offsets reversed": dict(edit=lambda h: h[NORM].__setitem__("data_offsets", h[NORM]["data_offsets"][::-1])),
    "offsets not ints": dict(edit=_set(NORM, "data_offsets", [0.0, 512.0])),
    "offsets 2**64": dict(edit=_set(NORM, "data_offsets", [2**64, 2**64 + 512])),
    "two tensors share bytes": dict(edit=_alias(K0, "model.layers.0.self_attn.v_proj.weight")),
    "tensors overlap by 8 bytes": dict(edit=_overlap_by(NORM, 8)),
    "trailing bytes after the last tensor": dict(data_edit=lambda d: d.extend(b"\0" * 64)),
    # dtypes swapped
    "U8 projection declared I8": dict(edit=_set(Q0, "dtype", "I8")),
    "BF16 norm declared F32 (size)": dict(edit=_set(NORM, "dtype", "F32")),
    "BF16 norm declared I16": dict(edit=_set(NORM, "dtype", "I16")),
    "U8 projection declared BF16": dict(edit=lambda h: (h[Q0].__setitem__("dtype", "BF16"),
                                                        h[Q0].__setitem__("shape", [h[Q0]["shape"][0] // 2,
                                                                                    h[Q0]["shape"][1]]))),
    "offsets of two tensors swapped": dict(edit=_swap_offsets(Q0, EMBED)),
    # names
    "missing tensor": dict(edit=_drop(NORM), data_edit=None),
    "missing weight_scale": dict(edit=_drop("model.layers.0.mlp.up_proj.weight_scale")),
    "renamed tensor": dict(edit=_rename(NORM, "model.nrom.weight")),
    "extra tensor": dict(edit=_extra),
    "weight_scale of 2 values": dict(edit=lambda h: h["model.layers.0.mlp.up_proj.weight_scale"].update(
        shape=[2], data_offsets=[h["model.layers.0.mlp.up_proj.weight_scale"]["data_offsets"][0],
                                 h["model.layers.0.mlp.up_proj.weight_scale"]["data_offsets"][0] + 4])),
    "embedding rows disagree with vocab": dict(edit=lambda h: h[EMBED].update(shape=[32, 512])),
    "layer index beyond the config": dict(edit=_rename(K0, K0.replace("layers.0", "layers.1"))),
    # values
    "packed code 3": dict(data_edit=None, code3=True),
    "weight_scale zero": dict(scale_bits=0x0000),
    "weight_scale negative": dict(scale_bits=0xBF80),
    "weight_scale inf": dict(scale_bits=0x7F80),
    "weight_scale NaN": dict(scale_bits=0x7FC1),
    "embedding NaN": dict(embed_bits=0x7FC0),
    "embedding -inf": dict(embed_bits=0xFF80),
    "norm NaN": dict(norm_bits=0xFFC0),
}


def build_structural(raw, spans, case):
    case = dict(case)
    by_name = {t[0]: t for t in spans["tensors"]}

    def poke(name, bits, index=0):
        begin = by_name[name][3] - spans["header_end"]

        def edit(d):
            d[begin + 2 * index:begin + 2 * index + 2] = struct.pack("<H", bits)
        return edit

    if case.pop("code3", False):
        case["data_edit"] = lambda d: d.__setitem__(by_name[Q0][3] - spans["header_end"] + 77, 0xFF)
    if "scale_bits" in case:
        case["data_edit"] = poke("model.layers.0.mlp.gate_proj.weight_scale", case.pop("scale_bits"))
    if "embed_bits" in case:
        case["data_edit"] = poke(EMBED, case.pop("embed_bits"), index=1000)
    if "norm_bits" in case:
        case["data_edit"] = poke(NORM, case.pop("norm_bits"), index=3)
    return rewrite(raw, **case)


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_corruption(worker, pristine, scratch, reference, case):
    _, raw, spans = pristine
    path = put_safetensors(scratch, build_structural(raw, spans, STRUCTURAL[case]))
    out = load_variant(worker, scratch, reference, "safetensors")
    assert_error(out, path, scratch)


def test_deeply_nested_header_json(worker, pristine, scratch, reference):
    text = b"[" * 200000 + b"]" * 200000
    path = put_safetensors(scratch, struct.pack("<Q", len(text)) + text)
    assert_error(load_variant(worker, scratch, reference, "safetensors"), path, match=("json",))


def test_header_with_a_5000_digit_number(worker, pristine, scratch, reference):
    """Python refuses to parse integers of more than 4300 digits (a ValueError that is not a JSONDecodeError)."""
    _, raw, _ = pristine
    text = raw[8:8 + struct.unpack("<Q", raw[:8])[0]].replace(b'"shape":[', b'"shape":[' + b"1" * 5000 + b",", 1)
    path = put_safetensors(scratch, struct.pack("<Q", len(text)) + text + raw[8 + struct.unpack("<Q", raw[:8])[0]:])
    assert_error(load_variant(worker, scratch, reference, "safetensors"), path, match=("json",))


def test_same_size_dtype_swap_is_a_different_valid_file(worker, pristine, scratch, reference):
    """BF16 <-> F16 (both 2 bytes) gives a self-consistent file: refbitnet accepts float16 norms, so
    this loads a DIFFERENT model (or fails on a resulting inf). Stated here, not hidden: without a
    checksum a same-size dtype swap is undetectable."""
    _, raw, spans = pristine
    put_safetensors(scratch, rewrite(raw, edit=_set(NORM, "dtype", "F16")))
    out = load_variant(worker, scratch, reference, "safetensors")
    assert out["outcome"] == "error" or not out["same"]


def test_shards_index(worker, pristine, scratch, reference, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(pristine[0], d)
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    names = [t[0] for t in pristine[2]["tensors"]]
    index = d / "model.safetensors.index.json"
    cases = {
        "not JSON": "{",
        "no weight_map": json.dumps({"metadata": {}}),
        "weight_map a list": json.dumps({"weight_map": names}),
        "shard outside the directory": json.dumps({"weight_map": {n: "../../etc/passwd" for n in names}}),
        "shard absolute path": json.dumps({"weight_map": {n: "/etc/passwd" for n in names}}),
        "shard not a string": json.dumps({"weight_map": {n: 7 for n in names}}),
        "missing shard file": json.dumps({"weight_map": {n: "part-2.safetensors" for n in names}}),
        "tensor not in its shard": json.dumps({"weight_map": {**{n: "part-1.safetensors" for n in names},
                                                               "model.extra.weight": "part-1.safetensors"}}),
        "deeply nested": "[" * 100000 + "]" * 100000,
        "5000-digit number": '{"weight_map": {}, "n": ' + "1" * 5000 + "}",
    }
    for what, text in cases.items():
        index.write_text(text)
        out = load_variant(worker, d, reference, "safetensors")
        assert_error(out, d), what
    index.write_text(json.dumps({"weight_map": {n: "part-1.safetensors" for n in names}}))
    assert load_variant(worker, d, reference, "safetensors")["same"]


# ============================================================================ config.json

HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 3, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def put_config(scratch, text: str):
    (scratch / "config.json").write_text(text)
    return scratch / "config.json"


@pytest.fixture(scope="module")
def config_dict(pristine):
    return json.loads((pristine[0] / "config.json").read_text())


@given(data=st.data())
def test_config_wrong_values(worker, scratch, config_dict, reference, data):
    """Any key replaced by any JSON value: a ConfigError / CheckpointError naming config.json or the
    directory, or (a value with the same meaning, e.g. an unused key) a model identical to the original.
    A valid but different value (a new rope_theta, eps, eos id) may load a different model: that is
    what the file says."""
    key = data.draw(st.sampled_from(sorted(config_dict) + ["head_dim", "rope_scaling", "rope_parameters"]))
    value = data.draw(HOSTILE_VALUES, label="value")
    cfg = dict(config_dict, **{key: value})
    path = put_config(scratch, json.dumps(cfg))
    out = load_variant(worker, scratch, reference, "config.json")
    if out["outcome"] == "error":
        assert_error(out, path, scratch)
    elif key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size") and value != config_dict[key]:
        pytest.fail(f"config {key} = {value!r} contradicts the tensors but loaded: {out}")


SIZE_CONTRADICTIONS = [("hidden_size", 128), ("hidden_size", 512), ("intermediate_size", 512),
                       ("intermediate_size", 128), ("num_hidden_layers", 2), ("num_attention_heads", 8),
                       ("num_attention_heads", 2), ("num_key_value_heads", 4), ("num_key_value_heads", 1),
                       ("vocab_size", 32), ("vocab_size", 128), ("tie_word_embeddings", False)]


@pytest.mark.parametrize("key,value", SIZE_CONTRADICTIONS)
def test_config_sizes_contradicting_the_tensors(worker, scratch, config_dict, reference, key, value):
    cfg = dict(config_dict, **{key: value})
    cfg.pop("head_dim", None)
    put_config(scratch, json.dumps(cfg))
    out = load_variant(worker, scratch, reference, "config.json")
    assert_error(out, scratch, match=("tensor", "expected"))


@pytest.mark.parametrize("text", ["", "{", "null", "[]", "7", '"config"', "{\"hidden_size\": 256}",
                                  "\xff\xfe garbage", "[" * 100000 + "]" * 100000,
                                  '{"a":' * 50000 + "1" + "}" * 50000, '{"hidden_size": ' + "9" * 5000 + "}"])
def test_config_not_a_config(worker, scratch, config_dict, reference, text):
    path = scratch / "config.json"
    path.write_bytes(text.encode("latin-1"))
    out = load_variant(worker, scratch, reference, "config.json")
    assert_error(out, path)


def test_config_missing(worker, scratch, config_dict, reference):
    (scratch / "config.json").unlink()
    out = load_variant(worker, scratch, reference, "config.json")
    assert_error(out, scratch / "config.json", match=("not found",))


@given(data=st.data())
def test_config_flipped_bytes(worker, scratch, config_dict, reference, data):
    raw = bytearray(json.dumps(config_dict, indent=2).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    (scratch / "config.json").write_bytes(bytes(raw))
    out = load_variant(worker, scratch, reference, "config.json")
    if out["outcome"] == "error":
        assert_error(out, scratch)


# ============================================================================ tokenizer.json



def test_tokenizer_missing_is_optional_but_from_file_says_so(worker, scratch, reference, tmp_path):
    """A model directory may come without tokenizer.json (ids in, logits out); asking for the file
    itself is a TokenizerError naming it."""
    (scratch / "tokenizer.json").unlink()
    assert load_variant(worker, scratch, reference, "tokenizer.json")["same"]
    out = worker.run("tokenizer", tmp_path / "nope.json")
    assert_error(out, tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["", "{", "null", "[]", "{}", '{"model": 3}', '{"model": {"type": "BPE"}}',
                                  "\x00" * 100, "[" * 100000 + "]" * 100000, '{"version": ' + "1" * 5000 + "}"])
def test_tokenizer_invalid(worker, scratch, reference, text):
    path = scratch / "tokenizer.json"
    path.write_bytes(text.encode("latin-1"))
    assert_error(load_variant(worker, scratch, reference, "tokenizer.json"), path)


def _tok_without(special):
    tj = C.tokenizer_json()
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != special]
    vocab = tj["model"]["vocab"]
    vocab[special.replace("|", "!")] = vocab.pop(special)
    return tj


def _tok_bigger_than_model(n):
    tj = C.tokenizer_json()
    tj["model"]["vocab"].update({f"w{i}": 14 + i for i in range(n)})
    return tj


@pytest.mark.parametrize("what,tj", [
    ("ids beyond the model's vocab_size", _tok_bigger_than_model(100)),
])
def test_tokenizer_contradicting_the_model(worker, scratch, reference, what, tj):
    path = scratch / "tokenizer.json"
    path.write_text(json.dumps(tj))
    assert_error(load_variant(worker, scratch, reference, "tokenizer.json"), path)


@pytest.mark.parametrize("special", ["<|begin_of_text|>", "<|eot_id|>"])
def test_tokenizer_without_a_2b4t_special_takes_the_model_files_ids(scratch, special):
    """The 2B4T special-token names are a fallback, not a requirement (as in transformers): without
    <|begin_of_text|> the BOS is config.json's bos_token_id; without <|eot_id|> there is no end-of-turn id
    and config.json's eos_token_id still stops generation. (Until the tokenizer followed the model's own
    files, both were refused.)"""
    (scratch / "tokenizer.json").write_text(json.dumps(_tok_without(special)))
    model = refbitnet.load(scratch, backend="numpy")
    tokenizer, config = model.tokenizer, model.config
    assert tokenizer.bos_id == config.bos_token_id
    assert config.eos_token_id in tokenizer.eos_ids
    if special == "<|eot_id|>":
        assert tokenizer.eot_id is None
    assert model.generate([config.bos_token_id, 5], max_new_tokens=2, temperature=0.0) is not None


@given(data=st.data())
def test_tokenizer_flipped_and_truncated(worker, scratch, reference, data):
    raw = bytearray(json.dumps(C.tokenizer_json()).encode())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path = scratch / "tokenizer.json"
    path.write_bytes(bytes(raw))
    out = load_variant(worker, scratch, reference, "tokenizer.json")
    if out["outcome"] == "error":
        assert_error(out, path, scratch)


def test_reference_files_load(worker, pristine, scratch, reference):
    """The unmodified files load, in place and copied (so every error above is caused by the corruption)."""
    assert worker.run("dir", pristine[0], reference=reference)["same"]
    assert worker.run("dir", scratch, reference=reference)["same"]


AUDIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import _corrupt as C, refbitnet
from refbitnet import gguf as gguf_io
refbitnet.load({ckpt!r}).forward([1, 2]); gguf_io.load_gguf({gguf!r}).forward([1, 2])   # imports done
events = []
WATCH = ("pickle.", "marshal.", "exec", "compile", "os.system", "os.exec", "os.posix_spawn", "os.fork",
         "subprocess.Popen", "ctypes.dlopen", "import", "urllib.", "socket.")
sys.addaudithook(lambda ev, args: events.append(ev) if ev.startswith(WATCH) else None)
refbitnet.load({ckpt!r}).forward([1, 2]); gguf_io.load_gguf({gguf!r}).forward([1, 2])
print("EVENTS", sorted(set(events)))
"""


def test_loading_executes_no_code_from_files(pristine, tmp_path):
    """Security: a load (config.json, model.safetensors, tokenizer.json; a GGUF file) unpickles nothing,
    compiles or executes no code, starts no process, loads no library, opens no socket: a Python audit
    hook (in a child process, after a first load did the imports) sees none of those events."""
    import subprocess
    import sys
    gguf_path = C.write_gguf_file(tmp_path / "m.gguf")
    script = AUDIT_SCRIPT.format(tests=str(C.HERE), ckpt=str(pristine[0]), gguf=str(gguf_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(__import__("os").environ, OPENBLAS_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "EVENTS []" in out.stdout, out.stdout


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json",
                                  "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_special_files_do_not_hang(worker, scratch, reference, name, kind):
    """A named pipe (open() would wait for a writer forever) or a link to /dev/zero (endless bytes) in
    place of a file: an error naming it, within the worker's time limit."""
    import os
    path = scratch / name
    if name == "model.safetensors.index.json":
        (scratch / "model.safetensors").unlink()
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    try:
        out = load_variant(worker, scratch, reference, name, timeout=15)
    finally:
        path.unlink()
    assert_error(out, path)
