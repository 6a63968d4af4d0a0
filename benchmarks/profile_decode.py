"""Where a 2-thread decode step of refbitnet's fast path spends its time and where its threads wait (not a test).

    python benchmarks/profile_decode.py [--model DIR] [--threads 2] [--prompt 128] [--steps 24] [--out PATH]

Decoding one token (after a --prompt-token prefill, float32 KV cache) two ways in one run:

1. The step as it ships (refbitnet.decode_step: the threads together for the whole token): its wall time per
   token, and from the step's own cycle counts (DecodeStep.stats) each thread's time per phase kind in the
   tasks (busy), waiting for the phase's input (wait: the other thread's glue, a late or descheduled
   thread, and the region's start) and running the serial glue before the phase, with the GB/s that the
   busy time implies for the weight-reading phases.
2. The op-by-op path (runtime.FastPath.layers_forward: what decoded before the step, and what runs when the
   step does not fit the model): wall time per op, summed over the step (each call timed with
   perf_counter), grouped as kernel (quantize + GEMV/LM head through the door), glue (compiled norms, RoPE),
   attention (attention_kernel.attend), cache store, and "python" (the rest: dispatch, checks, slicing),
   with how many parallel regions each group opens per token.
3. Inside each GEMV region of the op-by-op path: the GEMVs re-run through a copy of the door's kernel whose
   tasks stamp the CPU's cycle counter and the Numba thread id at start and end. Per region: the call until
   each thread's first task (wake-up), each thread's busy time, the gap between the first and the last
   thread to finish (imbalance), and from the last task's end to the call's return (join).
4. An empty parallel region (prange over the thread count, nothing inside) called after ~30 us of serial
   work, as between two GEMVs: its cost alone.

Prints the Numba threading layer, the OpenMP settings, the load average. Writes the report to --out
(default benchmarks/results/decode_profile.md).
"""

import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from llvmlite import ir  # noqa: E402
from numba import get_thread_id, njit, prange  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

import refbitnet  # noqa: E402
from refbitnet import glue, kernels, runtime  # noqa: E402
from refbitnet.kernels import act_quant  # noqa: E402
from refbitnet.attention_kernel import attend  # noqa: E402
from refbitnet.decode_step import BUSY, GLUE, HEAD_STATS, WAIT  # noqa: E402
from refbitnet.kernels import v6_vnni  # noqa: E402
from refbitnet.kernels.sync import claim  # noqa: E402
from refbitnet.kernels.v4_maddubs import ROWS_PER_TASK, dot_row  # noqa: E402
from refbitnet.model import rms_norm  # noqa: E402

DEFAULT_MODEL = "/tmp/refbitnet-random-2b4t"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_profile.md")


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (llvm.readcyclecounter: rdtsc on x86), int64."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@njit(parallel=True)
def gemv_stamped(packed, planes, xsum, s_act, row_scale, out, stamps):
    """kernels.v4_maddubs.matmul_scaled_v4 for S = 1, each task writing (thread id, start, end) into stamps."""
    N = packed.shape[0]
    for task in prange((N + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        t0 = cycles()
        for n in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
            acc = dot_row(packed[n], planes[0]) - xsum[0]
            out[0, n] = np.float32(np.float32(np.float32(acc) / s_act[0]) * row_scale[n])
        stamps[task, 0] = get_thread_id()
        stamps[task, 1] = t0
        stamps[task, 2] = cycles()


@njit(parallel=True)
def gemv_stamped_v6(packed, planes, xsum, s_act, row_scale, out, stamps, sync, n_threads):
    """kernels.v6_vnni.matmul_scaled_v6 (rows claimed by the threads), each claimed task writing (thread id,
    start, end) into stamps."""
    N = packed.shape[0]
    n_tasks = (N + v6_vnni.ROWS_PER_TASK - 1) // v6_vnni.ROWS_PER_TASK
    sync[:] = 0
    for t in prange(n_threads):
        while True:
            t0 = cycles()
            task = claim(sync, 0, n_tasks, t)
            if task < 0:
                break
            for n in range(task * v6_vnni.ROWS_PER_TASK, min(N, (task + 1) * v6_vnni.ROWS_PER_TASK)):
                acc = v6_vnni.row_dot(packed[n], planes[0]) - xsum[0]
                out[0, n] = np.float32(np.float32(np.float32(acc) / s_act[0]) * row_scale[n])
            stamps[task, 0] = get_thread_id()
            stamps[task, 1] = t0
            stamps[task, 2] = cycles()


@njit(parallel=True)
def empty_region(n, out):
    for t in prange(n):
        out[t] = t


@njit
def serial_work(x, reps):
    s = np.float32(0)
    for _ in range(reps):
        for i in range(x.shape[0]):
            s += x[i] * x[i]
    return s


PHASE_NAMES = ["qkv GEMV (+ its input norm, quantize)", "attention scores (+ RoPE, cache store)", "softmax",
               "attention output", "o GEMV (+ attn_sub_norm, quantize)", "gate/up GEMV (+ residual, norm, quantize)",
               "down GEMV (+ relu2 * up, ffn_sub_norm, quantize)", "LM head (+ final norm)"]


def phase_bytes(fp):
    """Weight bytes each phase kind reads per token: {kind: bytes} (the GEMVs' packed codes, the head's table)."""
    read = {}
    for k, name in ((0, "qkv"), (4, "o"), (5, "gate_up"), (6, "down")):
        read[k] = sum(getattr(layer, name).linear.packed.nbytes for layer in fp.layers)
    if fp.step.head_in_step:
        read[HEAD_STATS] = fp.output_table.nbytes
    return read


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cycles_per_us():
    c = njit(lambda: cycles())
    c()
    t0, c0 = time.perf_counter(), c()
    time.sleep(0.2)
    return (c() - c0) / ((time.perf_counter() - t0) * 1e6)


class Timer:
    def __init__(self):
        self.total, self.calls = {}, {}

    def __call__(self, name, fn, *args):
        t = time.perf_counter()
        r = fn(*args)
        self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
        self.calls[name] = self.calls.get(name, 0) + 1
        return r


def timed_step(fp, token, cache, start, tm):
    """FastPath.forward for one token (S = 1, a cache, last_only), op by op with timers."""
    cfg = fp.config
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = np.float32(cfg.rms_norm_eps)
    ids = np.array([token])
    cos, sin = tm("glue: rope tables", runtime.rope_tables, start + np.arange(1), hd, cfg.rope_theta)
    h = tm("embed", runtime.embed, fp.embed_tokens, ids)
    ws = fp._workspace(1)
    h_cur, x, h_attn, x2, q_rot, k_rot = ws["h"], ws["x"], ws["h_attn"], ws["x2"], ws["q"], ws["k"]
    h_cur[:] = h
    tm("glue: norms", glue.rms_norm_into, h_cur, fp.layers[0].input_layernorm, eps, x)
    for i, w in enumerate(fp.layers):
        q, k, v = tm("kernel: qkv", w.qkv, i, x)
        tm("glue: rope", glue.rope_into, q.reshape(1, n_heads, hd), cos, sin, q_rot)
        tm("glue: rope", glue.rope_into, k.reshape(1, n_kv, hd), cos, sin, k_rot)
        v = v.reshape(1, n_kv, hd)
        tm("cache store", cache.store, i, start, k_rot, v)
        a = tm("attention (compiled)", attend, q_rot, cache, i, start).reshape(1, n_heads * hd)
        tm("glue: norms", glue.rms_norm_into, a, w.attn_sub_norm, eps, ws["a_norm"])
        (o,) = tm("kernel: o", w.o, i, ws["a_norm"])
        tm("glue: norms", glue.add_rms_norm_into, h_cur, o, w.post_attention_layernorm, eps, h_attn, x2)
        gate, up = tm("kernel: gate_up", w.gate_up, i, x2)
        tm("glue: norms", glue.relu2_mul_rms_norm_into, gate, up, w.ffn_sub_norm, eps, ws["m"], ws["m_norm"])
        (down,) = tm("kernel: down", w.down, i, ws["m_norm"])
        if i + 1 < len(fp.layers):
            tm("glue: norms", glue.add_rms_norm_into, h_attn, down, fp.layers[i + 1].input_layernorm, eps, h_cur, x)
            out = h_cur
        else:
            out = h_attn + down
    cache.commit(start, ids)
    xn = tm("glue: final norm (NumPy)", rms_norm, out, fp.norm, cfg.rms_norm_eps)
    return tm("kernel: lm_head", fp.lm_head, xn[-1:])


def region_profile(fp, cache, start, steps, cpu):
    """Per projection group: wake-up, busy, imbalance and join of each GEMV region, stamped by its tasks."""
    groups = {"qkv": [], "o": [], "gate_up": [], "down": []}
    rng = np.random.default_rng(1)
    d, f = fp.config.hidden_size, fp.config.intermediate_size
    inputs = {"qkv": d, "o": d, "gate_up": d, "down": f}
    filler = rng.standard_normal(20000).astype(np.float32)
    sync, n_threads = np.zeros(1, np.int64), numba.get_num_threads()
    for _ in range(steps):
        for i, w in enumerate(fp.layers):
            for name in groups:
                lin = getattr(w, name).linear
                x = rng.standard_normal((1, inputs[name])).astype(np.float32)
                kernel = lin.kernel_for(1)
                s, act, xsum, y = lin._buffers(1, kernel)
                act_quant.quantize_byte_planes(x, s, act, xsum)
                n_tasks = (lin.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
                stamps = np.zeros((n_tasks, 3), np.int64)
                serial_work(filler, 1)                                # ~serial glue between two regions
                c0 = cycles_now()
                if kernel == "v6":
                    gemv_stamped_v6(lin.packed, act, xsum, s, lin.row_scale, y, stamps, sync, n_threads)
                else:
                    gemv_stamped(lin.packed, act, xsum, s, lin.row_scale, y, stamps)
                c1 = cycles_now()
                groups[name].append(region_stats(stamps, c0, c1, cpu))
    return {name: {k: float(np.median([r[k] for r in rows])) for k in rows[0]} for name, rows in groups.items()}


_cycles_now = njit(lambda: cycles())


def cycles_now():
    return _cycles_now()


def region_stats(stamps, c0, c1, cpu):
    tids = np.unique(stamps[:, 0])
    first = {t: stamps[stamps[:, 0] == t, 1].min() for t in tids}
    last = {t: stamps[stamps[:, 0] == t, 2].max() for t in tids}
    busy = {t: (stamps[stamps[:, 0] == t, 2] - stamps[stamps[:, 0] == t, 1]).sum() for t in tids}
    main = 0 if 0 in tids else tids[0]
    others = [t for t in tids if t != main]
    return dict(
        call_us=(c1 - c0) / cpu,
        threads_seen=float(len(tids)),
        wake_main_us=(first[main] - c0) / cpu,
        wake_worker_us=((min(first[t] for t in others) - c0) / cpu) if others else float("nan"),
        busy_main_us=busy[main] / cpu,
        busy_worker_us=(sum(busy[t] for t in others) / cpu) if others else 0.0,
        imbalance_us=(max(last.values()) - min(last.values())) / cpu,
        join_us=(c1 - max(last.values())) / cpu,
    )


def empty_region_cost(threads, reps=400):
    out = np.zeros(threads, np.int64)
    filler = np.random.default_rng(2).standard_normal(20000).astype(np.float32)
    empty_region(threads, out)
    serial_work(filler, 1)
    times = []
    for _ in range(reps):
        serial_work(filler, 1)
        t = time.perf_counter()
        empty_region(threads, out)
        times.append(time.perf_counter() - t)
    gap = []
    for _ in range(50):
        t = time.perf_counter()
        serial_work(filler, 1)
        gap.append(time.perf_counter() - t)
    return 1e6 * np.median(times), 1e6 * np.percentile(times, 90), 1e6 * np.percentile(times, 99), 1e6 * np.median(gap)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--label", default="this tree")
    args = ap.parse_args()
    kernels.set_num_threads(args.threads)
    model = refbitnet.load(args.model, backend="numba")
    fp = model._fast
    cache = model.new_cache(args.prompt + 3 * args.steps + 16)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt)
    model.forward(ids, cache=cache, last_only=True)
    layer = numba.threading_layer()
    cpu = cycles_per_us()
    lines = []

    def say(text=""):
        print(text)
        lines.append(text)

    load0 = os.getloadavg()
    # 1. the step as it ships
    token = 1
    for _ in range(3):                                                  # warm (compiles the step)
        token = int(np.argmax(model.forward(np.array([token]), cache=cache)[-1]))
    fp.step.stats[:] = 0
    shipped = []
    for _ in range(args.steps):
        t = time.perf_counter()
        logits = model.forward(np.array([token]), cache=cache)
        shipped.append(time.perf_counter() - t)
        token = int(np.argmax(logits[-1]))
    n = args.steps
    step_stats = fp.step.stats[:args.threads] / (n * cpu * 1e3)          # ms per token [thread, kind, what]
    # 2. op by op
    steps_s, tm = [], Timer()
    fp.step_fits = False
    timed_step(fp, token, cache, cache.length, Timer())                  # warm
    for _ in range(args.steps):
        t = time.perf_counter()
        logits = timed_step(fp, token, cache, cache.length, tm)
        steps_s.append(time.perf_counter() - t)
        token = int(np.argmax(logits[-1]))
    plain = []
    for _ in range(args.steps):
        t = time.perf_counter()
        logits = model.forward(np.array([token]), cache=cache)
        plain.append(time.perf_counter() - t)
        token = int(np.argmax(logits[-1]))
    fp.step_fits = True
    step_ms = 1e3 * sum(steps_s) / n
    say(f"# Decode step profile ({args.label})\n")
    say(f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; Numba {numba.__version__}, "
        f"threading layer `{layer}`, {args.threads} threads; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; load average {load0[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} after parts 1-2.")
    say(f"Command: `python benchmarks/profile_decode.py --threads {args.threads} --prompt {args.prompt} "
        f"--steps {args.steps} --label {args.label}`; model {args.model}; "
        f"decode at positions {args.prompt}..{cache.length}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    say(f"## 1. The step as it ships: the threads together for the whole token (mean over {n} steps)\n")
    say(f"model.forward of one token: {1e3 * np.median(shipped):.1f} ms median ({1 / np.median(shipped):.1f} "
        f"tokens/s); the step's threads start once per token. Per thread, ms per token (cycle counter "
        f"{cpu:.0f} per us):\n")
    say("| phase kind | " + " | ".join(f"thread {t} busy | wait | glue" for t in range(args.threads))
        + " | weights read | GB/s (busy) |")
    say("|---|" + "---:|---:|---:|" * args.threads + "---:|---:|")
    read = phase_bytes(fp)
    for k, name in enumerate(PHASE_NAMES):
        cells = " | ".join(f"{step_stats[t, k, BUSY]:.2f} | {step_stats[t, k, WAIT]:.2f} | {step_stats[t, k, GLUE]:.2f}"
                           for t in range(args.threads))
        busy = step_stats[:, k, BUSY].max()
        rate = f"{read[k] / busy / 1e6:.1f}" if read.get(k) else ""
        say(f"| {name} | {cells} | {read[k] / 1e6:.0f} MB | {rate} |" if read.get(k) else f"| {name} | {cells} | | |")
    totals = " | ".join(f"{step_stats[t, :, BUSY].sum():.2f} | {step_stats[t, :, WAIT].sum():.2f} | "
                        f"{step_stats[t, :, GLUE].sum():.2f}" for t in range(args.threads))
    say(f"| **all** | {totals} | {sum(read.values()) / 1e6:.0f} MB | "
        f"{sum(read.values()) / (1e6 * step_stats[:, :, BUSY].sum(axis=1).max()):.1f} |\n")
    say(f"## 2. The op-by-op path, op by op (mean over {n} steps)\n")
    say(f"Step: {step_ms:.1f} ms timed op by op; model.forward of one token on this path, untimed: "
        f"{1e3 * np.median(plain):.1f} ms median ({1 / np.median(plain):.1f} tokens/s).\n")
    say("| op | ms per token | % of step | calls per token | parallel regions per token |")
    say("|---|---:|---:|---:|---:|")
    accounted = 0.0
    for name in sorted(tm.total, key=lambda k: -tm.total[k]):
        ms = 1e3 * tm.total[name] / n
        accounted += ms
        regions = tm.calls[name] // n if name.startswith(("kernel", "region")) else 0
        say(f"| {name} | {ms:.2f} | {100 * ms / step_ms:.1f} | {tm.calls[name] // n} | {regions} |")
    say(f"| python between ops | {step_ms - accounted:.2f} | {100 * (step_ms - accounted) / step_ms:.1f} | | |")
    total_regions = sum(tm.calls[k] // n for k in tm.total if k.startswith(("kernel", "region")))
    say(f"\nParallel regions per token: {total_regions} (one per GEMV call and one LM head; the quantize pass "
        f"before each GEMV, the glue and the Python between them run on one thread).\n")
    # 2. inside the regions
    say(f"## 3. Inside each GEMV region of the op-by-op path (medians over {args.steps // 4 or 1} steps x 30 layers; "
        f"cycle counter {cpu:.0f} per us)\n")
    stats = region_profile(fp, cache, cache.length, max(1, args.steps // 4), cpu)
    say("| group | call us | threads | main wake us | worker wake us | main busy us | worker busy us | "
        "imbalance us | join us |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in stats.items():
        say(f"| {name} | {r['call_us']:.1f} | {r['threads_seen']:.0f} | {r['wake_main_us']:.1f} | "
            f"{r['wake_worker_us']:.1f} | {r['busy_main_us']:.1f} | {r['busy_worker_us']:.1f} | "
            f"{r['imbalance_us']:.1f} | {r['join_us']:.1f} |")
    waits = sum(30 * (r["call_us"] - max(r["busy_main_us"], r["busy_worker_us"])) for r in stats.values())
    say(f"\nPer token, the 120 GEMV regions spend about {waits / 1e3:.2f} ms beyond their busier thread's work "
        f"(wake-up + imbalance + join).\n")
    # 3. empty region
    med, p90, p99, gap = empty_region_cost(args.threads)
    say("## 4. An empty parallel region after serial work\n")
    say(f"prange over {args.threads} iterations doing nothing, called after {gap:.0f} us of serial work: median "
        f"{med:.1f} us, p90 {p90:.1f} us, p99 {p99:.1f} us per region.\n")
    say(f"Load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
