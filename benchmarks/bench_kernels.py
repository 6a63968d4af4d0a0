"""Kernel speed on the BitNet b1.58 2B4T shapes, against this machine's memory bandwidth (not a test).

    python benchmarks/bench_kernels.py [--rounds 5] [--pool-mb 160] [--quick] [--results PATH]

Every ternary kernel is reached through the one door the model uses, ``refbitnet.kernels.TernaryLinear``,
forced by name where versions are compared; a timing of ``door(x)`` is what the runtime pays (the fused
quantize-and-lay-out pass plus the kernel), a timing of ``door.acc(xq)`` the integer kernel from int8
activations. For each projection shape (N x K) at 1 and 2 threads it prints the time of one GEMV (S = 1,
decode) of the kernel "auto" picks (v6 with AVX512-VNNI, v4 on AVX2, when K % 128 == 0, else v3) and of v3 beside it, the weight
bytes read, GB/s, and that as a fraction of two bandwidths measured in the same run: "copy" (np.copyto of
512 MiB: bytes read + written / time) and "sum" (a Numba prange sum over 512 MiB at the same thread count:
bytes read / time). Beside it, in the same run: the NumPy reference path (refbitnet.bitlinear: float32 BLAS
on int8 codes + epilogue) and torch F.linear on the dequantized float32 weights (bf16 for the LM head).
Then a 128-token GEMM per shape (v3, v4_blocked, v5) as 'x GEMV' = tokens/s over the GEMV's, the compute
floor of that GEMM, the two LM head kernels, the ladder of versions, the first-call compile time and the
cached start time of a fresh process, and the instruction mix of each kernel's hottest loop.

Everything printed is also written, with the machine, the command and the date, to --results
(default benchmarks/results/kernels.md).

Noise: the machine has 2 cores shared with other jobs. Every figure is the best of --rounds rounds, and
the rounds interleave all variants (each round runs every shape/thread/kernel once), so a busy moment
hurts all variants alike instead of one. GEMV timings cycle through a pool of weight copies larger than
the L3 cache, so the weights come from DRAM as in a real decode step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refbitnet import kernels  # noqa: E402  (sets the LLVM option before anything compiles)
from refbitnet.bf16 import f32_to_bf16  # noqa: E402
from refbitnet.bitlinear import bitlinear_epilogue, ternary_matmul_exact  # noqa: E402
from refbitnet.kernels import TernaryLinear, reference, v6_vnni  # noqa: E402
from refbitnet.kernels.avx2 import available as avx2_available, madd_intrinsics  # noqa: E402
from refbitnet.layouts import pack_kernel  # noqa: E402
from refbitnet.quant import absmax_int8  # noqa: E402

from llvmlite import ir  # noqa: E402
from numba import njit, prange  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.md")
SHAPES = [  # name, N (out), K (in)
    ("q/o", 2560, 2560),
    ("k/v", 640, 2560),
    ("gate/up", 6912, 2560),
    ("down", 2560, 6912),
]
HEAD = ("lm_head", 128256, 2560)
THREADS = [1, 2]


@njit(cache=True, parallel=True)
def _parallel_sum(a):
    total = 0
    for i in prange(a.shape[0]):
        total += a[i]
    return total


# ---- the compute floor of the prefill GEMM: independent (vpmaddubsw, vpaddw) pairs, the two instructions every
# 32 int8 products of the v4/v5 kernels need (one multiply-add into int16 pairs, one add into an accumulator)
PROBE_CHAINS = 12           # enough independent chains to hide the 4-cycle latency of a pair


@intrinsic
def _madd_add_chains(typingctx, n):
    """n iterations of PROBE_CHAINS independent acc = acc + vpmaddubsw(acc, ones) chains -> an int64 (kept live)."""
    sig = types.int64(types.intp)

    def codegen(context, builder, signature, args):
        v32i8, v16i16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
        maddubs, _ = madd_intrinsics(builder.module)
        ones = ir.Constant(v32i8, [1] * 32)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16i16, [c] * 16)) for c in range(PROBE_CHAINS)]
        with cgutils.for_range(builder, args[0]):
            for a in accs:
                v = builder.load(a)
                builder.store(builder.add(v, builder.call(maddubs, [builder.bitcast(v, v32i8), ones])), a)
        total = builder.load(accs[0])
        for a in accs[1:]:
            total = builder.add(total, builder.load(a))
        return builder.sext(builder.extract_element(total, ir.Constant(ir.IntType(32), 0)), ir.IntType(64))
    return sig, codegen


@njit(cache=True, parallel=True)
def _madd_probe(n, tasks):
    out = np.zeros(tasks, np.int64)
    for t in prange(tasks):
        out[t] = _madd_add_chains(n)
    return out


def madd_pair_rate(threads, n=5_000_000, rounds=5):
    """Pairs per second per core with `threads` threads each running the probe (best of rounds)."""
    kernels.set_num_threads(threads)
    _madd_probe(10, threads)
    t = best_time(lambda: _madd_probe(n, threads), rounds)
    return n * PROBE_CHAINS / t


def best_time(fn, rounds=1):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class Bandwidth:
    """Copy and sum bandwidth (GB/s), best seen so far; measured inside each benchmark round."""

    def __init__(self, mib=512):
        self.src = np.ones(mib * 2**20 // 8, np.uint64)
        self.dst = np.empty_like(self.src)
        self.copy = 0.0
        self.sum = {n: 0.0 for n in THREADS}
        _parallel_sum(self.src[:16])

    def measure(self):
        t = best_time(lambda: np.copyto(self.dst, self.src))
        self.copy = max(self.copy, 2 * self.src.nbytes / t / 1e9)
        for n in THREADS:
            kernels.set_num_threads(n)
            t = best_time(lambda: _parallel_sum(self.src))
            self.sum[n] = max(self.sum[n], self.src.nbytes / t / 1e9)


def random_ternary(rng, n, k):
    return rng.integers(-1, 2, (n, k), dtype=np.int8)


def compile_times():
    """First-call time in a fresh process with an empty Numba cache, then a second process on that cache."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import numpy as np\n"
        "from refbitnet import kernels\n"
        "from refbitnet.layouts import pack_kernel\n"
        "t = time.perf_counter()\n"
        "p = pack_kernel(np.zeros((64, 256), np.int8))\n"
        "door = kernels.TernaryLinear(p, np.float32(1))\n"
        "for S in (1, 4, 8):\n"
        "    door(np.ones((S, 256), np.float32)); door.acc(np.zeros((S, 256), np.int8))\n"
        "    kernels.bf16_matmul(np.ones((S, 256), np.float32), np.zeros((64, 256), np.uint16))\n"
        "print(t - t0, time.perf_counter() - t)\n")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        out = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out.append([float(v) for v in r.stdout.strip().splitlines()[-1].split()])
    return out


_ASM_PROBE = r"""
import re, numpy as np
from collections import Counter
from refbitnet import kernels
from refbitnet.kernels import lm_head_v2, v3_word_planes as v3, v4_maddubs as v4, v5_prefill as v5, v6_vnni as v6
from refbitnet.layouts import pack_kernel
p, x = pack_kernel(np.zeros((8, 256), np.int8)), np.ones((5, 256), np.float32)
for name in ("v3", "v4", "v4_blocked", "v5") + (("v6",) if v6.available() else ()):
    kernels.TernaryLinear(p, 1.0, kernel=name)(x)
    kernels.TernaryLinear(p, 1.0, kernel=name)(x[:1])
kernels.bf16_matmul(np.ones((1, 256), np.float32), np.zeros((8, 256), np.uint16))
probes = [("v3 matmul_scaled", v3.matmul_scaled, "vpmaddwd"), ("lm_head v2", lm_head_v2.bf16_matmul_kernel_v2, "vmulps"),
          ("v4 GEMV (1 token x 1 row per chunk)", v4.matmul_scaled_v4, "vpmaddubsw"),
          ("v4 blocked (4 tokens x 1 row per chunk)", v4.matmul_scaled_v4_blocked, "vpmaddubsw"),
          ("v5 (8 tokens x 1 row per chunk)", v5._tile, "vpdpbusd" if v5.VNNI else "vpmaddubsw")]
if v6.available():
    probes.append(("v6 GEMV (4 chunks x 4 fields per iteration)", v6.matmul_scaled_v6, "vpdpbusd"))
for name, disp, marker in probes:
    asm = next(iter(disp.inspect_asm().values()))
    blocks = re.split(r"\n(?=\.LBB)", asm)                     # basic blocks
    loop = max(blocks, key=lambda b: len(re.findall(marker + r"\s[^\n]*[xyz]mm", b)))   # any vector width
    width = sorted(set(re.findall(marker + r"\s[^\n]*?([xyz]mm)", loop)))
    ops = []
    for ln in loop.splitlines()[1:]:                             # up to the loop's closing jump
        if ln.strip() and not ln.strip().startswith((".", "#")):
            ops.append(ln.split()[0])
            if ops[-1].startswith("j"):
                break
    print(f"{name}: {len(ops)} instructions per iteration, {marker} on {'/'.join(width) or 'no vector'} registers",
          dict(Counter(ops).most_common(6)))
"""


def inner_loop_mix():
    """Compile in a fresh cache (inspection is disabled for cached code) and count the hottest loop's instructions."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        r = subprocess.run([sys.executable, "-c", _ASM_PROBE], env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip()


class Report:
    """Lines printed as they come and kept, for the results file."""

    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.extend(str(text).split("\n"))


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, AVX2 {'yes' if avx2_available() else 'no'}"


def write_results(path, args, out):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("# Kernel benchmark (written by benchmarks/bench_kernels.py; regenerate, do not edit)\n\n")
        f.write(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n- machine: {machine()}\n")
        f.write(f"- command: `{' '.join(['python benchmarks/bench_kernels.py'] + sys.argv[1:])}`"
                f" (rounds {args.rounds}, GEMM {args.gemm_tokens} tokens)\n\n```\n")
        f.write("\n".join(out.lines).rstrip() + "\n```\n")


def pooled_time(fn, pool):
    """Seconds per call of fn(item) over a pool of weight copies (each call reads another copy from DRAM)."""
    t = time.perf_counter()
    for item in pool:
        fn(item)
    return (time.perf_counter() - t) / len(pool)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-mb", type=int, default=160, help="weight copies cycled through per GEMV timing")
    ap.add_argument("--gemm-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no torch, no compile-time subprocesses")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--results", default=RESULTS, help="the results file (markdown); '' writes none")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 2
    out = Report()
    rng = np.random.default_rng(0)
    use_avx2 = avx2_available() and all(K % 128 == 0 for _, _, K in SHAPES)
    gemm_kernels = ("v3", "v4_blocked", "v5") if use_avx2 else ("v3",)
    torch = None
    if not args.quick:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None

    bw = Bandwidth()
    # ---- operands for every shape: a door per weight copy ("auto" and v3 for the GEMV, one per GEMM kernel)
    cases = {}
    for name, N, K in SHAPES:
        codes = random_ternary(rng, N, K)
        packed = pack_kernel(codes)
        ws = np.float32(0.0123)
        copies = max(2, -(-args.pool_mb * 2**20 // packed.nbytes))
        pool = [packed.copy() for _ in range(copies)]
        x = rng.standard_normal((1, K)).astype(np.float32)
        xq, s = absmax_int8(x)
        xg = rng.standard_normal((args.gemm_tokens, K)).astype(np.float32)
        c = dict(N=N, K=K, codes=codes, packed=packed, x=x, xq=xq, s=s, xg=xg, ws=ws,
                 auto=[TernaryLinear(p, ws) for p in pool], v3=[TernaryLinear(p, ws, kernel="v3") for p in pool],
                 gemm={k: TernaryLinear(packed, ws, kernel=k) for k in gemm_kernels})
        want = reference.ternary_matmul_reference(xq, s, packed, ws)
        for door in (c["auto"][0], c["v3"][0]):
            assert np.array_equal(door(x).view(np.uint32), want.view(np.uint32)), door
        want_g = reference.ternary_matmul_reference(*absmax_int8(xg), packed, ws)
        for door in c["gemm"].values():
            assert np.array_equal(door(xg).view(np.uint32), want_g.view(np.uint32)), door
        if torch is not None:
            c["w_torch"] = torch.from_numpy(codes.astype(np.float32) * ws)
            c["x_torch"] = torch.from_numpy(x)
        cases[name] = c
    name, V, K = HEAD
    table = f32_to_bf16((rng.standard_normal((V, K)) * 0.02).astype(np.float32))    # uint16 [V, K], 656 MB
    xh = rng.standard_normal((1, K)).astype(np.float32)
    head = dict(table=table, x=xh, xg=rng.standard_normal((args.gemm_tokens, K)).astype(np.float32))
    if torch is not None:
        head["w_torch"] = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16)
        head["x_torch"] = torch.from_numpy(xh).to(torch.bfloat16)
    for k in ("v1", "v2"):
        kernels.bf16_matmul(xh, table[:64], kernel=k)

    gemv, gemv_v3, gemm, head_t, numpy_t, torch_t = {}, {}, {}, {}, {}, {}   # (shape, threads[, kernel]) -> s
    for r in range(args.rounds):
        bw.measure()
        for nt in THREADS:
            kernels.set_num_threads(nt)
            for name, c in cases.items():
                x = c["x"]
                t = pooled_time(lambda door: door(x), c["auto"])
                gemv[name, nt] = min(gemv.get((name, nt), 1e9), t)
                t = pooled_time(lambda door: door(x), c["v3"])
                gemv_v3[name, nt] = min(gemv_v3.get((name, nt), 1e9), t)
                for _ in range(2 if use_avx2 else 1):         # the GEMM kernels alternated
                    for k, door in c["gemm"].items():
                        t = best_time(lambda: door(c["xg"]))
                        gemm[name, nt, k] = min(gemm.get((name, nt, k), 1e9), t)
                if torch is not None and r < 3:
                    torch.set_num_threads(nt)
                    t = best_time(lambda: F.linear(c["x_torch"], c["w_torch"]), 3)
                    torch_t[name, nt] = min(torch_t.get((name, nt), 1e9), t)
            for k in ("v1", "v2"):
                t = best_time(lambda: kernels.bf16_matmul(head["x"], head["table"], kernel=k))
                head_t[nt, k] = min(head_t.get((nt, k), 1e9), t)
            if r == 0:
                t = best_time(lambda: kernels.bf16_matmul(head["xg"], head["table"]))
                gemm[HEAD[0], nt, "v2"] = t
            if torch is not None and r < 2:
                torch.set_num_threads(nt)
                t = best_time(lambda: F.linear(head["x_torch"], head["w_torch"]))
                torch_t[HEAD[0], nt] = min(torch_t.get((HEAD[0], nt), 1e9), t)
        if r < 2:   # the NumPy reference path (BLAS threads as configured; slow, so two rounds)
            for name, c in cases.items():
                t = best_time(lambda: bitlinear_epilogue(ternary_matmul_exact(c["xq"], c["codes"]), c["s"], c["ws"]))
                numpy_t[name] = min(numpy_t.get(name, 1e9), t)

    # ---- the ladder of versions on one shape (gate/up), S = 1, 1 thread (least disturbed by neighbours):
    # door.acc(xq), the integer kernel from int8 activations (v4 through its unit-scale epilogue)
    ladder = {}
    c = cases["gate/up"]
    kernels.set_num_threads(1)
    ladder_kernels = [("reference", "numpy reference (int64 unpack+matmul)", c["packed"].nbytes),
                      ("v1", "v1 unpacked int8", c["codes"].nbytes),
                      ("v2", "v2 packed, scalar decode", c["packed"].nbytes),
                      ("v3", "v3 word planes (vpmaddwd)", c["packed"].nbytes)]
    if use_avx2:
        ladder_kernels.append(("v4", "v4 byte planes (vpmaddubsw)", c["packed"].nbytes))
        if v6_vnni.available():
            ladder_kernels.append(("v6", "v6 byte planes (vpdpbusd, masked fields, prefetch)", c["packed"].nbytes))
    doors = {k: TernaryLinear(c["packed"], c["ws"], kernel=k) for k, _, _ in ladder_kernels}
    want = reference.ternary_matmul_acc_reference(c["xq"], c["packed"])
    for k, door in doors.items():
        assert np.array_equal(door.acc(c["xq"]), want), k
    for _ in range(2):
        for k, label, nbytes in ladder_kernels:
            t = best_time(lambda: doors[k].acc(c["xq"]), 3)
            ladder[label] = (min(ladder.get(label, (1e9,))[0], t), nbytes)

    # ---- report
    out(f"machine: {machine()}")
    out(f"load average during the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs "
        f"(anything above ~0.5 means neighbours share the cores and the 2-thread rows suffer most)")
    out(f"bandwidth (best of {args.rounds} rounds, same run): copy {bw.copy:.1f} GB/s (read+write), "
        f"prange sum " + ", ".join(f"{n} thr {bw.sum[n]:.1f} GB/s" for n in THREADS))
    out("\nGEMV, S = 1 (decode), weights cycled from a pool larger than L3; times are best of the rounds, of "
        "door(x) (fused quantizer + kernel, what the model runs). 'kernel' is TernaryLinear's choice (v6 with "
        "AVX512-VNNI, v4 on AVX2, when K % 128 == 0, else v3; the bf16 head: lm_head_v2); %copy / %sum: its GB/s over the copy / "
        "same-thread prange-sum bandwidth; 'v3 ms' the same door forced to v3, in the same rounds")
    out(f"{'shape':8} {'N x K':>13} {'thr':>3} {'kernel':>7} {'bytes':>9} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'%sum':>5}"
        f" {'v3 ms':>7} {'x v3':>5} {'numpy ms':>9} {'x numpy':>8} {'torch ms':>9} {'x torch':>8}")
    rows = []
    runtime_gemv = {}           # (shape, threads) -> seconds of the GEMV the runtime uses
    for name, N, K in SHAPES + [HEAD]:
        for nt in THREADS:
            nbytes = N * K // 4 if name != HEAD[0] else N * K * 2
            if name == HEAD[0]:
                kernel, t, t3 = "bf16 v2", head_t[nt, "v2"], None
            else:
                kernel, t = cases[name]["auto"][0].kernel_for(1), gemv[name, nt]
                t3 = gemv_v3[name, nt] if kernel != "v3" else None
            runtime_gemv[name, nt] = t
            gbs = nbytes / t / 1e9
            npt = numpy_t.get(name)
            tt = torch_t.get((name, nt))
            rows.append(dict(shape=name, N=N, K=K, threads=nt, kernel=kernel, bytes=nbytes, ms=t * 1e3, gbs=gbs,
                             frac_copy=gbs / bw.copy, frac_sum=gbs / bw.sum[nt], v3_ms=t3 * 1e3 if t3 else None,
                             numpy_ms=npt * 1e3 if npt else None, torch_ms=tt * 1e3 if tt else None))
            out(f"{name:8} {N:>6}x{K:<6} {nt:>3} {kernel:>7} {nbytes / 1e6:>7.2f}MB {t * 1e3:>8.3f} {gbs:>6.1f} "
                f"{100 * gbs / bw.copy:>5.0f}% {100 * gbs / bw.sum[nt]:>4.0f}% "
                + (f"{t3 * 1e3:>7.3f} {t3 / t:>4.1f}x " if t3 else f"{'-':>7} {'-':>5} ")
                + (f"{npt * 1e3:>9.2f} {npt / t:>7.1f}x " if npt else f"{'-':>9} {'-':>8} ")
                + (f"{tt * 1e3:>9.3f} {tt / t:>7.1f}x" if tt else f"{'-':>9} {'-':>8}"))
    out(f"\nGEMM, S = {args.gemm_tokens} tokens (prefill), one weight copy, door(x) forced to each kernel "
        f"(fused quantizer + kernel); 'x GEMV' = tokens/s relative to the GEMV above, i.e. {args.gemm_tokens} x "
        f"GEMV time / GEMM time; 'v5 gain' = v4_blocked time / v5 time. TernaryLinear runs v4_blocked for 2-4 "
        f"tokens and v5 beyond.")
    out(f"{'shape':8} {'thr':>3}" + "".join(f" {k + ' ms':>13} {'x GEMV':>7}" for k in gemm_kernels)
        + (f" {'v5 gain':>7}" if use_avx2 else ""))
    for name, N, K in SHAPES + [HEAD]:
        for nt in THREADS:
            t1 = runtime_gemv[name, nt]
            ks = ("v2",) if name == HEAD[0] else gemm_kernels
            row = dict(shape=name, threads=nt, gemm_tokens=args.gemm_tokens,
                       **{f"gemm_{k}_ms": gemm[name, nt, k] * 1e3 for k in ks})
            line = f"{name:8} {nt:>3}" + "".join(f" {gemm[name, nt, k] * 1e3:>13.2f} "
                                                 f"{args.gemm_tokens * t1 / gemm[name, nt, k]:>6.2f}x" for k in ks)
            if use_avx2 and name != HEAD[0]:
                line += f" {gemm[name, nt, 'v4_blocked'] / gemm[name, nt, 'v5']:>6.2f}x"
            rows.append(row)
            out(line + ("   (bf16 head, lm_head_v2)" if name == HEAD[0] else ""))
    if use_avx2:
        rates = {nt: madd_pair_rate(nt) for nt in THREADS}
        out(f"\nCompute floor of the prefill GEMM: each 32 int8 products cost one vpmaddubsw + one vpaddw. A probe "
            f"of {PROBE_CHAINS} independent (vpmaddubsw, vpaddw) chains runs "
            + ", ".join(f"{rates[nt] / 1e9:.2f} G pairs/s per core at {nt} thread{'s' if nt > 1 else ''}"
                        for nt in THREADS)
            + f". 'needed' = the rate per core that a {args.gemm_tokens}-token GEMM must sustain to reach 4x the "
              "GEMV above; it is out of reach wherever it exceeds the probe."
            + (" (This CPU has AVX512-VNNI: v5 sums with one vpdpbusd per 32 products instead, so its '% probe' "
               "can exceed 100%.)" if v6_vnni.available() else ""))
        out(f"{'shape':8} {'thr':>3} {'v5 G/s':>8} {'% probe':>8} {'needed':>8} {'% probe':>8}")
        for name, N, K in SHAPES:
            for nt in THREADS:
                pairs = args.gemm_tokens * N * K / 32
                have = pairs / gemm[name, nt, "v5"] / nt
                need = pairs / (args.gemm_tokens * runtime_gemv[name, nt] / 4) / nt
                rows.append(dict(shape=name, threads=nt, probe_pairs_per_s=rates[nt], v5_pairs_per_s=have,
                                 needed_pairs_per_s_for_4x=need))
                out(f"{name:8} {nt:>3} {have / 1e9:>8.2f} {100 * have / rates[nt]:>7.0f}% {need / 1e9:>8.2f} "
                    f"{100 * need / rates[nt]:>7.0f}%")
    out("\nLM head GEMV, 656 MB bf16: kernels.bf16_matmul forced to v1 (widened through a uint32 scratch row) and "
        "v2 (in registers; 'auto' for K % 16 == 0), same rounds")
    for nt in THREADS:
        tb = HEAD[1] * HEAD[2] * 2
        t1, t2 = head_t[nt, "v1"], head_t[nt, "v2"]
        rows.append(dict(shape="lm_head", threads=nt, v1_ms=t1 * 1e3, v2_ms=t2 * 1e3))
        out(f"  {nt} thr: v1 {t1 * 1e3:7.2f} ms {tb / t1 / 1e9:5.1f} GB/s   "
            f"v2 {t2 * 1e3:7.2f} ms {tb / t2 / 1e9:5.1f} GB/s ({100 * tb / t2 / 1e9 / bw.sum[nt]:.0f}% of sum)")
    out("\nVersions on gate/up 6912x2560, S = 1, 1 thread, one weight copy (partly cache-resident), best of 6: "
        "door.acc(xq) forced to each kernel")
    for label, (t, nbytes) in ladder.items():
        rows.append(dict(ladder=label, ms=t * 1e3, gbs=nbytes / t / 1e9))
        out(f"  {label:40} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:6.2f} GB/s of its own weight bytes")
    if not args.quick:
        (imp1, first), (imp2, cached) = compile_times()
        out(f"\ncompile (a fresh process calling a door at S = 1, 4, 8 and the LM head): empty Numba cache "
            f"{first:.2f} s of first calls (+{imp1:.2f} s imports); second process on that cache {cached:.2f} s "
            f"(+{imp2:.2f} s imports)")
        rows.append(dict(compile_first_s=first, compile_cached_s=cached, import_s=[imp1, imp2]))
        out("\nhottest loop of each kernel (instruction count, most frequent mnemonics):")
        out("  " + inner_loop_mix().replace("\n", "\n  "))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=dict(copy=bw.copy, sum=bw.sum), rows=rows), f, indent=1)
    if args.results:
        write_results(args.results, args, out)
        print(f"\nwritten: {args.results}")


if __name__ == "__main__":
    main()
