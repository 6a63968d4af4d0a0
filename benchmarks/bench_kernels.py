"""Kernel speed on the BitNet b1.58 2B4T shapes, against this machine's memory bandwidth (not a test).

    python benchmarks/bench_kernels.py [--rounds 5] [--pool-mb 160] [--quick]

For each projection shape (N x K) at 1 and 2 threads it prints the time of one GEMV (S = 1, decode),
the weight bytes read, GB/s, and that as a fraction of two bandwidths measured in the same run:
"copy" (np.copyto of 512 MiB: bytes read + written / time) and "sum" (a Numba prange sum over 512 MiB at
the same thread count: bytes read / time). Beside it, in the same run: the NumPy reference path
(refbitnet.bitlinear: float32 BLAS on int8 codes + epilogue) and torch F.linear on the dequantized float32
weights (bf16 for the LM head). The headline GEMV row of a projection is the kernel refbitnet.runtime runs
(v4_maddubs when K % 128 == 0, v3 beside it). Then a 128-token GEMM per shape (v3, v4 pairs / blocked, v5_prefill)
as 'x GEMV' = tokens/s over the runtime GEMV's, and the first-call compile time and the cached start time of
a fresh process.

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
from refbitnet.kernels import reference  # noqa: E402
from refbitnet.kernels.v1_unpacked_int8 import ternary_matmul_acc_v1  # noqa: E402
from refbitnet.kernels.v2_packed_scalar import ternary_matmul_acc_v2  # noqa: E402
from refbitnet.kernels import v4_maddubs  # noqa: E402
from refbitnet.kernels import v5_prefill  # noqa: E402
from refbitnet.kernels.lm_head import bf16_matmul_v1  # noqa: E402
from refbitnet.layouts import pack_kernel  # noqa: E402
from refbitnet.quant import absmax_int8  # noqa: E402

from llvmlite import ir  # noqa: E402
from numba import njit, prange  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from refbitnet.kernels.v4_maddubs import _avx2_madd_intrinsics  # noqa: E402

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
        maddubs, _ = _avx2_madd_intrinsics(builder.module)
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
        "for S in (1, 4):\n"
        "    xq = np.zeros((S, 256), np.int8); s = np.ones(S, np.float32)\n"
        "    kernels.ternary_matmul(xq, s, p, np.float32(1)); kernels.ternary_matmul_acc(xq, p)\n"
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
from refbitnet.kernels import v3_word_planes as v3, lm_head_v2
from refbitnet.layouts import pack_kernel
kernels.ternary_matmul(np.zeros((2, 256), np.int8), np.ones(2, np.float32), pack_kernel(np.zeros((8, 256), np.int8)), 1.0)
kernels.bf16_matmul(np.ones((1, 256), np.float32), np.zeros((8, 256), np.uint16))
from refbitnet.kernels import v4_maddubs as v4, v5_prefill as v5
xq, p = np.zeros((5, 256), np.int8), pack_kernel(np.zeros((8, 256), np.int8))
s, rows, xsum, out = np.ones(5, np.float32), np.ones(8, np.float32), np.zeros(5, np.int32), np.empty((5, 8), np.float32)
v4.matmul_scaled_v4_blocked(p, np.zeros((2, 2, 4, 4, 32), np.int8), xsum, s, rows, out)   # [ceil(5/4), K/128, 4, 4, 32]
v5.ternary_matmul_v5(xq, s, p, 1.0)
for name, disp, marker in (("v3 matmul_scaled", v3.matmul_scaled, "vpmaddwd"), ("lm_head v2", lm_head_v2.bf16_matmul_kernel_v2, "vmulps"),
                           ("v4 blocked (4 tokens x 1 row per chunk)", v4.matmul_scaled_v4_blocked, "vpmaddubsw"),
                           ("v5 (8 tokens x 1 row per chunk)", v5._tile, "vpmaddubsw")):
    asm = next(iter(disp.inspect_asm().values()))
    blocks = re.split(r"\n(?=\.LBB)", asm)                     # basic blocks
    loop = max(blocks, key=lambda b: len(re.findall(marker + r"\s[^\n]*ymm", b)))
    ops = []
    for ln in loop.splitlines()[1:]:                             # up to the loop's closing jump
        if ln.strip() and not ln.strip().startswith((".", "#")):
            ops.append(ln.split()[0])
            if ops[-1].startswith("j"):
                break
    print(f"{name}: {len(ops)} instructions per iteration", dict(Counter(ops).most_common(6)))
"""


def inner_loop_mix():
    """Compile in a fresh cache (inspection is disabled for cached code) and count the hottest loop's instructions."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        r = subprocess.run([sys.executable, "-c", _ASM_PROBE], env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-mb", type=int, default=160, help="weight copies cycled through per GEMV timing")
    ap.add_argument("--gemm-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no torch, no compile-time subprocesses")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 2
    rng = np.random.default_rng(0)
    use_v4 = v4_maddubs.available() and all(K % (4 * v4_maddubs.CHUNK) == 0 for _, _, K in SHAPES)
    v4_gemv, v4_gemm, v4_gemm_blocked, v5_gemm = {}, {}, {}, {}
    torch = None
    if not args.quick:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None

    bw = Bandwidth()
    # ---- operands for every shape
    cases = {}
    for name, N, K in SHAPES:
        codes = random_ternary(rng, N, K)
        packed = pack_kernel(codes)
        copies = max(2, -(-args.pool_mb * 2**20 // packed.nbytes))
        pool = [packed.copy() for _ in range(copies)]
        x = rng.standard_normal((1, K)).astype(np.float32)
        xq, s = absmax_int8(x)
        xg = rng.standard_normal((args.gemm_tokens, K)).astype(np.float32)
        xqg, sg = absmax_int8(xg)
        ws = np.float32(0.0123)
        cases[name] = dict(N=N, K=K, codes=codes, packed=packed, pool=pool, x=x, xq=xq, s=s, xqg=xqg, sg=sg, ws=ws)
        if use_v4:   # v4 operands: int8 byte planes [S, 4, K/4] (planes[s, i, j] = xq[s, 4j + i]), xsum, row scales
            for tag, q in (("", xq), ("g", xqg)):
                cases[name]["v4planes" + tag] = np.ascontiguousarray(q.reshape(q.shape[0], K // 4, 4).transpose(0, 2, 1))
                cases[name]["v4xsum" + tag] = q.astype(np.int64).sum(1).astype(np.int32)
                cases[name]["v4out" + tag] = np.empty((q.shape[0], N), np.float32)
            cases[name]["rows"] = np.full(N, ws, np.float32)
            t4 = v4_maddubs.TOKENS_PER_PASS       # prefill layout: [ceil(S/4), K/128, 4 tokens, 4 planes, 32]
            S = xqg.shape[0]
            blocks = np.zeros((-(-S // t4) * t4, K // 128, 4, 32), np.int8)
            blocks[:S] = xqg.reshape(S, K // 128, 32, 4).transpose(0, 1, 3, 2)
            cases[name]["v4blocks"] = np.ascontiguousarray(blocks.reshape(-1, t4, K // 128, 4, 32).transpose(0, 2, 1, 3, 4))
            cases[name]["v4outb"] = np.empty((S, N), np.float32)
            cases[name]["v5blocks"] = v5_prefill.pack_token_blocks(xqg)   # [ceil(S/8), K/128, 8, 4, 32], aligned
            cases[name]["v5out"] = np.empty((S, N), np.float32)
            c4 = cases[name]
            v4_maddubs.matmul_scaled_v4(packed, c4["v4planes"], c4["v4xsum"], s, c4["rows"], c4["v4out"])
            assert np.array_equal(c4["v4out"].view(np.uint32),
                                  reference.ternary_matmul_reference(xq, s, packed, ws).view(np.uint32))
        assert np.array_equal(kernels.ternary_matmul(xq, s, packed, ws).view(np.uint32),
                              reference.ternary_matmul_reference(xq, s, packed, ws).view(np.uint32))
        if torch is not None:
            cases[name]["w_torch"] = torch.from_numpy(codes.astype(np.float32) * ws)
            cases[name]["x_torch"] = torch.from_numpy(x)
    name, V, K = HEAD
    table = f32_to_bf16((rng.standard_normal((V, K)) * 0.02).astype(np.float32))    # uint16 [V, K], 656 MB
    xh = rng.standard_normal((1, K)).astype(np.float32)
    head = dict(table=table, x=xh, xg=rng.standard_normal((args.gemm_tokens, K)).astype(np.float32))
    if torch is not None:
        head["w_torch"] = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16)
        head["x_torch"] = torch.from_numpy(xh).to(torch.bfloat16)
    kernels.bf16_matmul(xh, table[:64])

    gemv = {}      # (shape, threads) -> seconds per call
    gemm = {}
    head_t = {}
    head_v1_t = {}
    numpy_t = {}
    torch_t = {}
    for r in range(args.rounds):
        bw.measure()
        for nt in THREADS:
            kernels.set_num_threads(nt)
            for name, c in cases.items():
                pool = c["pool"]
                t = time.perf_counter()
                for p in pool:
                    kernels.ternary_matmul(c["xq"], c["s"], p, c["ws"])
                t = (time.perf_counter() - t) / len(pool)
                gemv[name, nt] = min(gemv.get((name, nt), 1e9), t)
                t = best_time(lambda: kernels.ternary_matmul(c["xqg"], c["sg"], c["packed"], c["ws"]))
                gemm[name, nt] = min(gemm.get((name, nt), 1e9), t)
                if use_v4:
                    t = time.perf_counter()
                    for p in pool:
                        v4_maddubs.matmul_scaled_v4(p, c["v4planes"], c["v4xsum"], c["s"], c["rows"], c["v4out"])
                    t = (time.perf_counter() - t) / len(pool)
                    v4_gemv[name, nt] = min(v4_gemv.get((name, nt), 1e9), t)
                    t = best_time(lambda: v4_maddubs.matmul_scaled_v4_pairs(c["packed"], c["v4planesg"], c["v4xsumg"],
                                                                            c["sg"], c["rows"], c["v4outg"]))
                    v4_gemm[name, nt] = min(v4_gemm.get((name, nt), 1e9), t)
                    for _ in range(3):        # the two prefill kernels the issue compares, alternated
                        t = best_time(lambda: v4_maddubs.matmul_scaled_v4_blocked(c["packed"], c["v4blocks"], c["v4xsumg"],
                                                                                  c["sg"], c["rows"], c["v4outb"]))
                        v4_gemm_blocked[name, nt] = min(v4_gemm_blocked.get((name, nt), 1e9), t)
                        t = best_time(lambda: v5_prefill.matmul_scaled_v5(c["packed"], c["v5blocks"], c["v4xsumg"],
                                                                          c["sg"], c["rows"], c["v5out"]))
                        v5_gemm[name, nt] = min(v5_gemm.get((name, nt), 1e9), t)
                    if r == 0:
                        assert np.array_equal(c["v4outb"].view(np.uint32), c["v4outg"].view(np.uint32))
                        assert np.array_equal(c["v5out"].view(np.uint32), c["v4outg"].view(np.uint32))
                if torch is not None and r < 3:
                    torch.set_num_threads(nt)
                    t = best_time(lambda: F.linear(c["x_torch"], c["w_torch"]), 3)
                    torch_t[name, nt] = min(torch_t.get((name, nt), 1e9), t)
            t = best_time(lambda: kernels.bf16_matmul(head["x"], head["table"]))
            head_t[nt] = min(head_t.get(nt, 1e9), t)
            t = best_time(lambda: bf16_matmul_v1(head["x"], head["table"]))         # the scratch-buffer version
            head_v1_t[nt] = min(head_v1_t.get(nt, 1e9), t)
            if r == 0:
                t = best_time(lambda: kernels.bf16_matmul(head["xg"], head["table"]))
                gemm[HEAD[0], nt] = t
            if torch is not None and r < 2:
                torch.set_num_threads(nt)
                t = best_time(lambda: F.linear(head["x_torch"], head["w_torch"]))
                torch_t[HEAD[0], nt] = min(torch_t.get((HEAD[0], nt), 1e9), t)
        if r < 2:   # the NumPy reference path (BLAS threads as configured; slow, so two rounds)
            for name, c in cases.items():
                t = best_time(lambda: bitlinear_epilogue(ternary_matmul_exact(c["xq"], c["codes"]), c["s"], c["ws"]))
                numpy_t[name] = min(numpy_t.get(name, 1e9), t)

    # ---- the ladder of versions on one shape (gate/up), 1 thread (least disturbed by neighbours)
    ladder = {}
    c = cases["gate/up"]
    kernels.set_num_threads(1)
    ternary_matmul_acc_v1(c["xq"], c["codes"]), ternary_matmul_acc_v2(c["xq"], c["packed"])
    for _ in range(2):
        for label, fn, nbytes in (
                ("numpy reference (int64 unpack+matmul)", lambda: reference.ternary_matmul_acc_reference(c["xq"], c["packed"]), c["packed"].nbytes),
                ("v1 unpacked int8", lambda: ternary_matmul_acc_v1(c["xq"], c["codes"]), c["codes"].nbytes),
                ("v2 packed, scalar decode", lambda: ternary_matmul_acc_v2(c["xq"], c["packed"]), c["packed"].nbytes),
                ("v3 word planes (vpmaddwd)", lambda: kernels.ternary_matmul_acc(c["xq"], c["packed"]), c["packed"].nbytes)):
            t = best_time(fn, 3)
            ladder[label] = (min(ladder.get(label, (1e9,))[0], t), nbytes)

    # ---- report
    print(f"load average during the run: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(anything above ~0.5 means neighbours share the cores and the 2-thread rows suffer most)")
    print(f"bandwidth (best of {args.rounds} rounds, same run): copy {bw.copy:.1f} GB/s (read+write), "
          f"prange sum " + ", ".join(f"{n} thr {bw.sum[n]:.1f} GB/s" for n in THREADS))
    print("\nGEMV, S = 1 (decode), weights cycled from a pool larger than L3; times are best of the rounds. 'kernel' is "
          "what refbitnet.runtime runs (v4_maddubs when K % 128 == 0 on AVX2, else v3; the bf16 head: lm_head_v2); "
          "%copy / %sum: its GB/s over the copy / same-thread prange-sum bandwidth; 'v3 ms' the public "
          "kernels.ternary_matmul (v3 word planes) in the same rounds")
    hdr = (f"{'shape':8} {'N x K':>13} {'thr':>3} {'kernel':>7} {'bytes':>9} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'%sum':>5}"
           f" {'v3 ms':>7} {'x v3':>5} {'numpy ms':>9} {'x numpy':>8} {'torch ms':>9} {'x torch':>8}")
    print(hdr)
    rows = []
    runtime_gemv = {}           # (shape, threads) -> seconds of the GEMV the runtime uses
    for name, N, K in SHAPES + [HEAD]:
        for nt in THREADS:
            nbytes = N * K // 4 if name != HEAD[0] else N * K * 2
            if name == HEAD[0]:
                kernel, t, t3 = "bf16 v2", head_t[nt], None
            else:
                kernel, t, t3 = ("v4", v4_gemv[name, nt], gemv[name, nt]) if use_v4 else ("v3", gemv[name, nt], None)
            runtime_gemv[name, nt] = t
            gbs = nbytes / t / 1e9
            npt = numpy_t.get(name)
            tt = torch_t.get((name, nt))
            row = dict(shape=name, N=N, K=K, threads=nt, kernel=kernel, bytes=nbytes, ms=t * 1e3, gbs=gbs,
                       frac_copy=gbs / bw.copy, frac_sum=gbs / bw.sum[nt], v3_ms=t3 * 1e3 if t3 else None,
                       numpy_ms=npt * 1e3 if npt else None, torch_ms=tt * 1e3 if tt else None)
            rows.append(row)
            print(f"{name:8} {N:>6}x{K:<6} {nt:>3} {kernel:>7} {nbytes / 1e6:>7.2f}MB {t * 1e3:>8.3f} {gbs:>6.1f} "
                  f"{100 * gbs / bw.copy:>5.0f}% {100 * gbs / bw.sum[nt]:>4.0f}% "
                  + (f"{t3 * 1e3:>7.3f} {t3 / t:>4.1f}x " if t3 else f"{'-':>7} {'-':>5} ")
                  + (f"{npt * 1e3:>9.2f} {npt / t:>7.1f}x " if npt else f"{'-':>9} {'-':>8} ")
                  + (f"{tt * 1e3:>9.3f} {tt / t:>7.1f}x" if tt else f"{'-':>9} {'-':>8}"))
    print(f"\nGEMM, S = {args.gemm_tokens} tokens (prefill), one weight copy; 'x GEMV' = tokens/s relative to the "
          f"runtime's GEMV above, i.e. {args.gemm_tokens} x GEMV time / GEMM time (the issue's target: >= 4x at 2 threads)."
          f"\n  v3: the public kernels.ternary_matmul (checks + planes included)"
          + ("; v4 'pairs' (2 tokens per weight pass), v4 'blocked' (4 tokens, what the runtime ran before v5) and "
             "v5 (v5_prefill: unpacked code panels, 1 row x 8 tokens): kernel call only, activations quantized outside"
             if use_v4 else ""))
    print(f"{'shape':8} {'thr':>3} {'v3 ms':>8} {'x GEMV':>7}"
          + (f" {'pairs ms':>8} {'x GEMV':>7} {'blocked':>8} {'x GEMV':>7} {'v5 ms':>8} {'x GEMV':>7} {'v5 gain':>7}"
             if use_v4 else ""))
    for name, N, K in SHAPES + [HEAD]:
        for nt in THREADS:
            t1 = runtime_gemv[name, nt]
            t = gemm[name, nt]
            row = dict(shape=name, threads=nt, gemm_tokens=args.gemm_tokens, gemm_ms=t * 1e3,
                       gemm_vs_gemv=args.gemm_tokens * t1 / t)
            line = f"{name:8} {nt:>3} {t * 1e3:>8.2f} {args.gemm_tokens * t1 / t:>6.2f}x"
            if use_v4 and name != HEAD[0]:
                tg, tb, t5 = v4_gemm[name, nt], v4_gemm_blocked[name, nt], v5_gemm[name, nt]
                row.update(v4_gemm_pairs_ms=tg * 1e3, v4_gemm_blocked_ms=tb * 1e3, v5_gemm_ms=t5 * 1e3,
                           v4_blocked_vs_gemv=args.gemm_tokens * t1 / tb, v5_vs_gemv=args.gemm_tokens * t1 / t5)
                line += "".join(f" {tk * 1e3:>8.2f} {args.gemm_tokens * t1 / tk:>6.2f}x" for tk in (tg, tb, t5))
                line += f" {tb / t5:>6.2f}x"
            rows.append(row)
            print(line)
    if use_v4:
        rates = {nt: madd_pair_rate(nt) for nt in THREADS}
        print(f"\nCompute floor of the prefill GEMM: each 32 int8 products cost one vpmaddubsw + one vpaddw. A probe of "
              f"{PROBE_CHAINS} independent (vpmaddubsw, vpaddw) chains runs "
              + ", ".join(f"{rates[nt] / 1e9:.2f} G pairs/s per core at {nt} thread{'s' if nt > 1 else ''}" for nt in THREADS)
              + f". 'needed' = the rate per core that a {args.gemm_tokens}-token GEMM must sustain to reach 4x the GEMV above;"
              " it is out of reach wherever it exceeds the probe.")
        print(f"{'shape':8} {'thr':>3} {'v5 G/s':>8} {'% probe':>8} {'needed':>8} {'% probe':>8}")
        for name, N, K in SHAPES:
            for nt in THREADS:
                pairs = args.gemm_tokens * N * K / 32
                have = pairs / v5_gemm[name, nt] / nt
                need = pairs / (args.gemm_tokens * runtime_gemv[name, nt] / 4) / nt
                rows.append(dict(shape=name, threads=nt, probe_pairs_per_s=rates[nt], v5_pairs_per_s=have,
                                 needed_pairs_per_s_for_4x=need))
                print(f"{name:8} {nt:>3} {have / 1e9:>8.2f} {100 * have / rates[nt]:>7.0f}% {need / 1e9:>8.2f} "
                      f"{100 * need / rates[nt]:>7.0f}%")
    print("\nLM head GEMV, 656 MB bf16: v1 (widened through a uint32 scratch row) vs v2 (in registers; "
          "kernels.bf16_matmul's path for K % 16 == 0), same rounds")
    for nt in THREADS:
        tb = HEAD[1] * HEAD[2] * 2
        rows.append(dict(shape="lm_head", threads=nt, v1_ms=head_v1_t[nt] * 1e3, v2_ms=head_t[nt] * 1e3))
        print(f"  {nt} thr: v1 {head_v1_t[nt] * 1e3:7.2f} ms {tb / head_v1_t[nt] / 1e9:5.1f} GB/s   "
              f"v2 {head_t[nt] * 1e3:7.2f} ms {tb / head_t[nt] / 1e9:5.1f} GB/s ({100 * tb / head_t[nt] / 1e9 / bw.sum[nt]:.0f}% of sum)")
    print("\nVersions on gate/up 6912x2560, S = 1, 1 thread, one weight copy (partly cache-resident), best of 6")
    for label, (t, nbytes) in ladder.items():
        print(f"  {label:40} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:6.2f} GB/s of its own weight bytes")
    if not args.quick:
        (imp1, first), (imp2, cached) = compile_times()
        print(f"\ncompile (a fresh process calling each public kernel at S = 1 and S = 4): empty Numba cache "
              f"{first:.2f} s of first calls (+{imp1:.2f} s imports); second process on that cache {cached:.2f} s "
              f"(+{imp2:.2f} s imports)")
        rows.append(dict(compile_first_s=first, compile_cached_s=cached, import_s=[imp1, imp2]))
    if not args.quick:
        print("\nhottest loop of each kernel (instruction count, most frequent mnemonics):")
        print("  " + inner_loop_mix().replace("\n", "\n  "))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=dict(copy=bw.copy, sum=bw.sum), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
