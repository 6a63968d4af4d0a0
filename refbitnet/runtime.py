"""The fast path: the model of refbitnet.model on the Numba kernels, built once from the weights.

``FastPath(config, weights)`` repacks every projection into the kernels' layout (q/k/v fused into one
[H*HD + 2*KVH*HD, D] matrix and gate/up into one [2F, D], each row with its own weight_scale, so the
outputs equal the separate projections), and ``forward`` runs the same sequence of ops as
``refbitnet.model.decoder_layer`` with the elementwise glue between projections compiled (rms_norm in
NumPy's pairwise summation order, residual add fused with the next norm, relu2 * up fused with ffn_sub_norm,
RoPE; rows split between threads for a block of tokens). Each compiled op reproduces NumPy's float32
operations in NumPy's order, so every integer code and every float of the layers is bit-identical to the
readable path; attention is ``attention_kernel.attend`` (model.attention's bits, compiled, reading the KV
cache as stored), the embedding and the final norm are refbitnet.model's own ops, and only the bf16 LM
head (kernels.bf16_matmul) sums in another order. It records the same trace names itself, so a
trace checks the path that ships. Imports point one way: this module uses refbitnet.model, never the reverse.

Also here, each with the same bits: blocks of up to SHORT_BLOCK tokens (decoding: one) run one token at a
time through ``decode_step.DecodeStep``, every layer and the LM head with the threads together from start to
end (one wake-up per token instead of one parallel region per GEMV), where the model fits its kernels
(``DecodeStep.fits``), else op by op; longer blocks (prefill) run op by op, each projection one
multi-token GEMM, a prompt longer than PREFILL_BLOCK tokens as blocks of PREFILL_BLOCK. Not the same bits,
and opt-in: the 8-bit LM head (``FastPath.use_int8_head``, REFBITNET_LM_HEAD=int8), run by the step too.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from . import kernels  # (sets the LLVM options before anything below compiles)
from .errors import RefBitNetError
from .kernels import TernaryLinear, compiler_pages
from .kernels.v3_word_planes import MAX_K
from .kernels.lm_head_int8 import int8_matmul, quantize_rows_int8
from .kernels.lm_head_v2 import bf16_matmul_claimed_v2
from .kernels.repack import WeightArena, kernel_layout_rows
from .attention_kernel import attend
from .decode_step import DecodeStep
from .glue import add_rms_norm_into, relu2_mul_rms_norm_into, rms_norm_into, rope_into
from .kv_cache import KVCache
from .model import embed, lm_head, recorder, rms_norm, rope_tables
from .quant import absmax_int8
from .weights import in_memory, read_private


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

    def __call__(self, i, x, out=None, record=None):
        """The parts' outputs float32 [S, N_i] for input x float32 [S, K]: views of out's first S * sum N_i
        floats (a buffer the caller reuses for every matrix of a block), or without out of the kernel's result
        (for S = 1 the matrix's own reused buffer); valid until that buffer is next written. An inf or NaN
        reaching the quantizer names layer i and the parts."""
        s_len, n_rows = x.shape[0], self.linear.shape[0]
        y = None if out is None else out[:s_len * n_rows].reshape(s_len, n_rows)            # [S, sum N_i]
        try:
            y = self.linear(x, y)                                                      # [S, sum N_i]
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


def _malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim            # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the memory a block's buffers held back to the OS once they are freed. glibc keeps freed blocks
    below its mmap threshold (which rises up to 32 MiB as large blocks are freed) in its heap, so after a
    128-token 2B4T prefill ~27 MiB of freed buffers would stay in the process's RSS, under the KV cache as it
    fills (results/rss.md). A no-op where malloc_trim does not exist."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


SHORT_BLOCK = 8   # blocks of up to this many tokens (no trace) run one token at a time (see FastPath.forward)
PREFILL_BLOCK = 128   # longer blocks (no trace) run as blocks of this many tokens (see FastPath._forward_blocks)


class FastPath:
    """refbitnet.model.forward on the Numba kernels (see the module docstring). Built once per Model;
    holds reused decode buffers, so one FastPath serves one thread at a time."""

    def __init__(self, config, weights):
        self.config = config
        # The LM head reads its whole table every token: in this process's memory (a file read, in huge pages),
        # not through the file's mapping, whose 4 KiB pages the stream reads slower (results/decode_ab.md)
        self.output_table = in_memory(weights.output_table)      # [V, D] bf16 bits (or float)
        self.embed_tokens = self.output_table if weights.lm_head is None else weights.embed_tokens   # [V, D]
        self.norm = weights.norm                                # [D]
        # every packed matrix in one allocation, in decode order (kernels.repack.WeightArena says why)
        self.arena = WeightArena([(sum(p.shape[0] for _, p in group), group[0][1].shape[1] // 4)
                                  for w in weights.layers for group in FastLayer.groups(w)])
        self.layers = [FastLayer(w, self.arena) for w in weights.layers]
        self.step = None                      # the one-region decode step (decode_step.DecodeStep), made on first use
        self.step_fits = DecodeStep.fits(config, self.layers)
        self._decode_workspace = None
        self._head_sync = np.zeros(1, np.int64)
        self.claimed_head = True              # one token's LM head with claimed rows (bf16_matmul_claimed_v2)
        self.int8_head = None                 # (q int8 [V, D], scale f32 [V]) when the 8-bit head is on
        if os.environ.get("REFBITNET_LM_HEAD", "") == "int8":
            self.use_int8_head()
        compiler_pages.release_if_compiled()  # LLVM's pages, touched loading the repacking kernels

    def use_int8_head(self, on: bool = True) -> None:
        """Opt in (or out) of the 8-bit LM head (kernels.lm_head_int8): the table quantized per row to int8
        and a float32 scale, half the bytes per token. It changes the logits (not the model's arithmetic;
        its cost: benchmarks/results/int8_head.md). Also REFBITNET_LM_HEAD=int8 when the path is built."""
        if not on and self.int8_head is not None:
            self.int8_head = None
            self.step = None                            # rebuilt on next use, with the head it should run
        elif on and self.int8_head is None:
            if self.output_table.shape[1] % 16:
                raise RefBitNetError(f"int8 LM head: needs D % 16 == 0, found D = {self.output_table.shape[1]}")
            self.int8_head = quantize_rows_int8(self.output_table)
            self.step = None

    def forward(self, ids, cache=None, start=0, trace=None, last_only=False, trace_integers=False):
        """As refbitnet.model.forward(config, weights, ids, "int", cache, start, trace, last_only, trace_integers)
        (see _forward). After a call that compiled or loaded kernels, LLVM's pages go back to the OS
        (kernels.compiler_pages says why)."""
        logits = self._forward(ids, cache, start, trace, last_only, trace_integers)
        compiler_pages.release_if_compiled()
        return logits

    def _forward(self, ids, cache, start, trace, last_only, trace_integers):
        """forward() itself.

        A block of 1 .. SHORT_BLOCK tokens without a trace runs through the layers one token at a time: through
        the one-region DecodeStep where the model fits it, else op by op on the decode kernels. The same bits
        (every op treats each token on its own, so a block equals its tokens one by one; test_runtime and
        test_decode_step check it), and a fresh install's first short prompt then compiles only the decode
        step, not the prefill GEMM and its glue as well (they compile with the first longer block). Up to 8
        tokens this costs a 2B4T prompt a few decode steps' worth of weight reads. A block longer than
        PREFILL_BLOCK without a trace runs as blocks of PREFILL_BLOCK tokens (_forward_blocks), again the
        same bits; with a trace a block always runs as one, so the trace holds every token's values."""
        cfg = self.config
        s_len = ids.shape[0]
        cos, sin = rope_tables(start + np.arange(s_len), cfg.head_dim, cfg.rope_theta)    # [S, HD] x2
        record = recorder(trace, trace_integers)
        h = embed(self.embed_tokens, ids)                                                  # [S, D]
        if record:
            record("embed", h)
        # without a cache: a float32 one for this call only, which holds k and v exactly as computed
        layer_cache = cache if cache is not None else KVCache(cfg, s_len)
        if record is None and s_len <= SHORT_BLOCK and self.step_fits:    # one region per token
            return self._forward_steps(ids, h, cos, sin, cache, layer_cache, start, last_only)
        if record is None and 1 < s_len <= SHORT_BLOCK:      # one token at a time: the decode kernels
            h = np.concatenate([self.layers_forward(h[j:j + 1], cos[j:j + 1], sin[j:j + 1], layer_cache, start + j)
                                for j in range(s_len)])                                    # [S, D]
        elif record is None and s_len > PREFILL_BLOCK:      # a long prompt: in blocks of PREFILL_BLOCK tokens
            h = self._forward_blocks(h, cos, sin, layer_cache, start, last_only)          # [S or 1, D]
        else:
            h = self.layers_forward(h, cos, sin, layer_cache, start, record)               # [S, D]
            return_freed_memory()
        if cache is not None:
            cache.commit(start, ids)
        x = rms_norm(h, self.norm, cfg.rms_norm_eps)                                       # [S, D]
        if record:
            record("norm", x)
        logits = self.lm_head(x[-1:] if last_only else x)                                  # [S or 1, V]
        if record:
            record("logits", logits)
        return logits

    def _forward_blocks(self, h, cos, sin, layer_cache, start, last_only):
        """The layers over a prompt h float32 [S, D] longer than PREFILL_BLOCK, one block of PREFILL_BLOCK tokens
        after another -> [S, D] (or the last row [1, D] for last_only). The same bits as one block: every op
        but attention treats each token on its own, and a block's queries read the earlier blocks' keys and
        values from the cache as stored. What it buys is memory: a block's buffers (~0.3 MB per token for
        2B4T) are freed before the next, so a 4096-token prompt holds one block's, not 4096 tokens'."""
        s_len = h.shape[0]
        out = []
        for j in range(0, s_len, PREFILL_BLOCK):
            block = slice(j, min(s_len, j + PREFILL_BLOCK))
            y = self.layers_forward(h[block], cos[block], sin[block], layer_cache, start + j)   # [B, D]
            out.append(y[-1:] if last_only else y)
            return_freed_memory()
        return out[-1] if last_only else np.concatenate(out)

    def _forward_steps(self, ids, h, cos, sin, cache, layer_cache, start, last_only):
        """forward() for up to SHORT_BLOCK tokens, one decode_step per token (each token's layers, final norm
        and, for the logits wanted, the LM head in one parallel region): the same bits as the op-by-op path.
        A step that stops (a NaN/inf, a float16 overflow) is rerun op by op, which raises the error."""
        if self.step is None:
            self.step = DecodeStep(self.config, self.layers, self.arena, self.norm, self.output_table,
                                   self.int8_head)
        s_len = ids.shape[0]
        head_here = self.step.head_in_step
        logits = np.empty((1 if last_only else s_len, self.output_table.shape[0]), np.float32)     # [S or 1, V]
        x_final = np.empty((s_len, self.config.hidden_size), np.float32)                           # [S, D]
        for j in range(s_len):
            row = j - (s_len - 1) if last_only else j                    # this token's logits row, if any
            out = logits[row] if head_here and row >= 0 else None
            if not self.step(h[j], start + j, cos[j], sin[j], layer_cache, out):
                self.layers_forward(h[j:j + 1], cos[j:j + 1], sin[j:j + 1], layer_cache, start + j)
                raise RefBitNetError(f"decode step stopped at position {start + j} without an error from "
                                     f"the op-by-op path")     # (not reached: the rerun raises)
            x_final[j] = self.step.buffers.x_out
        if cache is not None:
            cache.commit(start, ids)
        if not head_here:
            logits = self.lm_head(x_final[-1:] if last_only else x_final)
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

    def layers_forward(self, h, cos, sin, cache, start, record=None, first=0, last=None):
        """Decoder layers first .. last-1 on h float32 [S, D] at positions start .. start+S-1 -> [S, D]:
        refbitnet.model.decoder_layer's ops in its order, the glue compiled and fused (residual add with
        the next layer's input norm, relu2 * up with ffn_sub_norm). Keys and values enter the cache through
        KVCache.store (NumPy's float16 rounding for a float16 cache) and are read as stored by attend."""
        cfg, layers = self.config, self.layers
        last = len(layers) if last is None else last
        s_len, n_heads, n_kv, hd = h.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = np.float32(cfg.rms_norm_eps)
        ws = self._workspace(s_len)
        h_cur, x, h_attn, x2, q_rot, k_rot = ws["h"], ws["x"], ws["h_attn"], ws["x2"], ws["q"], ws["k"]
        y = ws["y"]                                           # the projections' outputs, flat, or None (S = 1)
        h_cur[:] = h
        rms_norm_into(h_cur, layers[first].input_layernorm, eps, x)                        # [S, D]
        for i in range(first, last):
            w = layers[i]
            rec = None if record is None else (lambda name, value, i=i: record(f"layers.{i}.{name}", value))
            if rec:
                rec("input_layernorm", x)
            # each projection's output is a view of the one buffer y, read before the next projection
            # writes it (and recorded before then)
            q, k, v = w.qkv(i, x, y, rec)                                          # [S, H*HD], [S, KVH*HD] x2
            rope_into(q.reshape(s_len, n_heads, hd), cos, sin, q_rot)                  # [S, H, HD]
            rope_into(k.reshape(s_len, n_kv, hd), cos, sin, k_rot)                     # [S, KVH, HD]
            v = v.reshape(s_len, n_kv, hd)                                         # [S, KVH, HD]
            cache.store(i, start, k_rot, v)
            if rec:
                rec("q", q_rot), rec("k", k_rot), rec("v", v)
            a = attend(q_rot, cache, i, start).reshape(s_len, n_heads * hd)        # [S, H*HD]
            rms_norm_into(a, w.attn_sub_norm, eps, ws["a_norm"])                        # [S, D]
            (o,) = w.o(i, ws["a_norm"], y, rec)                                    # [S, D]
            add_rms_norm_into(h_cur, o, w.post_attention_layernorm, eps, h_attn, x2)   # h_attn = h + o; x2
            if rec:
                rec("o_proj", o)
            gate, up = w.gate_up(i, x2, y, rec)                                    # [S, F] x2
            relu2_mul_rms_norm_into(gate, up, w.ffn_sub_norm, eps, ws["m"], ws["m_norm"])   # [S, F] x2
            if rec:
                rec("gate", gate), rec("up", up)
            (down,) = w.down(i, ws["m_norm"], y, rec)                              # [S, D]
            if rec:
                for name, value in (("attn", a), ("attn_sub_norm", ws["a_norm"]), ("resid_attn", h_attn),
                                    ("post_attention_layernorm", x2), ("ffn_act", ws["m"]),
                                    ("ffn_sub_norm", ws["m_norm"]), ("down_proj", down)):
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
            # (one token: each matrix writes its own decode buffer; a block: one buffer for the widest)
            y_rows = max(fused.linear.shape[0] for layer in self.layers
                         for fused in (layer.qkv, layer.o, layer.gate_up, layer.down))
            ws.update(y=None if s_len == 1 else np.empty(s_len * y_rows, np.float32),
                      m=np.empty((s_len, f), np.float32), m_norm=np.empty((s_len, f), np.float32),
                      q=np.empty((s_len, cfg.num_attention_heads, hd), np.float32),
                      k=np.empty((s_len, cfg.num_key_value_heads, hd), np.float32))
            if s_len == 1:
                self._decode_workspace = ws
        return ws
