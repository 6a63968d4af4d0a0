"""One decode step in one go: every op of one token's forward pass, the threads together from start to end.

Why: decoding one token op by op opens a parallel region per GEMV (four per layer) and runs the glue,
attention and Python between them on the calling thread. Each region must wake the worker thread, which
has parked in the meantime; on a virtual machine whose other CPU then halts, a wake costs tens of
microseconds, over a hundred times per token (benchmarks/results/decode_profile.md). Here the threads
start once per token (``_Team``: the caller and Python threads, each running the compiled ``worker``
without the GIL) and stay in the step: between phases they poll (``sync.wait_nonzero``: ``pause``, then
``sched_yield`` so a busy machine's other work still runs), as the engines' thread pools do within a graph,
and they share the attention over the KV cache too.

The step is a sequence of phases, seven per layer and then the LM head:

    qkv GEMV | attention scores | softmax | attention output | o GEMV | gate/up GEMV | down GEMV | ... | head

Each phase is split into tasks (chunks of rows, of cache positions, heads, or head elements) that the
threads claim from a shared counter (``sync.claim``, one atomic add per task); when a thread finds nothing
left to claim it reports how many tasks it ran, and the thread whose report completes the phase runs the
serial glue that makes the next phase's input (residual add, RMSNorm, activation quantization, RoPE, the
cache store) and publishes it; the others wait for the publication. The atomics are the cost of a task (the
counters' cache line moves between the cores), so tasks are long: 256 rows of a GEMV, 256 rows of the head.
No thread waits for a particular other thread, only for claimed work: if the threads happen to run one
after another, the first does everything and the others find nothing left to claim.

Same bits as the op-by-op path (``runtime.FastPath.layers_forward``) and so as the readable one: every op
is the same compiled function (glue's norms and RoPE, act_quant's row quantizer, the door's GEMV row dot
and epilogue, attention_kernel's scores/softmax/output, lm_head_v2's row dots), and every output element
is computed by one thread in a fixed order. The one new piece is the float16 cache store,
``float16_bits``, NumPy's float32 -> float16 rounding written out (tests/test_decode_step.py checks both).
"""

from __future__ import annotations

import os
import threading
from collections import namedtuple

import numba
import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit
from numba.core import types
from numba.extending import intrinsic

from .attention_kernel import LANE_ELEMS, _scores, _softmax, _weighted
from .glue import add_rms_norm_row, relu2_mul_rms_norm_row, rms_norm_row, rope_heads
from .kernels import v4_maddubs, v6_vnni
from .kernels.act_quant import quantize_row
from .kernels.lm_head_int8 import int8_rows_into
from .kernels.lm_head_v2 import ROWS_PER_TASK as HEAD_ROWS_PER_TASK
from .kernels.lm_head_v2 import dot_rows_into
from .kernels.sync import claim, cycle_counter, fetch_add, store_release, wait_nonzero

# The GEMV's row dot: v6's vpdpbusd where the CPU has AVX512-VNNI, else v4's vpmaddubsw (the door's choice
# for one token, kernels.linear). Chosen once, at import: a compiled step keeps the one it was built with.
ROW_DOT = v6_vnni.row_dot if v6_vnni.available() else v4_maddubs.dot_row

# The phases of one layer, in order; phase p of the step is kind p % PHASES_PER_LAYER of layer
# p // PHASES_PER_LAYER, and phase PHASES_PER_LAYER * L is the LM head.
QKV, SCORES, SOFTMAX, WEIGHTED, O_PROJ, GATE_UP, DOWN = range(7)
PHASES_PER_LAYER = 7
GEMV_ROWS = 256              # output rows per GEMV task: long runs of rows keep each thread's stream going,
                             # and each task costs a claim (an atomic add on a line both threads write)
SCORE_POSITIONS = 32           # cache positions per scores task
OUT_ELEMS = LANE_ELEMS         # head elements per attention-output task (all heads)

# sync: int64 [(phases) * LINE], one cache line per phase, zeroed at the start of each step
LINE = 8
CLAIMED, DONE, READY = range(3)          # sync.claim's counter, tasks done, the phase's input published
READY_OK, READY_ABORT = 1, 2

# stats: int64 [threads, PHASES_PER_LAYER + 1 (the head), 3], time-stamp counter cycles summed over steps:
# each thread's time in the tasks of a phase kind, waiting for its input, and running the glue before it
BUSY, WAIT, GLUE = range(3)
HEAD_STATS = PHASES_PER_LAYER


StepWeights = namedtuple("StepWeights", [
    "arena",          # uint8 [bytes]: every packed matrix (kernels.repack.WeightArena.buffer)
    "mats",           # int64 [L, 4, 4]: per layer, for qkv, o, gate_up, down: byte offset in arena, rows,
                      #   bytes per row, offset of its first row scale in row_scale
    "row_scale",      # float32 [sum of rows]: every matrix's per-row weight scales, in arena order
    "input_norm",     # float32 [L, D]
    "post_norm",      # float32 [L, D]   (post_attention_layernorm)
    "attn_sub_norm",  # float32 [L, D]
    "ffn_sub_norm",   # float32 [L, F]
    "final_norm",     # float32 [D]
    "table",          # uint16 [V, D]: the tied bf16 LM head (read by the head phase; [1, 16] with the int8 head)
    "head_q",         # int8 [V, D]: the opt-in 8-bit head's codes (kernels.lm_head_int8), or [1, 16] unused
    "head_scale",     # float32 [V]: its row scales, or [1] unused
    "int8_head",      # True: the head phase reads head_q and head_scale instead of table
])

StepBuffers = namedtuple("StepBuffers", [
    "h",              # float32 [D]: the hidden state entering the layer (the token's embedding at first)
    "x",              # float32 [D]: input_layernorm(h)
    "qkv",            # float32 [H*HD + 2*KVH*HD]
    "q", "k",         # float32 [H, HD], [KVH, HD]: after RoPE
    "scores",         # float32 [H, capacity]: attention weights of the positions so far
    "ones",           # float32 [capacity]: ones (the softmax's sum, as attention_kernel takes it)
    "attn",           # float32 [H, HD]
    "attn_norm",      # float32 [D]
    "o",              # float32 [D]
    "h_attn", "x2",   # float32 [D]: h + o, post_attention_layernorm of it
    "gate_up",        # float32 [2F]
    "m", "m_norm",    # float32 [F]: relu2(gate) * up, ffn_sub_norm of it
    "down",           # float32 [D]
    "h_out", "x_out",  # float32 [D]: the last layer's output, the final norm of it (the LM head's input)
    "codes",          # int8 [max(D, F)]: one quantized activation row, in k order
    "planes_d",       # int8 [4, D/4]: byte planes of a D-wide activation (qkv, o, gate_up)
    "planes_f",       # int8 [4, F/4]: byte planes of the FFN activation (down)
    "s", "xsum",      # float32 [1], int32 [1]: the quantized activation's scale and code sum
])

KVArrays = namedtuple("KVArrays", [
    "k32", "v32",     # float32 [L, capacity, KVH, HD]: a float32 cache (a 1-element dummy otherwise)
    "k16", "v16",     # uint16 [L, capacity, KVH, HD]: a float16 cache's bits (a 1-element dummy otherwise)
    "wide16",         # True for a float16 cache
])


# ------------------------------------------------------------------------------------ float16 cache store
@intrinsic
def _float32_bits(typingctx, x):
    """The bit pattern of float32 x as uint32 (a bitcast, which Numba has no scalar form of)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(cache=True, inline="always")
def float16_bits(x):
    """The float16 nearest to float32 x (ties to even), as its bits uint16: NumPy's float32 -> float16 cast.
    A value beyond float16's range becomes inf (65520 and above; 65504 is the largest float16); NaN stays a
    NaN (a quiet one, payload not kept)."""
    b = _float32_bits(x)
    sign = np.uint32((b >> np.uint32(16)) & np.uint32(0x8000))
    e = np.int64((b >> np.uint32(23)) & np.uint32(0xFF))
    m = b & np.uint32(0x7FFFFF)
    if e == 0xFF:                                             # inf or NaN
        return np.uint16(sign | np.uint32(0x7C00) | (np.uint32(0x200) if m != 0 else np.uint32(0)))
    half_e = e - 127 + 15
    if half_e >= 31:                                          # >= 2**16: beyond any rounding, inf
        return np.uint16(sign | np.uint32(0x7C00))
    if half_e >= 1:                                           # a normal float16: keep 10 of 23 mantissa bits
        h = np.uint32(half_e << 10) | (m >> np.uint32(13))
        rest = m & np.uint32(0x1FFF)
        if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (h & np.uint32(1)) != 0):
            h += np.uint32(1)                                 # a carry moves into the exponent (to inf at most)
        return np.uint16(sign | h)
    # a subnormal float16 (or zero): units of 2**-24; x = (m | 2**23) * 2**(e - 150) for a normal float32
    shift = 126 - e                                           # >= 14
    if shift > 24 or e == 0:                                  # below half a unit (float32 subnormals too)
        return np.uint16(sign)
    full = m | np.uint32(0x800000)
    h = full >> np.uint32(shift)
    rest = full & np.uint32((1 << shift) - 1)
    halfway = np.uint32(1 << (shift - 1))
    if rest > halfway or (rest == halfway and (h & np.uint32(1)) != 0):
        h += np.uint32(1)                                     # may become the smallest normal, 0x0400
    return np.uint16(sign | h)


# ------------------------------------------------------------------------------------------- one phase
@njit(cache=True)
def gemv_rows(packed, planes, xsum, s, row_scale, out, r0, r1):
    """out[n] = fl(fl(float32(acc_n) / s) * row_scale[n]) for rows n = r0 .. r1-1, acc_n = xq . w_n exactly:
    the door's one-token GEMV (v6, or v4 without VNNI) for a chunk of rows."""
    for n in range(r0, r1):
        acc = ROW_DOT(packed[n], planes) - xsum
        out[n] = np.float32(np.float32(np.float32(acc) / s) * row_scale[n])


@njit(cache=True)
def _quantize(x, b, planes):
    """absmax_int8 of x float32 [K] into planes int8 [4, K/4] (v4/v6's byte planes), b.s[0] and b.xsum[0];
    False if x holds a NaN/inf."""
    k = x.shape[0]
    q = b.codes[:k]
    scale, total = quantize_row(x, q)
    if scale < 0:
        return False
    b.s[0] = scale
    b.xsum[0] = total
    for j in range(k // 4):
        for i in range(4):
            planes[i, j] = q[4 * j + i]
    return True


@njit(cache=True)
def _n_tasks(kind, i, w, t_len, n_heads, hd):
    """How many tasks phase (layer i, kind) has; the LM head is layer L, kind QKV."""
    if i == w.mats.shape[0]:
        v = w.head_q.shape[0] if w.int8_head else w.table.shape[0]
        return (v + HEAD_ROWS_PER_TASK - 1) // HEAD_ROWS_PER_TASK
    if kind == SCORES:
        return (t_len + SCORE_POSITIONS - 1) // SCORE_POSITIONS
    if kind == SOFTMAX:
        return n_heads
    if kind == WEIGHTED:
        return hd // OUT_ELEMS
    rows = w.mats[i, 0 if kind == QKV else kind - 3, 1]
    return (rows + GEMV_ROWS - 1) // GEMV_ROWS


@njit(cache=True, nogil=True)
def worker(t, w, b, kv, pos, cos, sin, scale, eps, logits, sync, n_phases, stats):
    """What thread t runs. Phase -1 is the start (one empty task); for each phase: wait for its input, then
    claim and run tasks (the first block below), then report how many it ran (one atomic add per thread and
    phase, not per task); the thread whose report completes the phase runs the glue that makes the next
    phase's input (the second block, in refbitnet.model.decoder_layer's order) and publishes it, or
    publishes an abort if an activation holds a NaN/inf or a key or value does not fit a float16 cache. Adds
    its cycles to stats[t]. (One function: each Numba function called from here is compiled again inside
    every caller, so the dispatch is written out here rather than in helpers.)

    w, b, kv: StepWeights, StepBuffers, KVArrays (b.h holds the token's embedding); pos: its position; cos,
    sin float32 [HD]: RoPE there; logits float32 [V]: the head's output (when n_phases includes the head);
    sync int64 [(n_phases + 1) * LINE], zeroed by the caller; n_phases: 7 L, + 1 with the head; stats int64
    [threads, 8, 3]. Releases the GIL: DecodeStep runs one per thread, at the same time."""
    n_layers = w.mats.shape[0]
    n_heads, hd = b.attn.shape
    n_kv = b.k.shape[0]
    f = b.m.shape[0]
    t_len = pos + 1
    final_glue = PHASES_PER_LAYER * n_layers                 # the final norm, before the head phase
    k32, v32 = kv.k32[0], kv.v32[0]                          # this layer's cache (set per phase below)
    k16, v16 = kv.k16[0], kv.v16[0]
    packed, planes, row_scale, out = w.arena[:0].reshape((0, 1)), b.planes_d, w.row_scale[:0], b.qkv
                                                             # a GEMV phase's matrix, input, scales, output
    buf = np.empty(hd, np.float32)                           # attention scratch of this thread
    acc = np.empty((n_heads // n_kv, hd), np.float32)
    clock = cycle_counter()
    for p in range(-1, n_phases):
        line = p * LINE if p >= 0 else n_phases * LINE       # the start uses the line after the last phase's
        i, kind = p // PHASES_PER_LAYER, p % PHASES_PER_LAYER
        k_stats = HEAD_STATS if p == final_glue else kind
        n = 1
        if p >= 0:
            ready = wait_nonzero(sync, line + READY)
            now = cycle_counter()
            stats[t, k_stats, WAIT] += now - clock
            clock = now
            if ready != READY_OK:
                return
            n = _n_tasks(kind, i, w, t_len, n_heads, hd)
            if i < n_layers:
                if kv.wide16:
                    k16, v16 = kv.k16[i], kv.v16[i]
                else:
                    k32, v32 = kv.k32[i], kv.v32[i]
                if kind == QKV or kind >= O_PROJ:                                   # a GEMV: its views, once
                    j = 0 if kind == QKV else kind - 3                             # o 1, gate_up 2, down 3
                    off, rows, width, s_off = w.mats[i, j, 0], w.mats[i, j, 1], w.mats[i, j, 2], w.mats[i, j, 3]
                    packed = w.arena[off:off + rows * width].reshape((rows, width))    # [N, K/4]
                    planes = b.planes_f if kind == DOWN else b.planes_d
                    row_scale = w.row_scale[s_off:s_off + rows]
                    out = (b.qkv if kind == QKV else b.o if kind == O_PROJ
                           else b.gate_up if kind == GATE_UP else b.down)
        done = 0
        while True:
            task = claim(sync, line + CLAIMED, n, t)
            if task < 0:
                break
            # ---- task `task` of phase p
            if p < 0:
                pass
            elif i == n_layers:                                                    # the LM head
                v0 = task * HEAD_ROWS_PER_TASK
                if w.int8_head:
                    int8_rows_into(w.head_q, w.head_scale, b.x_out, logits, v0,
                                   min(w.head_q.shape[0], v0 + HEAD_ROWS_PER_TASK))
                else:
                    dot_rows_into(w.table, b.x_out, logits, v0, min(w.table.shape[0], v0 + HEAD_ROWS_PER_TASK))
            elif kind == SCORES:
                t0 = task * SCORE_POSITIONS
                _scores(b.q, k32, k16, kv.wide16, n_kv, t0, min(t_len, t0 + SCORE_POSITIONS), scale, b.scores, buf)
            elif kind == SOFTMAX:
                _softmax(b.scores[task], t_len, b.ones)
            elif kind == WEIGHTED:
                d0 = task * OUT_ELEMS
                _weighted(b.scores, v32, v16, kv.wide16, n_kv, t_len, d0, d0 + OUT_ELEMS, b.attn, acc, buf)
            else:
                gemv_rows(packed, planes, b.xsum[0], b.s[0], row_scale, out, task * GEMV_ROWS,
                          min(packed.shape[0], (task + 1) * GEMV_ROWS))
            done += 1
        now = cycle_counter()
        if p >= 0:
            stats[t, k_stats, BUSY] += now - clock
        clock = now
        # each thread reports its tasks once, when none is left to claim: the report that completes n is the
        # last (a thread that did none adds 0 and is never the last)
        before = fetch_add(sync, line + DONE, done)
        nxt = p + 1
        if not (before < n and before + done == n and nxt <= final_glue):
            continue
        # ---- the glue before phase nxt (layer g, kind g_kind), then publish it
        g, g_kind = nxt // PHASES_PER_LAYER, nxt % PHASES_PER_LAYER
        ok = True
        if g_kind == QKV:
            if g == 0:
                rms_norm_row(b.h, w.input_norm[0], eps, b.x)
            elif g < n_layers:                              # h = h_attn + down, x = its input norm
                add_rms_norm_row(b.h_attn, b.down, w.input_norm[g], eps, b.h, b.x)
            else:                                           # the head's input: final norm of the output
                add_rms_norm_row(b.h_attn, b.down, w.final_norm, eps, b.h_out, b.x_out)
            if g < n_layers:
                ok = _quantize(b.x, b, b.planes_d)
        elif g_kind == SCORES:                              # RoPE, then k and v into the cache at pos
            rope_heads(b.qkv[:n_heads * hd].reshape((n_heads, hd)), cos, sin, b.q)
            rope_heads(b.qkv[n_heads * hd:(n_heads + n_kv) * hd].reshape((n_kv, hd)), cos, sin, b.k)
            v = b.qkv[(n_heads + n_kv) * hd:].reshape((n_kv, hd))
            for gh in range(n_kv):
                for d in range(hd):
                    if kv.wide16:
                        kb, vb = float16_bits(b.k[gh, d]), float16_bits(v[gh, d])
                        if (kb & 0x7C00) == 0x7C00 or (vb & 0x7C00) == 0x7C00:    # overflowed to inf
                            ok = False
                        kv.k16[g, pos, gh, d] = kb
                        kv.v16[g, pos, gh, d] = vb
                    else:
                        kv.k32[g, pos, gh, d] = b.k[gh, d]
                        kv.v32[g, pos, gh, d] = v[gh, d]
        elif g_kind == O_PROJ:
            rms_norm_row(b.attn.reshape(-1), w.attn_sub_norm[g], eps, b.attn_norm)
            ok = _quantize(b.attn_norm, b, b.planes_d)
        elif g_kind == GATE_UP:
            add_rms_norm_row(b.h, b.o, w.post_norm[g], eps, b.h_attn, b.x2)
            ok = _quantize(b.x2, b, b.planes_d)
        elif g_kind == DOWN:
            relu2_mul_rms_norm_row(b.gate_up[:f], b.gate_up[f:], w.ffn_sub_norm[g], eps, b.m, b.m_norm)
            ok = _quantize(b.m_norm, b, b.planes_f)
        if nxt < n_phases:
            store_release(sync, nxt * LINE + READY, READY_OK if ok else READY_ABORT)
        now = cycle_counter()
        stats[t, HEAD_STATS if nxt == final_glue else g_kind, GLUE] += now - clock
        clock = now


# --------------------------------------------------------------------------------------- the Python side
class _Helper:
    """One thread of the team: runs worker(t, *args) each time it is given args, then signals done."""

    def __init__(self, t):
        self.t, self.args, self.error = t, None, None
        self.go, self.done = threading.Event(), threading.Event()
        self.running = False              # given a step whose end the caller has not yet waited for
        threading.Thread(target=self._loop, daemon=True, name=f"refbitnet-step-{t}").start()

    def _loop(self):
        while True:
            self.go.wait()
            self.go.clear()
            try:
                worker(np.int64(self.t), *self.args)
            except BaseException as e:    # noqa: BLE001  (e.g. a failed compile: raised again by _Team.run)
                self.error = e
            self.args = None
            self.done.set()

    def start(self, args):
        self.done.clear()
        self.args, self.running = args, True
        self.go.set()

    def finish(self):
        self.done.wait()
        self.running = False


class _Team:
    """Threads that run ``worker`` beside the calling thread, one decode step at a time.

    Why Python threads, not a Numba prange: Numba compiles everything a function calls again inside it, and
    a parallel loop adds two such levels (its generated kernel and the function around it) over the whole
    decode step, which doubled the step's first-run compile time. ``worker`` releases the GIL (nogil), so
    these threads and the caller run it at the same time; between steps the threads sleep on an Event
    (one wake-up per token, where the op-by-op path paid one per GEMV)."""

    def __init__(self):
        self.helpers = []
        self.lock = threading.Lock()

    def run(self, n_threads, args):
        """worker(t, *args) for t = 0 .. n_threads-1: t = 0 on this thread, the others on the team's. Returns
        when all have finished, also when interrupted (a KeyboardInterrupt while waiting leaves the helpers
        marked running: the next run waits for them before it reuses the step's buffers)."""
        with self.lock:                                   # one step at a time through the team
            for helper in self.helpers:
                if helper.running:
                    helper.finish()
            while len(self.helpers) < n_threads - 1:
                self.helpers.append(_Helper(len(self.helpers) + 1))
            helpers = self.helpers[:n_threads - 1]
            for helper in helpers:
                helper.start(args)
            try:
                worker(np.int64(0), *args)
            finally:
                for helper in helpers:
                    helper.finish()
            for helper in helpers:
                if helper.error is not None:
                    error, helper.error = helper.error, None
                    raise error


_TEAM = _Team()


def _new_team_after_fork():
    global _TEAM
    _TEAM = _Team()          # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_new_team_after_fork)


_NO_KV32 = np.zeros((1, 1, 1, 1), np.float32)     # the cache arrays of the other element type (never read)
_NO_KV16 = np.zeros((1, 1, 1, 1), np.uint16)


class DecodeStep:
    """The arrays decode_step reads (the weights, by reference) and writes (buffers made once and reused),
    for one runtime.FastPath; one token at a time, from one thread at a time.

    layers: runtime.FastLayer objects (their qkv/o/gate_up/down matrices live in arena, a WeightArena);
    table: the tied LM head [V, D]; the step runs the head itself when it is bf16 bits (uint16) with
    D % 16 == 0 (lm_head_v2's kernel), else it stops after the final norm and the caller applies the head.
    int8_head: the opt-in 8-bit head's (q int8 [V, D], scale float32 [V]) (runtime.FastPath.use_int8_head),
    which the step then runs instead of the table's (lm_head_int8's row dots: int8_matmul's bits).
    """

    def __init__(self, config, layers, arena, final_norm, table, int8_head=None):
        d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        base = arena.buffer.ctypes.data
        mats = np.zeros((len(layers), 4, 4), np.int64)
        scales, scale_off = [], 0
        for i, layer in enumerate(layers):
            for j, fused in enumerate((layer.qkv, layer.o, layer.gate_up, layer.down)):
                packed = fused.linear.packed                                       # [N, K/4] in the arena
                mats[i, j] = (packed.ctypes.data - base, packed.shape[0], packed.shape[1], scale_off)
                scales.append(fused.linear.row_scale)
                scale_off += packed.shape[0]
        self.head_in_step = (int8_head is not None or table.dtype == np.uint16) and d % 16 == 0
        head_q, head_scale = (int8_head if int8_head is not None                  # [V, D] int8, [V] float32
                              else (np.zeros((1, 16), np.int8), np.ones(1, np.float32)))
        self.weights = StepWeights(
            arena.buffer, mats, np.concatenate(scales),
            *(np.stack([getattr(layer, name) for layer in layers]).astype(np.float32, copy=False)
              for name in ("input_layernorm", "post_attention_layernorm", "attn_sub_norm", "ffn_sub_norm")),
            np.ascontiguousarray(final_norm, np.float32),
            table if self.head_in_step and int8_head is None else np.zeros((1, 16), np.uint16),
            head_q, head_scale, int8_head is not None)
        f32 = lambda *shape: np.zeros(shape, np.float32)                            # noqa: E731
        self.buffers = StepBuffers(
            h=f32(d), x=f32(d), qkv=f32((n_heads + 2 * n_kv) * hd), q=f32(n_heads, hd), k=f32(n_kv, hd),
            scores=f32(n_heads, 1), ones=np.ones(1, np.float32), attn=f32(n_heads, hd), attn_norm=f32(d),
            o=f32(d), h_attn=f32(d), x2=f32(d), gate_up=f32(2 * f), m=f32(f), m_norm=f32(f), down=f32(d),
            h_out=f32(d), x_out=f32(d), codes=np.zeros(max(d, f), np.int8),
            planes_d=np.zeros((4, d // 4), np.int8), planes_f=np.zeros((4, f // 4), np.int8),
            s=f32(1), xsum=np.zeros(1, np.int32))
        self.sync = np.zeros((PHASES_PER_LAYER * len(layers) + 2) * LINE, np.int64)
        self.stats = np.zeros((numba.config.NUMBA_NUM_THREADS, PHASES_PER_LAYER + 1, 3), np.int64)   # cycles
        self.scale = np.float32(hd ** -0.5)
        self.eps = np.float32(config.rms_norm_eps)

    @staticmethod
    def fits(config, layers) -> bool:
        """Whether the step can run this model: every matrix on the door's one-token AVX2 kernels (v6 or v4:
        K % 128 == 0 on an AVX2 CPU) and whole groups of query heads per key/value head."""
        return (config.num_attention_heads % config.num_key_value_heads == 0
                and config.head_dim % OUT_ELEMS == 0
                and all(fused.linear.kernel_for(1) in ("v4", "v6")
                        for layer in layers for fused in (layer.qkv, layer.o, layer.gate_up, layer.down)))

    def __call__(self, h_row, pos, cos, sin, cache, logits=None) -> bool:
        """Token embedding h_row float32 [D] at position pos (cos, sin float32 [HD]: RoPE there) through every
        layer, its key and value stored in cache (a KVCache) at pos; the final norm lands in
        buffers.x_out, and the logits in `logits` (float32 [V]) if given and the head runs here. False if
        the step stopped on a NaN/inf activation or a float16 overflow (rerun the token op by op: it
        raises the error, naming the layer)."""
        b = self.buffers
        if b.scores.shape[1] < cache.capacity:                          # the attention weights' rows
            b = self.buffers = b._replace(scores=np.zeros((b.scores.shape[0], cache.capacity), np.float32),
                                          ones=np.ones(cache.capacity, np.float32))
        if cache.k.dtype == np.float16:
            kv = KVArrays(_NO_KV32, _NO_KV32, cache.k.view(np.uint16), cache.v.view(np.uint16), True)
        else:
            kv = KVArrays(cache.k, cache.v, _NO_KV16, _NO_KV16, False)
        b.h[:] = h_row
        with_head = logits is not None and self.head_in_step
        out = logits if with_head else b.x_out                          # (not written without the head)
        n_phases = PHASES_PER_LAYER * len(self.weights.mats) + (1 if with_head else 0)
        self.sync[:] = 0
        _TEAM.run(get_num_threads(), (self.weights, b, kv, np.int64(pos), cos, sin, self.scale, self.eps, out,
                                      self.sync, np.int64(n_phases), self.stats))
        return not (self.sync[:n_phases * LINE].reshape(n_phases, LINE)[:, READY] == READY_ABORT).any()
