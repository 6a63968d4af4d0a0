"""Hostile GGUF files for ``refbitnet.gguf.load_gguf``.

The files start as a tiny model exported by ``refbitnet.gguf.write_gguf`` (I2_S, TQ2_0, TQ1_0) and are then
truncated, flipped, or taken apart (tests/_corrupt.GGUFParts) and rebuilt with hostile metadata and
tensor tables. Each variant is loaded in the crash-safe worker of tests/_corrupt.py (faulthandler,
capped address space, 30 s per case). What each must do:

- structure (magic, version, counts, lengths, nesting, tensor table: names, dims, types, offsets,
  alignment, overlaps, ranges; the tensor set and shapes for the config; metadata types): a GGUFError
  (a RefBitNetError) naming the file and the problem, or, for a flip that changes nothing that is read
  (padding), the identical model;
- metadata VALUES (rope base, epsilon, context length, token ids, names): a flip may give another valid
  value, hence a different model: GGUF has no checksum, and the file says what it says. Required is only
  that it never crashes, hangs, or raises anything but a RefBitNetError;
- tensor DATA of I2_S: as in the safetensors tests, an invalid value (a 2-bit code 3, a scale that is not
  positive and finite, an F16/F32 NaN or inf in the embedding or a norm) is rejected, anything else loads.
"""

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import _corrupt as C

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ARCH = "bitnet-b1.58"


@pytest.fixture(scope="module")
def worker():
    w = C.LoaderWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-gguf")
    return {layout: C.write_gguf_file(d / f"tiny-{layout}.gguf", layout) for layout in ("i2_s", "tq2_0", "tq1_0")}


@pytest.fixture(scope="module")
def reference(worker, files):
    # the worker's first loads may compile the kernels (a cold Numba cache): no hang or slowness check here
    fingerprints = {layout: worker.run("gguf", path, timeout=600, slow=600)["fingerprint"]
                    for layout, path in files.items()}
    assert len(set(fingerprints.values())) == 1, fingerprints    # every layout holds the same model
    return fingerprints["i2_s"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The file each variant is written to (overwritten by every case)."""
    return tmp_path_factory.mktemp("variant") / "bad.gguf"


def load(worker, path, reference, raw=None):
    if raw is not None:
        path.write_bytes(raw)
    out = worker.run("gguf", path, reference=reference)
    C.record("gguf", out, out["wall"])
    return out


def assert_error(out, path, match=None):
    assert out["outcome"] == "error", f"expected a RefBitNetError, got {out}"
    assert str(path) in out["message"], f"message does not name {path}: {out['message']}"
    if match is not None:
        assert any(m in out["message"].lower() for m in match), f"message lacks {match}: {out['message']}"


# ============================================================================ truncation

def structural_offsets(raw):
    spans = C.gguf_spans(raw)
    points = set(range(0, 30)) | {spans["kv_end"], spans["table_end"], spans["data_start"]}
    points |= {start for start, _ in spans["kv"].values()} | {start - 4 for start, _ in spans["kv"].values()}
    for *_, begin, end in spans["tensors"]:
        points |= {begin, begin + 1, (begin + end) // 2, end - 1}
    return sorted(p for p in points if p < len(raw))


def test_truncated_at_every_structural_offset(worker, files, reference, target):
    raw = files["i2_s"].read_bytes()
    for cut in structural_offsets(raw):
        out = load(worker, target, reference, raw[:cut])
        assert_error(out, target, match=("truncated", "empty", "not a gguf"))


@given(layout=st.sampled_from(["i2_s", "tq2_0", "tq1_0"]), cut=st.integers(0, 10**9))
def test_truncated_anywhere(worker, files, reference, target, layout, cut):
    raw = files[layout].read_bytes()
    assert_error(load(worker, target, reference, raw[:cut % len(raw)]), target,
                 match=("truncated", "empty", "not a gguf"))


# ============================================================================ flipped bytes

def i2s_invalid_after_flip(spans, new, offset):
    name, type_id, ne, begin, end = C.tensor_at(spans, offset)
    if type_id == 36:                                       # I2_S: codes, then float32 scale, then 28 zeros
        codes_end = end - 32
        if offset < codes_end:
            return C.byte_has_code_3(new[offset])
        if offset < codes_end + 4:
            scale = struct.unpack("<f", new[codes_end:codes_end + 4])[0]
            return not (np.isfinite(scale) and scale > 0)
        return False                                        # the 28 padding bytes are not read
    if type_id == 1:                                        # F16 embedding
        element = begin + (offset - begin) // 2 * 2
        return not np.isfinite(np.frombuffer(new[element:element + 2], "<f2")[0])
    assert type_id == 0, type_id                            # F32 norms
    element = begin + (offset - begin) // 4 * 4
    return not np.isfinite(np.frombuffer(new[element:element + 4], "<f4")[0])


@given(data=st.data())
def test_flipped_bytes_in_tensor_data(worker, files, reference, target, data):
    raw = files["i2_s"].read_bytes()
    spans = C.gguf_spans(raw)
    offset = data.draw(st.integers(spans["data_start"], len(raw) - 1), label="offset")
    check_data_flip(worker, raw, reference, target, offset, data.draw(st.integers(1, 255), label="xor"))


def check_data_flip(worker, raw, reference, target, offset, mask):
    spans = C.gguf_spans(raw)
    new = bytearray(raw)
    new[offset] ^= mask
    out = load(worker, target, reference, bytes(new))
    name = C.tensor_at(spans, offset)[0]
    if i2s_invalid_after_flip(spans, new, offset):
        assert_error(out, target, match=(name,))
    else:
        assert out["outcome"] == "loaded", f"valid data in {name} was rejected: {out}"


@given(data=st.data())
def test_flipped_bytes_in_header_and_tensor_table(worker, files, reference, target, data):
    """Bytes 0..23 (magic, version, counts) and the tensor table: an error, or the same model."""
    raw = files["i2_s"].read_bytes()
    spans = C.gguf_spans(raw)
    offset = data.draw(st.one_of(st.integers(0, 23), st.integers(spans["kv_end"], spans["data_start"] - 1)),
                       label="offset")
    new = bytearray(raw)
    new[offset] ^= data.draw(st.integers(1, 255), label="xor")
    out = load(worker, target, reference, bytes(new))
    if out["outcome"] == "loaded":
        assert out["same"], f"a flip at {offset} in the header/tensor table loaded a different model"
    else:
        assert_error(out, target)


@pytest.mark.slow
@settings(max_examples=1500)
@given(data=st.data())
def test_sweep_flipped_bytes_in_i2s_data(worker, files, reference, target, data):
    """The larger sweep of the data-flip oracle: 1500 flips."""
    raw = files["i2_s"].read_bytes()
    spans = C.gguf_spans(raw)
    check_data_flip(worker, raw, reference, target, data.draw(st.integers(spans["data_start"], len(raw) - 1)),
                    data.draw(st.integers(1, 255)))


@pytest.mark.slow
@settings(max_examples=1500)
@given(layout=st.sampled_from(["i2_s", "tq2_0", "tq1_0"]), data=st.data())
def test_sweep_flipped_bytes_anywhere(worker, files, reference, target, layout, data):
    test_flipped_bytes_anywhere.hypothesis.inner_test(worker, files, reference, target, layout, data)


@given(layout=st.sampled_from(["i2_s", "tq2_0", "tq1_0"]), data=st.data())
def test_flipped_bytes_anywhere(worker, files, reference, target, layout, data):
    """Up to 4 flips anywhere, metadata included: a RefBitNetError naming the file or a model, never
    a crash, a hang or another exception (the worker turns those into failures)."""
    raw = bytearray(files[layout].read_bytes())
    spans = C.gguf_spans(bytes(raw))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        region_end = data.draw(st.sampled_from([spans["data_start"], len(raw)]), label="region")
        raw[data.draw(st.integers(0, region_end - 1))] ^= data.draw(st.integers(1, 255))
    out = load(worker, target, reference, bytes(raw))
    if out["outcome"] == "error":
        assert_error(out, target)


# ============================================================================ rebuilt files

def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def f32(v):
    return struct.pack("<f", v)


def array(etype, items_raw, count=None):
    return u32(etype) + u64(len(items_raw) if count is None else count) + b"".join(items_raw)


def nested_arrays(depth):
    raw = array(4, [u32(1)])
    for _ in range(depth):
        raw = array(9, [raw])
    return raw


def edit_tensor(name, field, value):
    def edit(p):
        p.tensor(name)[field] = value
    return edit


Q = "blk.0.attn_q.weight"
NORM = "output_norm.weight"
EMBD = "token_embd.weight"

REBUILT = {
    # fixed header
    "wrong magic": dict(raw=lambda raw: b"GGUG" + raw[4:]),
    "version 1": dict(version=1),
    "version 2**32-1": dict(version=2**32 - 1),
    "big-endian version": dict(version=3 << 24),
    "tensor count huge": dict(n_tensors=2**63),
    "tensor count one more": dict(n_tensors_delta=1),
    "tensor count one less": dict(n_tensors_delta=-1),
    "metadata count huge": dict(n_kv=2**64 - 1),
    "metadata count one more": dict(n_kv_delta=1),
    # metadata: lengths, types, nesting
    "key length huge": dict(raw_kv=u64(2**63) + b"x"),
    "value type unknown": dict(kv=("x.y", 13, b"")),
    "string length past the end": dict(kv=("x.y", 8, u64(2**40) + b"abc")),
    "array count huge": dict(kv=("x.y", 9, u32(4) + u64(2**61))),
    "array of strings count huge": dict(kv=("x.y", 9, u32(8) + u64(2**40))),
    "array element type unknown": dict(kv=("x.y", 9, u32(77) + u64(1) + u32(0))),
    "arrays nested 5000 deep": dict(kv=("x.y", 9, nested_arrays(5000))),
    "arrays nested 50 deep": dict(kv=("x.y", 9, nested_arrays(50)), may_load=True),
    "key not UTF-8": dict(raw_kv=u64(3) + b"\xff\xfe\xfd" + u32(4) + u32(1), may_load=True),
    # metadata: values the config needs
    "architecture llama": dict(kv=("general.architecture", 8, C.gguf_string("llama"))),
    "architecture not a string": dict(kv=("general.architecture", 4, u32(7))),
    "architecture missing": dict(drop="general.architecture"),
    "embedding_length missing": dict(drop=f"{ARCH}.embedding_length"),
    "embedding_length a string": dict(kv=(f"{ARCH}.embedding_length", 8, C.gguf_string("256"))),
    "embedding_length a float": dict(kv=(f"{ARCH}.embedding_length", 6, f32(256.0))),
    "embedding_length an array": dict(kv=(f"{ARCH}.embedding_length", 9, array(4, [u32(256)]))),
    "embedding_length 0": dict(kv=(f"{ARCH}.embedding_length", 4, u32(0))),
    "embedding_length negative": dict(kv=(f"{ARCH}.embedding_length", 5, struct.pack("<i", -256))),
    "embedding_length 512": dict(kv=(f"{ARCH}.embedding_length", 4, u32(512))),
    "head_count 0": dict(kv=(f"{ARCH}.attention.head_count", 4, u32(0))),
    "head_count a string": dict(kv=(f"{ARCH}.attention.head_count", 8, C.gguf_string("four"))),
    "head_count 3": dict(kv=(f"{ARCH}.attention.head_count", 4, u32(3))),
    "head_count_kv 3": dict(kv=(f"{ARCH}.attention.head_count_kv", 4, u32(3))),
    "block_count 2": dict(kv=(f"{ARCH}.block_count", 4, u32(2))),
    "block_count 786433 (a flipped bit)": dict(kv=(f"{ARCH}.block_count", 4, u32(786433)), fast=True),
    "block_count 2**32-1": dict(kv=(f"{ARCH}.block_count", 4, u32(2**32 - 1)), fast=True),
    "block_count per layer": dict(kv=(f"{ARCH}.block_count", 9, array(4, [u32(1), u32(1)]))),
    "feed_forward_length per layer": dict(kv=(f"{ARCH}.feed_forward_length", 9, array(4, [u32(256)]))),
    "vocab_size a string": dict(kv=(f"{ARCH}.vocab_size", 8, C.gguf_string("sixty-four"))),
    "vocab_size an array": dict(kv=(f"{ARCH}.vocab_size", 9, array(4, [u32(64)]))),
    "vocab_size 128": dict(kv=(f"{ARCH}.vocab_size", 4, u32(128))),
    "context_length 0": dict(kv=(f"{ARCH}.context_length", 4, u32(0))),
    "rms eps NaN": dict(kv=(f"{ARCH}.attention.layer_norm_rms_epsilon", 6, f32(float("nan")))),
    "rms eps inf": dict(kv=(f"{ARCH}.attention.layer_norm_rms_epsilon", 6, f32(float("inf")))),
    "rms eps negative": dict(kv=(f"{ARCH}.attention.layer_norm_rms_epsilon", 6, f32(-1e-5))),
    "rms eps a string": dict(kv=(f"{ARCH}.attention.layer_norm_rms_epsilon", 8, C.gguf_string("1e-5"))),
    "rope base NaN": dict(kv=(f"{ARCH}.rope.freq_base", 6, f32(float("nan")))),
    "rope base an array": dict(kv=(f"{ARCH}.rope.freq_base", 9, array(6, [f32(1.0)]))),
    "rope dimension 7": dict(kv=(f"{ARCH}.rope.dimension_count", 4, u32(7))),
    "rope dimension a string": dict(kv=(f"{ARCH}.rope.dimension_count", 8, C.gguf_string("64"))),
    "bos id out of range": dict(kv=("tokenizer.ggml.bos_token_id", 4, u32(10**6))),
    "bos id a string": dict(kv=("tokenizer.ggml.bos_token_id", 8, C.gguf_string("zero"))),
    "eos id an array": dict(kv=("tokenizer.ggml.eos_token_id", 9, array(4, [u32(1), u32(2)]))),
    "alignment 0": dict(kv=("general.alignment", 4, u32(0))),
    "alignment 3": dict(kv=("general.alignment", 4, u32(3))),
    "alignment a string": dict(kv=("general.alignment", 8, C.gguf_string("32"))),
    "alignment 2**31": dict(kv=("general.alignment", 4, u32(2**31))),
    # tokenizer metadata
    "tokens an int": dict(kv=("tokenizer.ggml.tokens", 4, u32(5)), tok=True),
    "tokens ints": dict(kv=("tokenizer.ggml.tokens", 9, array(4, [u32(i) for i in range(64)])), tok=True),
    "tokens without specials": dict(kv=("tokenizer.ggml.tokens", 9, array(8, [C.gguf_string(f"t{i}")
                                                                               for i in range(64)])),
                                    tok=True, may_load=True),
    "token types disagree": dict(kv=("tokenizer.ggml.token_type", 9, array(5, [struct.pack("<i", 1)] * 3)),
                                 tok=True),
    "token types strings": dict(kv=("tokenizer.ggml.token_type", 9, array(8, [C.gguf_string("x")] * 64)),
                                tok=True),
    "merges ints": dict(kv=("tokenizer.ggml.merges", 9, array(4, [u32(1)] * 3)), tok=True),
    "merges nonsense": dict(kv=("tokenizer.ggml.merges", 9, array(8, [C.gguf_string("a b c d")] * 3)), tok=True,
                            may_load=True),
    "tokenizer model llama": dict(kv=("tokenizer.ggml.model", 8, C.gguf_string("llama")), tok=True),
    # tensor table
    "tensor name empty": dict(edit=edit_tensor(NORM, 0, "")),
    "tensor renamed": dict(edit=edit_tensor(NORM, 0, "output_norm.weigh")),
    "tensor name duplicated": dict(edit=edit_tensor("blk.0.attn_norm.weight", 0, NORM)),
    "0 dimensions": dict(edit=edit_tensor(NORM, 1, [])),
    "5 dimensions": dict(edit=edit_tensor(NORM, 1, [256, 1, 1, 1, 1])),
    "a dimension 0": dict(edit=edit_tensor(NORM, 1, [0])),
    "dimensions overflowing int64": dict(edit=edit_tensor(Q, 1, [2**20, 2**20, 2**20, 2**20])),
    "dimension 2**64-1": dict(edit=edit_tensor(NORM, 1, [2**64 - 1])),
    "projection 1-D": dict(edit=edit_tensor(Q, 1, [256 * 256])),
    "projection 3-D": dict(edit=edit_tensor(Q, 1, [256, 128, 2])),
    "projection transposed shape": dict(edit=edit_tensor("blk.0.attn_k.weight", 1, [128, 256])),
    "norm wider": dict(edit=edit_tensor(NORM, 1, [257])),
    "type unknown": dict(edit=edit_tensor(NORM, 2, 99)),
    "type known but unsupported (Q4_0)": dict(edit=edit_tensor(NORM, 2, 2)),
    "projection typed F32": dict(edit=edit_tensor(Q, 2, 0)),
    "projection typed TQ2_0 (size)": dict(edit=edit_tensor(Q, 2, 35)),
    "norm typed I2_S": dict(edit=edit_tensor(NORM, 2, 36)),
    "embedding typed F32 (size)": dict(edit=edit_tensor(EMBD, 2, 0)),
    "offset misaligned": dict(edit=lambda p: p.tensor(NORM).__setitem__(3, p.tensor(NORM)[3] + 4)),
    "offset past the end": dict(edit=edit_tensor(NORM, 3, 2**40)),
    "offset 2**64-32": dict(edit=edit_tensor(NORM, 3, 2**64 - 32)),
    "two tensors at one offset": dict(edit=lambda p: p.tensor(NORM).__setitem__(3, p.tensor("blk.0.attn_norm.weight")[3])),
    "tensor overlaps the next": dict(edit=lambda p: p.tensor(Q).__setitem__(3, p.tensor(Q)[3] + 32)),
    "missing tensor": dict(edit=lambda p: p.tensors.remove(p.tensor(NORM))),
    "extra tensor": dict(edit=lambda p: p.tensors.append(["blk.5.attn_q.weight"] + p.tensor(Q)[1:])),
    "untied output.weight of the wrong shape": dict(edit=lambda p: p.tensors.append(
        ["output.weight", [256, 32], 1, p.tensor(EMBD)[3]])),
    "trailing garbage": dict(raw=lambda raw: raw + b"\xff" * 100, may_load=True),
}


def build(raw, case):
    parts = C.GGUFParts(raw)
    counts = {}
    if "kv" in case:
        parts.set(*case["kv"])
    if "drop" in case:
        parts.drop(case["drop"])
    if "edit" in case:
        case["edit"](parts)
    if "tok" in case:                    # a minimal valid tokenizer around the hostile key
        defaults = {"tokenizer.ggml.model": (8, C.gguf_string("gpt2")),
                    "tokenizer.ggml.tokens": (9, array(8, [C.gguf_string(t) for t in
                                                           ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
                                                           + [chr(97 + i % 26) * (1 + i // 26) for i in range(61)]])),
                    "tokenizer.ggml.token_type": (9, array(5, [struct.pack("<i", 3)] * 3 + [struct.pack("<i", 1)] * 61))}
        for key, (vtype, value) in defaults.items():
            if not any(e[0] == key for e in parts.kv):
                parts.set(key, vtype, value)
    if "n_tensors_delta" in case:
        counts["n_tensors"] = len(parts.tensors) + case["n_tensors_delta"]
    if "n_kv_delta" in case:
        counts["n_kv"] = len(parts.kv) + case["n_kv_delta"]
    for key in ("n_tensors", "n_kv", "version"):
        if key in case:
            counts[key] = case[key]
    counts["extra_kv"] = case.get("raw_kv", b"")
    out = parts.to_bytes(**counts)
    return case["raw"](out) if "raw" in case else out


@pytest.mark.parametrize("case", sorted(REBUILT))
def test_rebuilt_file(worker, files, reference, target, case):
    spec = REBUILT[case]
    out = load(worker, target, reference, build(files["i2_s"].read_bytes(), spec))
    if spec.get("fast"):
        assert out["seconds"] < 2.0, f"{case}: {out['seconds']:.1f} s (work proportional to a header value)"
    if spec.get("may_load") and out["outcome"] == "loaded":
        return                    # a different but well-formed file (a documented choice, see the case)
    assert_error(out, target)


def test_same_model_when_nothing_read_changes(worker, files, reference, target):
    """Rebuilding the file untouched, or adding an unknown key, gives the same model (so every error
    above comes from the corruption, not from the rebuilding)."""
    raw = files["i2_s"].read_bytes()
    assert load(worker, target, reference, C.GGUFParts(raw).to_bytes())["same"]
    extra = C.GGUFParts(raw).set("somebody.else", 8, C.gguf_string("hello"))
    assert load(worker, target, reference, extra.to_bytes())["same"]


def test_not_a_file(worker, reference, tmp_path):
    for path in (tmp_path / "missing.gguf", tmp_path):
        assert_error(load(worker, path, reference), path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_error(load(worker, empty, reference), empty, match=("empty",))
    fifo, zero = tmp_path / "fifo.gguf", tmp_path / "zero.gguf"          # must not block or read forever
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        assert_error(load(worker, path, reference), path)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"model": 3}', '{"model": {"type": "BPE", "vocab": {"a": "x"}}}',
                                  '{"model": {"type": "BPE", "vocab": []}}', "[" * 100000 + "]" * 100000,
                                  '{"model": ' + "1" * 5000 + "}", "\udcff"])
def test_export_with_a_hostile_tokenizer_file(tmp_path, text):
    """The writer reads a user's tokenizer.json too: anything malformed is a GGUFError naming it."""
    from refbitnet.gguf import write_gguf
    from refbitnet.checkpoint import read_checkpoint_tensors
    from refbitnet.errors import GGUFError
    src = C.write_checkpoint_dir(tmp_path / "src")
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(GGUFError, match="tokenizer.json"):
        write_gguf(tmp_path / "out.gguf", C.tiny_config(), dict(read_checkpoint_tensors(src)), tokenizer_file=tok)
