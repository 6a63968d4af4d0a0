"""The fast path: the model of refbitnet.model on the Numba kernels, built once from the weights.

``FastPath(config, weights)`` repacks every projection into the kernels' layout (q/k/v fused into one
[H*HD + 2*KVH*HD, D] matrix and gate/up into one [2F, D], each row with its own weight_scale, so the
outputs equal the separate projections), and ``forward`` runs the same sequence of ops as
``refbitnet.model.decoder_layer`` with the elementwise glue between projections compiled (rms_norm in
NumPy's pairwise summation order, residual add fused with the next norm, relu2 * up fused with ffn_sub_norm,
RoPE; rows split between threads for a block of tokens). Each compiled op reproduces NumPy's float32
operations in NumPy's order, so every integer code and every float of the layers is bit-identical to the
readable path; attention, the embedding and the final norm are refbitnet.model's own ops, and only the
bf16 LM head (kernels.bf16_matmul) sums in another order. It records the same trace names itself, so a
trace checks the path that ships. Imports point one way: this module uses refbitnet.model, never the reverse.

Also here, each with the same bits: blocks of up to SHORT_BLOCK tokens run one token at a time (a fresh
install's first short prompt compiles only the decode kernels); the opt-in ``decode_region`` runs a decode
step's GEMVs and glue in one parallel region per layer (REFBITNET_DECODE_REGIONS=1). Not the same bits, and
opt-in: the 8-bit LM head (``FastPath.use_int8_head``, REFBITNET_LM_HEAD=int8).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

from . import kernels  # (sets the LLVM options before anything below compiles)
from .errors import RefBitNetError
from .kernels import TernaryLinear
from .kernels import act_quant
from .kernels.sync import claim, fetch_add, store_release, wait_nonzero
from .kernels.v3_word_planes import MAX_K
from .kernels.lm_head_int8 import int8_matmul, quantize_rows_int8
from .kernels.lm_head_v2 import bf16_matmul_claimed_v2
from .kernels.v4_maddubs import dot_row as v4_dot_row
from .kernels.repack import WeightArena, kernel_layout_rows
from .attention_kernel import attend
from .glue import (add_rms_norm_into, add_rms_norm_row, relu2_mul_rms_norm_into, relu2_mul_rms_norm_row,
                   rms_norm_into, rms_norm_row, rope_heads, rope_into)
from .kv_cache import KVCache
from .model import embed, lm_head, recorder, rms_norm, rope_tables
from .quant import absmax_int8
from .weights import read_private


# ----------------------------------------------------------------------------- decoding: one region per layer
# A decode step (S = 1) through one OpenMP region per GEMV wakes and parks the worker threads 121 times per
# token, with the quantize pass and the glue on the calling thread between them; on a busy machine the woken
# worker often lands on the caller's CPU and the static halves of a GEMV then run one after the other
# (benchmarks/results/decode_profile.md). ``decode_region`` runs the four GEMVs from one layer's attention
# output to the next layer's q/k/v in ONE region: the threads claim chunks of CHUNK_ROWS rows of the current
# GEMV from a shared counter (a thread that is not running claims nothing, so nobody waits for it), and the
# thread that finishes a GEMV's last chunk runs the glue (the same compiled ops as the block path, in the same
# order: same bits) and quantizes the next GEMV's input, then publishes it; the others wait for that flag.
# The GEMV arithmetic is kernels.v4_maddubs's (dot_row and its epilogue), so every output equals the door's.
# Attention stays refbitnet.model.attention (NumPy) between two regions.

PHASE_O, PHASE_GATE_UP, PHASE_DOWN, PHASE_QKV = 0, 1, 2, 3
PHASE_NAMES = ("o", "gate_up", "down", "qkv")
CHUNK_ROWS = 32                          # rows per claimed chunk (as ROWS_PER_TASK of the v4 GEMV)
CLAIM, DONE, READY, FRONT, BACK = 0, 4, 8, 12, 16    # offsets of the per-phase counters in `sync` (int64 [20])
READY_OK, READY_ABORT = 1, 2


@njit(cache=True)
def _gemv_chunk(packed, planes, s, xsum, row_scale, out, chunk):
    """Rows chunk*CHUNK_ROWS .. of the v4 GEMV for one token: out[0, n] = fl(fl(float32(acc) / s) * scale[n])."""
    n_end = min(packed.shape[0], (chunk + 1) * CHUNK_ROWS)
    for n in range(chunk * CHUNK_ROWS, n_end):
        acc = v4_dot_row(packed[n], planes[0]) - xsum[0]
        out[0, n] = np.float32(np.float32(np.float32(acc) / s[0]) * row_scale[n])


@njit(cache=True)
def _glue(phase, first, w, bufs, eps):
    """The ops before GEMV `phase` (on one thread): its input computed and quantized into the planes it
    reads. Returns True if that input holds a NaN/inf (the caller aborts the region and reports it)."""
    h_cur, a, a_norm, h_attn, x2, m, m_norm, x, o_out, gu_out, dn_out = bufs[:11]
    planes_d, planes_f, s, xsum = bufs[12], bufs[13], bufs[14], bufs[15]
    if phase == PHASE_O:                 # a_norm = rms_norm(attention output)
        rms_norm_row(a[0], w[8], eps, a_norm[0])
        return act_quant.quantize_byte_planes(a_norm, s[0:1], planes_d, xsum[0:1]) >= 0
    if phase == PHASE_GATE_UP:           # h_attn = h + o, x2 = rms_norm(h_attn)
        add_rms_norm_row(h_cur[0], o_out[0], w[9], eps, h_attn[0], x2[0])
        return act_quant.quantize_byte_planes(x2, s[1:2], planes_d, xsum[1:2]) >= 0
    if phase == PHASE_DOWN:              # m = relu2(gate) * up, m_norm = rms_norm(m)
        f = m.shape[1]
        relu2_mul_rms_norm_row(gu_out[0, :f], gu_out[0, f:], w[10], eps, m[0], m_norm[0])
        return act_quant.quantize_byte_planes(m_norm, s[2:3], planes_f, xsum[2:3]) >= 0
    if first != PHASE_QKV:               # next layer: h = h_attn + down, x = its input norm
        add_rms_norm_row(h_attn[0], dn_out[0], w[11], eps, h_cur[0], x[0])
    return act_quant.quantize_byte_planes(x, s[3:4], planes_d, xsum[3:4]) >= 0


@njit(cache=True)
def _region_worker(t, first, last, w, bufs, eps, sync):
    """What thread t of decode_region runs: for each GEMV, wait for its input, then claim and compute chunks
    of its rows; the thread that completes the last chunk runs the next GEMV's glue and publishes it."""
    for phase in range(first, last + 1):
        if wait_nonzero(sync, READY + phase) != READY_OK:
            return
        if phase == PHASE_O:
            packed, row_scale, planes, out = w[0], w[1], bufs[12], bufs[8]
        elif phase == PHASE_GATE_UP:
            packed, row_scale, planes, out = w[2], w[3], bufs[12], bufs[9]
        elif phase == PHASE_DOWN:
            packed, row_scale, planes, out = w[4], w[5], bufs[13], bufs[10]
        else:
            packed, row_scale, planes, out = w[6], w[7], bufs[12], bufs[11]
        s, xsum = bufs[14][phase:phase + 1], bufs[15][phase:phase + 1]
        n_chunks = (packed.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS
        while True:
            chunk = claim(sync, CLAIM + phase, FRONT + phase, BACK + phase, n_chunks, t)
            if chunk < 0:
                break
            _gemv_chunk(packed, planes, s, xsum, row_scale, out, chunk)
            if fetch_add(sync, DONE + phase, 1) == n_chunks - 1 and phase < last:
                bad = _glue(phase + 1, first, w, bufs, eps)         # the last finisher prepares the next GEMV
                store_release(sync, READY + phase + 1, READY_ABORT if bad else READY_OK)


@njit(cache=True, parallel=True)
def decode_region(first, last, w, bufs, eps, sync, n_threads):
    """GEMVs first .. last (PHASE_*) of a decode step in one parallel region, each preceded by its glue.

    w: packed uint8 [N, K/4] and row scales float32 [N] of o, gate_up, down and the next layer's qkv (8
    arrays), then attn_sub_norm, post_attention_layernorm, ffn_sub_norm and the next layer's
    input_layernorm. bufs: float32 [1, .] (h_cur, a, a_norm, h_attn, x2, m, m_norm, x, o_out, gu_out,
    dn_out, qkv_out), byte planes int8 [1, 4, D/4] and [1, 4, F/4], s float32 [4] and xsum int32 [4] (one
    of each per GEMV). first == PHASE_QKV: x holds the first layer's normed input. sync: int64 [20].
    Returns -1, or the phase whose input held a NaN/inf (the region then stopped before that GEMV).
    """
    sync[:] = 0
    if _glue(first, first, w, bufs, eps):
        return first
    sync[READY + first] = READY_OK
    for t in prange(n_threads):
        _region_worker(t, first, last, w, bufs, eps, sync)
    for phase in range(first, last + 1):
        if sync[READY + phase] == READY_ABORT:
            return phase
    return -1


# ----------------------------------------------------------------------------- the fast path

def kernels_fit(config) -> bool:
    """Whether every projection of config fits the packed kernels (K % 8 == 0, K <= MAX_K) and the
    q/k/v and gate/up fusions (row counts that are multiples of 4, as the release layout has anyway)."""
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
    return all(k % 8 == 0 and 0 < k <= MAX_K for k in widths)


class FusedLinear:
    """Projections of one layer that read the same input, as one kernel-layout matrix with per-row scales.

    linear: kernels.TernaryLinear over packed uint8 [sum N_i, K/4] and row scales float32 [sum N_i];
    names: the checkpoint names of the parts in row order; rows: their row counts N_i.
    """

    def __init__(self, weights, arena=None):           # weights: ((name, TernaryWeight), ...)
        self.names = tuple(name for name, _ in weights)
        self.rows = tuple(w.shape[0] for _, w in weights)
        packed = kernel_layout_rows([read_private(w.packed) for _, w in weights], arena)   # [sum N_i, K/4]
        scales = np.concatenate([np.full(w.shape[0], w.weight_scale, np.float32) for _, w in weights])
        self.linear = TernaryLinear(packed, scales)

    def __call__(self, i, x, record=None):
        """The parts' outputs float32 [S, N_i] for input x float32 [S, K] (views of one buffer, valid until
        the next call on this matrix). An inf or NaN reaching the quantizer names layer i and the parts."""
        try:
            y = self.linear(x)                                                         # [S, sum N_i]
        except RefBitNetError as e:
            raise RefBitNetError(f"layers.{i}.{'/'.join(self.names)}: input to the activation quantizer: "
                                 f"{e}") from None
        parts, r0 = [], 0
        for n in self.rows:
            parts.append(y[:, r0:r0 + n])
            r0 += n
        if record is not None:
            self._record_integers(x, record)
        return parts

    def _record_integers(self, x, record):
        """The integer intermediates the kernel computed, for a trace: xq, s of the input (absmax_int8 equals
        the fused quantizer bit for bit) and each part's int32 accumulators."""
        xq, s = absmax_int8(x)                                                          # [S, K], [S]
        acc = self.linear.acc(xq)                                                       # [S, sum N_i]
        r0 = 0
        for name, n in zip(self.names, self.rows):
            record(f"{name}.xq", xq), record(f"{name}.s", s), record(f"{name}.acc", acc[:, r0:r0 + n])
            r0 += n


class FastLayer:
    """One decoder layer for the kernels: its four norms and three fused matrices plus down_proj."""

    def __init__(self, w, arena=None):
        self.input_layernorm, self.post_attention_layernorm = w.input_layernorm, w.post_attention_layernorm
        self.attn_sub_norm, self.ffn_sub_norm = w.attn_sub_norm, w.ffn_sub_norm
        self.qkv, self.o, self.gate_up, self.down = (FusedLinear(group, arena) for group in self.groups(w))

    @staticmethod
    def groups(w):
        """The layer's projections as the four matrices the kernels read, in the order a decode step reads them."""
        return ((("q_proj", w.q_proj), ("k_proj", w.k_proj), ("v_proj", w.v_proj)), (("o_proj", w.o_proj),),
                (("gate_proj", w.gate_proj), ("up_proj", w.up_proj)), (("down_proj", w.down_proj),))


SHORT_BLOCK = 8   # blocks of up to this many tokens (no trace) run one token at a time (see FastPath.forward)


class FastPath:
    """refbitnet.model.forward on the Numba kernels (see the module docstring). Built once per Model;
    holds reused decode buffers, so one FastPath serves one thread at a time."""

    def __init__(self, config, weights):
        self.config = config
        self.embed_tokens = weights.embed_tokens                # [V, D] bf16 bits (maybe memory-mapped)
        self.output_table = weights.output_table                # [V, D]
        self.norm = weights.norm                                # [D]
        # every packed matrix in one allocation, in decode order (kernels.repack.WeightArena says why)
        arena = WeightArena([(sum(p.shape[0] for _, p in group), group[0][1].shape[1] // 4)
                             for w in weights.layers for group in FastLayer.groups(w)])
        self.layers = [FastLayer(w, arena) for w in weights.layers]
        self._decode_workspace = None
        # decoding in one parallel region per layer (decode_region): opt-in (REFBITNET_DECODE_REGIONS=1), where
        # every GEMV of S = 1 is v4's. The same bits; it costs ~5 s more of first-run compiling for ~2-4% of
        # decode speed on an idle machine and nothing measurable on a busy one (benchmarks/results/
        # decode_profile.md), so the per-GEMV path stays the default.
        self.regions_fit = all(lin.linear.kernel_for(1) == "v4" for layer in self.layers
                               for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self.decode_regions = self.regions_fit and os.environ.get("REFBITNET_DECODE_REGIONS", "") == "1"
        self._region_weights = [self._region_tuple(i) for i in range(len(self.layers))]
        self._region_ws = None
        self._head_sync = np.zeros(3, np.int64)
        self.claimed_head = True              # one token's LM head with claimed rows (bf16_matmul_claimed_v2)
        self.int8_head = None                 # (q int8 [V, D], scale f32 [V]) when the 8-bit head is on
        if os.environ.get("REFBITNET_LM_HEAD", "") == "int8":
            self.use_int8_head()

    def use_int8_head(self, on: bool = True) -> None:
        """Opt in (or out) of the 8-bit LM head (kernels.lm_head_int8): the table quantized per row to int8
        and a float32 scale, half the bytes per token. It changes the logits (not the model's arithmetic;
        its cost: benchmarks/results/int8_head.md). Also REFBITNET_LM_HEAD=int8 when the path is built."""
        if not on:
            self.int8_head = None
        elif self.int8_head is None:
            if self.output_table.shape[1] % 16:
                raise RefBitNetError(f"int8 LM head: needs D % 16 == 0, found D = {self.output_table.shape[1]}")
            self.int8_head = quantize_rows_int8(self.output_table)

    def forward(self, ids, cache=None, start=0, trace=None, last_only=False, trace_integers=False):
        """As refbitnet.model.forward(config, weights, ids, "int", cache, start, trace, last_only, trace_integers).

        A block of 2 .. SHORT_BLOCK tokens without a trace runs through the layers one token at a time, on the
        decode kernels: the same bits (every op treats each token on its own, so a block equals its tokens
        one by one; test_runtime checks it), and a fresh install's first short prompt then compiles only
        the decode kernels, not the prefill GEMM and its glue as well (they compile with the first longer
        block). Up to 8 tokens this costs a 2B4T prompt a few decode steps' worth of weight reads."""
        cfg = self.config
        s_len = ids.shape[0]
        cos, sin = rope_tables(start + np.arange(s_len), cfg.head_dim, cfg.rope_theta)    # [S, HD] x2
        record = recorder(trace, trace_integers)
        h = embed(self.embed_tokens, ids)                                                  # [S, D]
        if record:
            record("embed", h)
        # without a cache: a float32 one for this call only, which holds k and v exactly as computed
        layer_cache = cache if cache is not None else KVCache(cfg, s_len)
        if record is None and 1 < s_len <= SHORT_BLOCK:      # one token at a time: the decode kernels
            h = np.concatenate([self.layers_forward(h[j:j + 1], cos[j:j + 1], sin[j:j + 1], layer_cache, start + j)
                                for j in range(s_len)])                                    # [S, D]
        else:
            h = self.layers_forward(h, cos, sin, layer_cache, start, record)               # [S, D]
        if cache is not None:
            cache.commit(start, ids)
        x = rms_norm(h, self.norm, cfg.rms_norm_eps)                                       # [S, D]
        if record:
            record("norm", x)
        logits = self.lm_head(x[-1:] if last_only else x)                                  # [S or 1, V]
        if record:
            record("logits", logits)
        return logits

    def lm_head(self, x):
        """x float32 [S, D] -> logits [S, V]: the bf16 kernel for a bf16 table (one token: rows claimed),
        refbitnet.model.lm_head otherwise; the int8 kernel when the opt-in 8-bit head is on."""
        if self.int8_head is not None:
            return int8_matmul(np.ascontiguousarray(x, dtype=np.float32), *self.int8_head)
        if self.output_table.dtype == np.uint16:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.shape[0] == 1 and self.claimed_head and x.shape[1] % 16 == 0:     # decoding: rows claimed
                out = np.empty((1, self.output_table.shape[0]), np.float32)        # [1, V]
                bf16_matmul_claimed_v2(x, self.output_table, out, self._head_sync, numba.get_num_threads())
                return out
            return kernels.bf16_matmul(x, self.output_table)
        return lm_head(x, self.output_table)

    def _region_tuple(self, i):
        """decode_region's w for layer i: its o, gate_up, down and the next layer's qkv (packed, row scales;
        layer 0's after the last layer: the region that starts a step with layer 0's q/k/v uses the last
        layer's tuple), its three norms and the next input norm."""
        w = self.layers[i]
        nxt = self.layers[(i + 1) % len(self.layers)]
        return (w.o.linear.packed, w.o.linear.row_scale, w.gate_up.linear.packed, w.gate_up.linear.row_scale,
                w.down.linear.packed, w.down.linear.row_scale, nxt.qkv.linear.packed, nxt.qkv.linear.row_scale,
                w.attn_sub_norm, w.post_attention_layernorm, w.ffn_sub_norm, nxt.input_layernorm)

    def _region_buffers(self):
        """decode_region's bufs and sync, made once (see its docstring)."""
        if self._region_ws is None:
            cfg = self.config
            d, f = cfg.hidden_size, cfg.intermediate_size
            n_qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
            f32 = lambda n: np.zeros((1, n), np.float32)                                  # noqa: E731
            bufs = (f32(d), f32(cfg.num_attention_heads * cfg.head_dim), f32(d), f32(d), f32(d), f32(f), f32(f),
                    f32(d), f32(d), f32(2 * f), f32(d), f32(n_qkv), np.zeros((1, 4, d // 4), np.int8),
                    np.zeros((1, 4, f // 4), np.int8), np.zeros(4, np.float32), np.zeros(4, np.int32))
            self._region_ws = (bufs, np.zeros(20, np.int64))
        return self._region_ws

    def _region(self, i, first, last):
        """decode_region with layer i's tuple (GEMVs first .. last; PHASE_QKV is layer i+1's); a NaN/inf
        reaching a quantizer is reported by that projection's own door, naming the layer."""
        bufs, sync = self._region_buffers()
        eps = np.float32(self.config.rms_norm_eps)
        bad = decode_region(first, last, self._region_weights[i], bufs, eps, sync, numba.get_num_threads())
        if bad >= 0:
            layer, fused, x = {PHASE_O: (i, self.layers[i].o, bufs[2]),
                               PHASE_GATE_UP: (i, self.layers[i].gate_up, bufs[4]),
                               PHASE_DOWN: (i, self.layers[i].down, bufs[6])}.get(
                                   bad, ((i + 1) % len(self.layers), None, bufs[7]))
            fused = fused or self.layers[layer].qkv
            fused(layer, x)                                  # raises the quantizer's error for this input
            raise RefBitNetError(f"layers.{layer}: input to the activation quantizer: expected finite values")

    def _decode_layers(self, h, cos, sin, cache, start, first, last):
        """layers_forward for one token (S = 1, no trace) through decode_region: one parallel region per
        layer, attention (refbitnet.model.attention) between two regions. The same bits as the block path."""
        cfg = self.config
        n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = np.float32(cfg.rms_norm_eps)
        bufs, _ = self._region_buffers()
        h_cur, a, h_attn, x, dn_out, qkv_out = bufs[0], bufs[1], bufs[3], bufs[7], bufs[10], bufs[11]
        ws = self._workspace(1)
        q_rot, k_rot = ws["q"], ws["k"]
        h_cur[:] = h
        rms_norm_row(h_cur[0], self.layers[first].input_layernorm, eps, x[0])          # [1, D]
        self._region(first - 1, PHASE_QKV, PHASE_QKV)                                   # layer first's q/k/v
        nq, nk = n_heads * hd, n_kv * hd
        for i in range(first, last):
            rope_heads(qkv_out[0, :nq].reshape(n_heads, hd), cos[0], sin[0], q_rot[0])   # [H, HD]
            rope_heads(qkv_out[0, nq:nq + nk].reshape(n_kv, hd), cos[0], sin[0], k_rot[0])
            cache.store(i, start, k_rot, qkv_out[:, nq + nk:].reshape(1, n_kv, hd))
            attend(q_rot, cache, i, start, out=a.reshape(1, n_heads, hd))             # a [1, H*HD]
            if i + 1 < last:
                self._region(i, PHASE_O, PHASE_QKV)        # o, gate_up, down of layer i; q/k/v of layer i+1
            else:
                self._region(i, PHASE_O, PHASE_DOWN)
        return h_attn + dn_out                                                          # [1, D], a new array

    def layers_forward(self, h, cos, sin, cache, start, record=None, first=0, last=None):
        """Decoder layers first .. last-1 on h float32 [S, D] at positions start .. start+S-1 -> [S, D]:
        refbitnet.model.decoder_layer's ops in its order, the glue compiled and fused (residual add with
        the next layer's input norm, relu2 * up with ffn_sub_norm). Keys and values enter the cache through
        KVCache.store (NumPy's float16 rounding for a float16 cache) and come back through read_kv."""
        cfg, layers = self.config, self.layers
        last = len(layers) if last is None else last
        s_len, n_heads, n_kv, hd = h.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if s_len == 1 and record is None and self.decode_regions and first < last:
            return self._decode_layers(h, cos, sin, cache, start, first, last)
        eps = np.float32(cfg.rms_norm_eps)
        ws = self._workspace(s_len)
        h_cur, x, h_attn, x2, q_rot, k_rot = ws["h"], ws["x"], ws["h_attn"], ws["x2"], ws["q"], ws["k"]
        h_cur[:] = h
        rms_norm_into(h_cur, layers[first].input_layernorm, eps, x)                        # [S, D]
        for i in range(first, last):
            w = layers[i]
            rec = None if record is None else (lambda name, value, i=i: record(f"layers.{i}.{name}", value))
            if rec:
                rec("input_layernorm", x)
            q, k, v = w.qkv(i, x, rec)                                             # [S, H*HD], [S, KVH*HD] x2
            rope_into(q.reshape(s_len, n_heads, hd), cos, sin, q_rot)                  # [S, H, HD]
            rope_into(k.reshape(s_len, n_kv, hd), cos, sin, k_rot)                     # [S, KVH, HD]
            v = v.reshape(s_len, n_kv, hd)                                         # [S, KVH, HD]
            cache.store(i, start, k_rot, v)
            a = attend(q_rot, cache, i, start).reshape(s_len, n_heads * hd)        # [S, H*HD]
            rms_norm_into(a, w.attn_sub_norm, eps, ws["a_norm"])                        # [S, D]
            (o,) = w.o(i, ws["a_norm"], rec)                                       # [S, D]
            add_rms_norm_into(h_cur, o, w.post_attention_layernorm, eps, h_attn, x2)   # h_attn = h + o; x2
            gate, up = w.gate_up(i, x2, rec)                                       # [S, F] x2
            relu2_mul_rms_norm_into(gate, up, w.ffn_sub_norm, eps, ws["m"], ws["m_norm"])   # [S, F] x2
            (down,) = w.down(i, ws["m_norm"], rec)                                 # [S, D]
            if rec:
                for name, value in (("q", q_rot), ("k", k_rot), ("v", v), ("attn", a),
                                    ("attn_sub_norm", ws["a_norm"]), ("o_proj", o), ("resid_attn", h_attn),
                                    ("post_attention_layernorm", x2), ("gate", gate), ("up", up),
                                    ("ffn_act", ws["m"]), ("ffn_sub_norm", ws["m_norm"]), ("down_proj", down)):
                    rec(name, value)
            if i + 1 < last:                                  # out = h_attn + down, and the next input norm
                add_rms_norm_into(h_attn, down, layers[i + 1].input_layernorm, eps, h_cur, x)
                out = h_cur
            else:
                out = h_attn + down                                                # [S, D], a new array
            if rec:
                rec("out", out)
        return out

    def _workspace(self, s_len):
        """Buffers for one forward of s_len tokens: made once and kept for S = 1 (decoding), fresh for a block."""
        ws = self._decode_workspace if s_len == 1 else None
        if ws is None:
            cfg = self.config
            d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
            ws = {name: np.empty((s_len, d), np.float32) for name in ("h", "x", "h_attn", "a_norm", "x2")}
            ws.update(m=np.empty((s_len, f), np.float32), m_norm=np.empty((s_len, f), np.float32),
                      q=np.empty((s_len, cfg.num_attention_heads, hd), np.float32),
                      k=np.empty((s_len, cfg.num_key_value_heads, hd), np.float32))
            if s_len == 1:
                self._decode_workspace = ws
        return ws
