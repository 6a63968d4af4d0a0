"""Helpers for the hostile-input tests: tiny real files, maps of their bytes, and a loader worker.

- ``write_checkpoint_dir`` / ``write_gguf_file``: a tiny BitNet model written by refbitnet's own writers
  (``checkpoint.save_checkpoint`` and ``gguf.write_gguf``), plus a small word-level tokenizer.json.
- ``safetensors_spans`` / ``gguf_spans``: where each part of such a file lives (header, metadata, tensor
  table, each tensor's bytes), parsed here independently of refbitnet, so a test can say what a
  corruption at a given offset must do.
- ``LoaderWorker``: a long-lived subprocess (``python -X faulthandler``) that loads one file per request
  and answers with the outcome. A segfault kills only the worker (the test sees its faulthandler
  dump), a hang is cut off by a per-case time limit (30 s), a load that takes over 5 s fails too (a
  tiny file loads in about 0.05 s, so that is work driven by a header value), and the address space
  is capped so a hostile size cannot make the machine swap.

Outcomes: "error" (a RefBitNetError subclass: its class and message), "loaded" (with a fingerprint of
the logits of a fixed input, to tell "the corruption changed nothing" from "a different model"), or
"other" (any other exception: always a test failure).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CASE_TIMEOUT = 30.0                  # seconds one load may take before it counts as a hang
SLOW_CASE = 5.0                      # a tiny file loads in ~0.05 s: more than this is work driven by a header value
WORKER_MEMORY_LIMIT = 6 << 30        # bytes of address space for the worker (RLIMIT_AS)
FINGERPRINT_IDS = [0, 5, 9, 3, 17, 2, 33, 8]

# ------------------------------------------------------------------------------------------ tiny models

def tiny_config():
    """One layer, D = 256 (every GGUF layout needs K % 256 == 0), V = 64: files of about 140 kB."""
    from refbitnet.config import Config
    return Config(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                  eos_token_id=1)


def latent_weights(config, seed=0):
    """Random float weights in the HF names (what a trainer produces)."""
    from refbitnet.config import NORMS, PROJECTIONS, tensor_name as _name
    rng = np.random.default_rng(seed)
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    w = {"model.embed_tokens.weight": (rng.standard_normal((config.vocab_size, d)) * 0.5).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(config.num_hidden_layers):
        for proj, module in PROJECTIONS:
            w[_name(i, proj, module)] = (rng.standard_normal(shapes[proj]) * 0.1).astype(np.float32)
        for norm, module in NORMS:
            width = f if norm == "ffn_sub_norm" else d
            w[_name(i, norm, module)] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
    return w


TOKENIZER_WORDS = ["hello", "world", "ternary", "weights", "bit", "net", "one", "scale", "per", "tensor"]


def tokenizer_json() -> dict:
    """A small word-level tokenizer.json with the three specials refbitnet's Tokenizer needs (ids 0..13)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    vocab = {tok: i for i, tok in enumerate(specials + ["[UNK]"] + TOKENIZER_WORDS)}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(specials)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}


def write_checkpoint_dir(directory, config=None, seed=0) -> Path:
    """config.json + model.safetensors (packed release layout) + tokenizer.json, via save_checkpoint."""
    from refbitnet.checkpoint import save_checkpoint
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config()
    tok = directory.parent / f"{directory.name}-tokenizer.json"
    tok.write_text(json.dumps(tokenizer_json()))
    save_checkpoint(directory, config, latent_weights(config, seed), tokenizer_file=tok)
    return directory


def write_gguf_file(path, layout="i2_s", config=None, seed=0) -> Path:
    """A tiny model exported with gguf.write_gguf (no tokenizer metadata)."""
    from refbitnet import gguf
    from refbitnet.checkpoint import read_checkpoint_tensors
    path = Path(path)
    src = path.parent / f"{path.stem}-src"
    write_checkpoint_dir(src, config, seed)
    gguf.write_gguf(path, config or tiny_config(), dict(read_checkpoint_tensors(src)), layout=layout)
    return path


# ------------------------------------------------------------------------------------------ byte maps

def safetensors_spans(raw: bytes) -> dict:
    """{"header_end": 8 + header length, "tensors": [(name, dtype, shape, begin, end)] absolute offsets}."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    tensors = [(name, info["dtype"], info["shape"], 8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1])
               for name, info in header.items() if name != "__metadata__"]
    return {"header_end": 8 + n, "tensors": sorted(tensors, key=lambda t: t[3])}


def gguf_spans(raw: bytes) -> dict:
    """Regions of a GGUF v3 file: fixed header [0, 24), metadata [24, kv_end), tensor table
    [kv_end, table_end), padding [table_end, data_start), and each tensor's data as
    (name, type_id, ne, begin, end) with absolute offsets (nbytes from the GGML type)."""
    pos = 24
    n_tensors, n_kv = struct.unpack("<QQ", raw[8:24])

    def string(p):
        k = struct.unpack("<Q", raw[p:p + 8])[0]
        return raw[p + 8:p + 8 + k].decode("utf-8", "replace"), p + 8 + k

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(p, vtype):
        if vtype in sizes:
            return p + sizes[vtype]
        if vtype == 8:
            return string(p)[1]
        etype, count = struct.unpack("<IQ", raw[p:p + 12])
        p += 12
        for _ in range(count):
            p = value(p, etype)
        return p

    kv = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        vtype = struct.unpack("<I", raw[pos:pos + 4])[0]
        kv[key] = (pos + 4, vtype)                      # where the value starts, its type
        pos = value(pos + 4, vtype)
    kv_end = pos
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        n_dims = struct.unpack("<I", raw[pos:pos + 4])[0]
        ne = struct.unpack(f"<{n_dims}Q", raw[pos + 4:pos + 4 + 8 * n_dims])
        pos += 4 + 8 * n_dims
        type_id, rel = struct.unpack("<IQ", raw[pos:pos + 12])
        pos += 12
        infos.append((name, type_id, ne, rel))
    table_end = pos
    data_start = -(-table_end // 32) * 32
    tensors = []
    for name, type_id, ne, rel in infos:
        n = int(np.prod(ne))
        nbytes = {0: 4 * n, 1: 2 * n, 30: 2 * n, 36: n // 4 + 32, 35: n // 256 * 66, 34: n // 256 * 54}[type_id]
        tensors.append((name, type_id, ne, data_start + rel, data_start + rel + nbytes))
    return {"kv": kv, "kv_end": kv_end, "table_end": table_end, "data_start": data_start,
            "tensors": sorted(tensors, key=lambda t: t[3])}


def gguf_string(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(raw)) + raw


class GGUFParts:
    """A GGUF file taken apart for editing: kv [(key, vtype, raw value bytes)], tensors
    [[name, ne list, type_id, relative offset]], data (bytes after the aligned tensor table)."""

    def __init__(self, raw: bytes):
        spans = gguf_spans(raw)
        self.version = struct.unpack("<I", raw[4:8])[0]
        self.kv = []
        entries = sorted(spans["kv"].items(), key=lambda kv: kv[1][0])
        ends = [v[0] for _, v in entries[1:]]
        for (key, (start, vtype)), nxt in zip(entries, ends + [None]):
            end = spans["kv_end"] if nxt is None else nxt - 8 - len(next(k for k, v in entries if v[0] == nxt).encode()) - 4
            self.kv.append([key, vtype, raw[start:end]])
        self.tensors = []
        for name, type_id, ne, begin, end in spans["tensors"]:
            self.tensors.append([name, list(ne), type_id, begin - spans["data_start"]])
        self.data = raw[spans["data_start"]:]
        self.alignment = 32

    def set(self, key, vtype, raw_value: bytes):
        for entry in self.kv:
            if entry[0] == key:
                entry[1], entry[2] = vtype, raw_value
                return self
        self.kv.append([key, vtype, raw_value])
        return self

    def drop(self, key):
        self.kv = [e for e in self.kv if e[0] != key]
        return self

    def tensor(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def to_bytes(self, n_tensors=None, n_kv=None, version=None, extra_kv: bytes = b"") -> bytes:
        """The file; extra_kv: raw bytes of one more metadata entry (counted), after the others."""
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version if version is None else version,
                                              len(self.tensors) if n_tensors is None else n_tensors,
                                              len(self.kv) + bool(extra_kv) if n_kv is None else n_kv))
        for key, vtype, value in self.kv:
            out += gguf_string(key) + struct.pack("<I", vtype) + value
        out += extra_kv
        for name, ne, type_id, rel in self.tensors:
            out += gguf_string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            out += struct.pack("<IQ", type_id, rel)
        out += bytes(-len(out) % self.alignment)
        return bytes(out) + self.data


def tensor_at(spans: dict, offset: int):
    """The tensor entry whose bytes hold offset, or None."""
    for t in spans["tensors"]:
        if t[-2] <= offset < t[-1]:
            return t
    return None


def bf16_is_invalid(bits: int) -> bool:
    """NaN or inf (all exponent bits set)."""
    return bits & 0x7F80 == 0x7F80


def byte_has_code_3(byte: int) -> bool:
    """Some 2-bit field of the byte equals 3 (no ternary encoder writes it)."""
    return any((byte >> s) & 3 == 3 for s in (0, 2, 4, 6))


# ------------------------------------------------------------------------------------------ stats

STATS: dict = {}


def record(fmt: str, outcome: dict, wall: float) -> None:
    s = STATS.setdefault(fmt, {"tried": 0, "error": 0, "loaded_same": 0, "loaded_different": 0,
                               "max_seconds": 0.0})
    s["tried"] += 1
    if outcome["outcome"] == "error":
        s["error"] += 1
    elif outcome["outcome"] == "loaded":
        s["loaded_same" if outcome.get("same") else "loaded_different"] += 1
    s["max_seconds"] = max(s["max_seconds"], wall)


def _dump_stats():
    target = os.environ.get("REFBITNET_HOSTILE_STATS")
    if target and STATS:
        old = {}
        if os.path.exists(target):
            try:
                old = json.loads(Path(target).read_text())
            except ValueError:
                old = {}
        for fmt, s in STATS.items():
            o = old.setdefault(fmt, {k: 0 for k in s})
            for k, v in s.items():
                o[k] = max(o.get(k, 0), v) if k == "max_seconds" else o.get(k, 0) + v
        Path(target).write_text(json.dumps(old, indent=1, sort_keys=True))


atexit.register(_dump_stats)


# ------------------------------------------------------------------------------------------ the worker

class WorkerFailure(AssertionError):
    """The worker crashed, hung, or raised something that is not a RefBitNetError."""


class LoaderWorker:
    """Loads files in a subprocess. ``run(op, path)`` -> outcome dict (see module docstring).

    ops: "dir" (refbitnet.load), "safetensors" (checkpoint.read_safetensors), "gguf" (gguf.load_gguf),
    "config" (Config.from_json), "tokenizer" (Tokenizer.from_file). Extra environment (e.g.
    NUMBA_BOUNDSCHECK) can be passed at construction.
    """

    def __init__(self, env: dict | None = None):
        # One BLAS thread: the tiny matmuls of a fingerprint are 10x slower with threads on a busy machine.
        self.env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                        MKL_NUM_THREADS="1", **(env or {}))
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", str(HERE / "_corrupt.py"), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=self.env, cwd=str(REPO), text=True, bufsize=1)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _restart_after(self, what: str, request: dict):
        self.proc.kill()
        _, err = self.proc.communicate()
        self.start()
        raise WorkerFailure(f"{what} on {request}:\n{err[-4000:]}")

    def run(self, op: str, path, timeout: float = CASE_TIMEOUT, reference: str | None = None,
            slow: float = SLOW_CASE) -> dict:
        """Load path in the worker. reference: a fingerprint; sets outcome["same"] for loads. A load
        taking more than timeout seconds is a hang, more than slow seconds a failure too."""
        request = {"op": op, "path": os.fspath(path)}
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._restart_after("worker died before the request", request)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self._restart_after(f"HANG: no answer within {timeout} s", request)
        line = self.proc.stdout.readline()
        wall = time.perf_counter() - t0
        if not line:
            self._restart_after("CRASH: the worker died (faulthandler output below)", request)
        outcome = json.loads(line)
        outcome["wall"] = wall
        if outcome["outcome"] == "loaded" and reference is not None:
            outcome["same"] = outcome["fingerprint"] == reference
        if outcome["seconds"] > slow:
            raise WorkerFailure(f"SLOW: {op} {path} took {outcome['seconds']:.1f} s (limit {slow} s): {outcome}")
        if outcome["outcome"] == "other":
            raise WorkerFailure(f"{op} {path}: raised {outcome['exc']} (not a RefBitNetError): "
                                f"{outcome['message']}\n{outcome.get('traceback', '')}")
        return outcome


def _fingerprint(model) -> str:
    import hashlib
    try:
        logits = model.forward(np.array(FINGERPRINT_IDS[:min(8, model.config.max_position_embeddings)]) %
                               model.config.vocab_size)
    except Exception as e:               # a loaded model whose forward raises: part of the fingerprint
        return f"forward raised {type(e).__name__}: {e}"
    return hashlib.sha256(logits.tobytes()).hexdigest()


def _serve():
    import resource
    import traceback
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))
    sys.setrecursionlimit(1000)            # the default; a hostile file must not rely on more
    import refbitnet
    from refbitnet import checkpoint
    from refbitnet import gguf
    from refbitnet.config import Config
    from refbitnet.errors import RefBitNetError
    from refbitnet.tokenizer import Tokenizer
    for line in sys.stdin:
        request = json.loads(line)
        op, path = request["op"], request["path"]
        t0 = time.perf_counter()
        answer = {"outcome": "loaded", "fingerprint": None}
        try:
            if op == "dir":
                answer["fingerprint"] = _fingerprint(refbitnet.load(path))
            elif op == "gguf":
                answer["fingerprint"] = _fingerprint(gguf.load_gguf(path, tokenizer=True))
            elif op == "safetensors":
                tensors = checkpoint.read_safetensors(path)
                answer["fingerprint"] = str(sorted((k, v.dtype.str, v.shape, bytes(np.asarray(v)).hex()[:64])
                                                   for k, v in tensors.items()))
            elif op == "config":
                answer["fingerprint"] = json.dumps(Config.from_json(path).to_dict(), sort_keys=True, default=str)
            elif op == "tokenizer":
                tok = Tokenizer.from_file(path)
                answer["fingerprint"] = str(tok.encode("hello world ternary weights", add_bos=True))
            else:
                raise KeyError(op)
        except RefBitNetError as e:
            answer = {"outcome": "error", "exc": type(e).__name__, "message": str(e)}
        except BaseException as e:        # noqa: BLE001  anything else is a finding
            answer = {"outcome": "other", "exc": type(e).__name__, "message": str(e)[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        answer["seconds"] = time.perf_counter() - t0
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
