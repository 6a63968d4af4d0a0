"""The BitNet b1.58 forward pass (SPEC §2) in plain NumPy, top to bottom in this one file.

What it is: the transformer of microsoft/bitnet-b1.58-2B-4T written as one pure function per op
(embedding, rms_norm, BitLinear, RoPE, causal GQA attention, ReLU², tied LM head), a KV cache for
incremental decoding, and the ``Model`` that strings them together. Shapes follow the legend in
``refbitnet.config`` (S tokens in the block, T tokens attended to, D, F, H, KVH, HD, V).

What it is not: a loader (``refbitnet.checkpoint`` turns files into the tensors used here), a
tokenizer or sampler (``refbitnet.tokenizer``, ``refbitnet.generate``), or a fast kernel
(``refbitnet.kernels``). Two switches:

- ``numerics="int"`` (default): every BitLinear is int8 activations x ternary codes summed in int32,
  then ``y = acc / s * weight_scale`` (what bitnet.cpp and the GPU decode kernel compute).
  ``numerics="fake-quant"``: ``(xq / s)`` as float32 times the ternary codes, then ``* weight_scale``
  (what transformers' AutoBitLinear and QAT training compute). Same in exact arithmetic; in float32
  they differ by rounding, which can flip an int8 code at the next quantizer.
- ``backend="numpy"`` (default): the readable path here. ``backend="numba"``: the same model with its
  projections repacked for ``refbitnet.kernels`` (q/k/v and gate/up fused into one matrix each, with a
  per-row weight_scale) and the LM head on ``kernels.bf16_matmul``. Every integer intermediate is
  identical to the NumPy path; only the LM head's float summation order differs.
  Numba runs ``numerics="int"`` only.

Weights are held as the release stores them: projections as 2-bit packed codes (HF layout
[N/4, K] on the NumPy path, unpacked one projection at a time; kernel layout on the Numba path), the
embedding as bf16 bits (uint16, memory-mapped when loaded from a file, never widened as a whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bf16 import bf16_to_f32
from .config import Config
from .errors import RefBitNetError, RefBitNetTypeError, TokenizerError

NUMERICS = ("int", "fake-quant")
BACKENDS = ("numpy", "numba")
LM_HEAD_CHUNK_ROWS = 1024        # vocab rows widened to float32 at a time by the NumPy LM head

# Projections in the order of the checkpoint; (name, module) pairs as in "model.layers.{i}.{module}.{name}".
PROJECTIONS = (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"),
               ("o_proj", "self_attn"), ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"))
NORMS = (("input_layernorm", None), ("post_attention_layernorm", None),
         ("attn_sub_norm", "self_attn"), ("ffn_sub_norm", "mlp"))


# ============================================================================ the ops (pure functions)

def embed(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the embedding, widened: table [V, D] (bf16 bits uint16, or float16/32), ids [S] -> float32 [S, D]."""
    return widen(table[ids])                                                  # [S, D]


def widen(rows: np.ndarray) -> np.ndarray:
    """A table slice as float32: bf16 bits (uint16) exactly via bf16_to_f32, float16/float32 by cast."""
    rows = np.asarray(rows)
    return bf16_to_f32(rows) if rows.dtype == np.uint16 else rows.astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x**2) + eps) over the last axis, in float32. x [..., N], weight [N].

    Written as transformers writes it (x * rsqrt(var + eps), then * weight) so float rounding matches.
    """
    x = x.astype(np.float32, copy=False)
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)       # [..., 1]
    inv_rms = np.float32(1.0) / np.sqrt(variance + np.float32(eps))           # [..., 1]
    return weight * (x * inv_rms)                                              # [..., N]


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos, sin tables for half-split RoPE: positions [S] -> (cos, sin) float32 [S, HD].

    inv_freq[j] = theta**(-2j/HD), j < HD/2 (float32, as transformers stores it); the angle is the
    float32 product position * inv_freq[j]; element j and j + HD/2 share it.
    cos and sin are evaluated in float64 and rounded once, so they are correctly rounded float32.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim                 # [HD/2]
    inv_freq = (1.0 / theta ** exponents).astype(np.float32)                           # [HD/2]
    angle = positions.astype(np.float32)[:, None] * inv_freq[None, :]                  # [S, HD/2] float32
    angle = np.concatenate([angle, angle], axis=-1).astype(np.float64)                 # [S, HD]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head: x [S, heads, HD], cos/sin [S, HD] -> [S, heads, HD].

    rope(x) = x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x[HD/2:], x[:HD/2]):
    element i pairs with i + HD/2 (the "NeoX" half split), not with i + 1.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)               # [S, heads, HD]
    return x * cos[:, None, :] + rotated * sin[:, None, :]                            # [S, heads, HD]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention, float32.

    q [S, H, HD] for positions start .. start+S-1; k, v [T, KVH, HD] for positions 0 .. T-1
    (T >= start + S). Query head h reads KV head h // (H // KVH). Returns [S, H, HD].

    The causal mask is applied by slicing: the query at position p attends to keys 0..p only, which
    is what an additive -inf mask does (exp(-inf) = 0). Each query is computed on its own, with
    arrays of the same shapes whether it arrives in a prompt block or alone during decoding, so
    prefill and token-by-token decoding give bit-identical results.
    """
    s_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    groups = n_heads // n_kv_heads
    scale = np.float32(head_dim ** -0.5)
    out = np.empty_like(q)                                                           # [S, H, HD]
    q_grouped = q.reshape(s_len, n_kv_heads, groups, head_dim)                       # [S, KVH, G, HD]
    out_grouped = out.reshape(s_len, n_kv_heads, groups, head_dim)                   # (views)
    k_t = k.transpose(1, 2, 0)                                                       # [KVH, HD, T] view
    v_t = v.transpose(1, 0, 2)                                                       # [KVH, T, HD] view
    for i in range(s_len):
        t = start + i + 1                                                            # keys 0 .. start+i
        scores = q_grouped[i] @ k_t[:, :, :t]                                        # [KVH, G, T]
        scores *= scale
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores, out=scores)
        weights /= weights.sum(axis=-1, keepdims=True, dtype=np.float32)            # softmax over T
        np.matmul(weights, v_t[:, :t], out=out_grouped[i])                           # [KVH, G, HD]
    return out


def relu2(x: np.ndarray) -> np.ndarray:
    """relu(x)**2, BitNet's FFN activation."""
    r = np.maximum(x, np.float32(0))
    return r * r


def lm_head(x: np.ndarray, table: np.ndarray, chunk_rows: int = LM_HEAD_CHUNK_ROWS) -> np.ndarray:
    """Logits x @ table.T in float32: x [S, D], table [V, D] (bf16 bits uint16, or float16/32) -> [S, V].

    Full precision (not BitLinear). Widens chunk_rows vocab rows at a time, so there is never a
    float32 copy of the whole (tied) embedding. Each token is its own matrix-vector product, so a
    token's logits do not depend on how many tokens share the call (prefill == decode, bit for bit).
    """
    vocab = table.shape[0]
    logits = np.empty((x.shape[0], vocab), dtype=np.float32)                           # [S, V]
    for r0 in range(0, vocab, chunk_rows):
        rows = widen(table[r0:r0 + chunk_rows])                                       # [chunk, D]
        for s in range(x.shape[0]):
            logits[s, r0:r0 + rows.shape[0]] = rows @ x[s]                            # [chunk]
    return logits


def bitlinear(x: np.ndarray, codes: np.ndarray, weight_scale: np.float32, numerics: str) -> np.ndarray:
    """BitLinear without bias or inner norm: x [S, K], ternary codes int8 [N, K] -> [S, N] float32.

    "int":        xq, s = absmax_int8(x); acc = xq @ codes.T (int32); y = acc / s * weight_scale
    "fake-quant": y = ((xq / s) @ codes.T in float32) * weight_scale
    """
    from .bitlinear import bitlinear_fake_quant, bitlinear_int
    if numerics == "int":
        return bitlinear_int(x, codes, weight_scale).y
    return bitlinear_fake_quant(x, codes, weight_scale)


# ============================================================================ weights

@dataclass
class TernaryWeight:
    """One projection as the release stores it: codes packed in the HF layout, one float32 scale.

    packed: uint8 [N/4, K] (maybe memory-mapped); weight_scale: float32 scalar (multiply convention).
    """
    packed: np.ndarray
    weight_scale: np.float32

    @property
    def shape(self):
        """(N, K) of the unpacked codes."""
        return (self.packed.shape[0] * 4, self.packed.shape[1])

    def codes(self, private_read: bool = False) -> np.ndarray:
        """Ternary codes int8 [N, K] (unpacked on every call; not cached, to keep memory at 2 bits/weight).

        private_read: read a memory-mapped tensor's bytes with a plain file read instead of through
        the mapping, so repacking a whole model (Numba path) leaves no file pages resident.
        """
        packed = read_private(self.packed) if private_read else np.asarray(self.packed)
        return unpack_hf_fast(packed)


@dataclass
class LayerWeights:
    """One decoder layer. Norm weights float32 ([D] except ffn_sub_norm [F]); projections ternary."""
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    attn_sub_norm: np.ndarray
    ffn_sub_norm: np.ndarray
    q_proj: TernaryWeight            # [H*HD, D]
    k_proj: TernaryWeight            # [KVH*HD, D]
    v_proj: TernaryWeight            # [KVH*HD, D]
    o_proj: TernaryWeight            # [D, H*HD]
    gate_proj: TernaryWeight         # [F, D]
    up_proj: TernaryWeight           # [F, D]
    down_proj: TernaryWeight         # [D, F]


@dataclass
class ModelWeights:
    """All parameters. embed_tokens (and lm_head if untied) as bf16 bits uint16 [V, D]; norm float32 [D]."""
    embed_tokens: np.ndarray
    layers: list
    norm: np.ndarray
    lm_head: np.ndarray | None = None
    source_format: str = "packed"    # what the tensors were: "packed" (uint8 + weight_scale) or "bf16-master"

    @property
    def output_table(self) -> np.ndarray:
        """The LM head matrix [V, D]: the embedding when tied (2B4T)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head


def unpack_hf_fast(packed: np.ndarray) -> np.ndarray:
    """layouts.unpack_hf without its per-call check for the field value 3 (the loader checked every
    projection once): uint8 [N/4, K] -> int8 codes [N, K], rows i*R .. (i+1)*R-1 from bits 2i..2i+1."""
    rows, k = packed.shape
    codes = np.empty((4, rows, k), dtype=np.int8)                                    # [4, R, K]
    for i in range(4):
        codes[i] = ((packed >> np.uint8(2 * i)) & np.uint8(3)).view(np.int8)          # c = w + 1 in {0, 1, 2}
    codes -= np.int8(1)
    return codes.reshape(4 * rows, k)                                                # [N, K]


def read_private(a: np.ndarray) -> np.ndarray:
    """An array's values in fresh memory. For a whole np.memmap this is a file read (np.fromfile), which,
    unlike reading through the mapping, does not leave the pages counted in this process's memory."""
    import mmap
    if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename:
        return np.fromfile(a.filename, dtype=a.dtype, count=a.size, offset=a.offset).reshape(a.shape)
    return np.array(a)


# ============================================================================ KV cache

def zeros_small_pages(shape, dtype) -> np.ndarray:
    """Like np.zeros, but in an anonymous mapping advised against transparent huge pages.

    np.zeros of a large array is also mapped lazily, but where the OS uses 2 MiB huge pages the first
    positions written in each layer's [capacity, KVH, HD] block each bring in a whole 2 MiB page: a
    128-token prompt made 8 MiB per layer resident (240 MB for 30 layers). With 4 KiB pages the
    memory follows the positions actually filled.
    """
    import mmap
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * np.dtype(dtype).itemsize
    try:
        buffer = mmap.mmap(-1, max(nbytes, 1))
    except (OSError, OverflowError, ValueError) as e:
        raise MemoryError(f"cannot map {nbytes} bytes: {e}") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


KV_DTYPES = ("float32", "float16")   # KVCache element types; float32 is the exact reference


class KVCache:
    """Keys and values of every layer for up to ``capacity`` positions: the one stateful object.

    k, v: [L, capacity, KVH, HD] of ``dtype``, preallocated zeros (the OS maps the pages lazily, so a
    large capacity costs memory only as it fills; see zeros_small_pages). ``length`` positions are valid.

    dtype "float32" (default) keeps keys and values exactly as computed. "float16" (what llama.cpp and
    bitnet.cpp use by default) halves the cache: keys (after RoPE) and values are rounded to float16 when
    stored (NumPy's cast, round to nearest even) and widened back to float32 when read, so attention
    itself still computes in float32. A value beyond float16's range (|x| > 65504) is refused, not
    stored as inf.
    """

    def __init__(self, config: Config, capacity: int, dtype: str = "float32"):
        dtype = check_kv_dtype(dtype)
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        self.k = zeros_small_pages(shape, dtype)                               # [L, capacity, KVH, HD]
        self.v = zeros_small_pages(shape, dtype)                               # [L, capacity, KVH, HD]
        self.ids = np.zeros(capacity, np.int64)   # [capacity] the token id of each cached position
        self.length = 0
        self.owner = None      # token of the Model whose keys/values it holds (claimed when first used)
        self._widened = None   # float16 cache: one layer's keys and values widened to float32 (read)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> str:
        """"float32" or "float16": how keys and values are stored."""
        return self.k.dtype.name

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write float32 keys and values k, v [S, KVH, HD] of positions start .. start+S-1 of layer."""
        end = start + k.shape[0]
        with np.errstate(over="ignore"):                  # float16: rounded to nearest even; overflow below
            self.k[layer, start:end] = k
            self.v[layer, start:end] = v
        if self.k.dtype != np.float32:                    # overflow to inf would poison every later step
            for name, new, stored in (("keys", k, self.k), ("values", v, self.v)):
                if not np.isfinite(stored[layer, start:end]).all():
                    big = float(np.abs(new).max())
                    raise RefBitNetError(f"layers.{layer}: {name} up to |x| = {big:.4g} do not fit a "
                                         f"{self.dtype} KV cache (max {float(np.finfo(self.k.dtype).max):g}); "
                                         f"use new_cache(kv_dtype='float32')")

    def read(self, layer: int, end: int):
        """Keys and values of positions 0 .. end-1 of layer as float32 [T, KVH, HD] (T = end): views of
        a float32 cache; for a float16 one, widened (exactly: every float16 is a float32) into two float32
        buffers of one layer that this cache reuses, so they hold this layer's values until the next read."""
        k, v = self.k[layer, :end], self.v[layer, :end]
        if k.dtype == np.float32:
            return k, v
        k32, v32 = self.widened_buffers(end)
        np.copyto(k32, k)
        np.copyto(v32, v)
        return k32, v32

    def widened_buffers(self, end: int):
        """The reused float32 buffers [T, KVH, HD] (T = end) that read() widens a float16 layer into."""
        if self._widened is None:                     # [2, capacity, KVH, HD], pages mapped as they fill
            self._widened = zeros_small_pages((2,) + self.k.shape[1:], np.float32)
        return self._widened[0, :end], self._widened[1, :end]

    def keep_prefix(self, ids) -> int:
        """Keep the cached positions whose token ids equal the start of ids (1-D), forget the rest; return
        how many were kept. Position p's keys and values depend on ids[0..p] only (causal attention), so
        the kept ones are exactly what a forward over those ids computes: a conversation continues from
        its earlier turns and only ids[kept:] need a forward pass."""
        ids = np.asarray(ids)
        n = min(self.length, ids.shape[0])
        differ = np.flatnonzero(self.ids[:n] != ids[:n])
        self.length = int(differ[0]) if differ.size else n
        return self.length

    def reset(self) -> None:
        """Forget every position (the memory is reused, by this or another model of the same shape)."""
        self.length = 0
        self.owner = None

    def __repr__(self):
        return f"KVCache(length={self.length}, capacity={self.capacity}, dtype={self.dtype!r})"


def check_kv_dtype(dtype) -> np.dtype:
    """The KV cache element type from a name in KV_DTYPES (or np.float16/np.float32) -> np.dtype."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, (np.dtype, type)):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    else:
        raise RefBitNetTypeError(f"kv_dtype: expected one of {KV_DTYPES} (a string), found "
                                 f"{type(dtype).__name__} {dtype!r:.40}")
    if name not in KV_DTYPES:
        raise RefBitNetError(f"kv_dtype: expected one of {KV_DTYPES}, found {dtype!r}")
    return np.dtype(name)


# ============================================================================ the model

class Model:
    """BitNet b1.58: ``forward(ids) -> logits``, incremental decoding with a KVCache, ``generate``.

    Model(config, weights, numerics="int", backend="numpy"): weights is a ``ModelWeights`` or a
    mapping of release-format tensors by checkpoint name (validated by
    ``refbitnet.checkpoint.model_weights``). ``refbitnet.load(dir)`` builds one from a model directory.
    """

    def __init__(self, config: Config, weights, numerics: str = "int", backend: str = "numpy", *,
                 tokenizer=None, source: str = "weights"):
        if not isinstance(config, Config):
            raise RefBitNetTypeError(f"config: expected a refbitnet Config, found {type(config).__name__}")
        if numerics not in NUMERICS:
            raise RefBitNetError(f"numerics: expected one of {NUMERICS}, found {numerics!r}")
        if backend not in BACKENDS:
            raise RefBitNetError(f"backend: expected one of {BACKENDS}, found {backend!r}")
        if backend == "numba" and numerics != "int":
            raise RefBitNetError(f"numerics={numerics!r} runs on backend='numpy' only; the Numba kernels "
                                 f"compute the integer form (numerics='int')")
        if not isinstance(weights, ModelWeights):
            from .checkpoint import model_weights
            weights = model_weights(config, weights, source=source)
        self.config = config
        self.numerics = numerics
        self.backend = backend
        self.tokenizer = tokenizer
        self.source = source                     # where the weights came from (a path or a description)
        self._cache_token = object()             # marks the KV caches this model has filled
        self.source_format = weights.source_format   # "packed" (release uint8 + weight_scale) or "bf16-master"
        self.embed_tokens = weights.embed_tokens             # uint16 [V, D] bf16 bits
        self.output_table = weights.output_table             # uint16 [V, D] (same array when tied)
        self.norm = weights.norm                             # float32 [D]
        if backend == "numpy":
            self.layers = weights.layers
            self._linears = _NumpyLinears(weights.layers, numerics)
        else:
            self._linears = _NumbaLinears(weights.layers)
            self.layers = [_norms_only(layer) for layer in weights.layers]   # projections live in _linears
        self._weights = weights if backend == "numpy" else None

    # -- public API -------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int | None = None, kv_dtype: str = "float32") -> KVCache:
        """An empty KV cache for up to max_tokens positions (default: the model's context length).

        kv_dtype: "float32" (default, exact) or "float16" (half the memory; keys and values rounded to
        float16 when stored, see KVCache)."""
        limit = self.config.max_position_embeddings
        if max_tokens is None:
            max_tokens = limit
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
            raise RefBitNetTypeError(f"max_tokens: expected an int, found {type(max_tokens).__name__}")
        if not 1 <= max_tokens <= limit:
            raise RefBitNetError(f"max_tokens: expected 1 <= max_tokens <= max_position_embeddings = {limit}, "
                                 f"found {max_tokens}")
        dtype = check_kv_dtype(kv_dtype)
        try:
            return KVCache(self.config, int(max_tokens), dtype.name)
        except (MemoryError, ValueError):       # a context length from the file that cannot be allocated
            cfg = self.config
            gib = 2 * dtype.itemsize * cfg.num_hidden_layers * int(max_tokens) * cfg.num_key_value_heads \
                * cfg.head_dim / 2**30
            raise RefBitNetError(f"max_tokens: a KV cache of {max_tokens} positions needs {gib:.3g} GiB, more than "
                                 f"can be allocated; pass a smaller max_tokens to new_cache()") from None

    def forward(self, ids, cache: KVCache | None = None, trace: dict | None = None,
                last_only: bool = False) -> np.ndarray:
        """Logits float32 [S, V] for token ids [S] ([1, V] for the last position only if last_only).

        Without a cache: a full causal forward over ids at positions 0..S-1 that leaves no state behind.
        With a cache: ids continue after the cache.length positions it holds (prefill: the whole
        prompt as one block; decode: one token), and their keys/values are appended to it.
        trace: if a dict, receives every named intermediate as a float32 copy [S, ...]: "embed";
        per layer i "layers.{i}." + input_layernorm, q, k (after RoPE, [S, heads, HD]), v, attn,
        attn_sub_norm, o_proj, resid_attn, post_attention_layernorm, gate, up, ffn_act (relu2(gate) * up),
        ffn_sub_norm, down_proj, out (the layer's output hidden state); then "norm" and "logits".
        So ``trace["layers.{i}.out"]`` is every layer's hidden state.
        last_only: apply the LM head to the last position only (prefill before sampling: the head reads
        the whole V x D table per token, so a 128-token prompt would otherwise spend most of its time there).
        """
        cfg = self.config
        ids = self.check_ids(ids)                                                    # [S]
        s_len = ids.shape[0]
        start = 0
        if cache is not None:
            self._check_cache(cache)
            start = cache.length
            if start + s_len > cache.capacity:
                raise RefBitNetError(f"cache: {s_len} new tokens after {start} cached ones exceed its capacity "
                                     f"{cache.capacity} (make it with new_cache(max_tokens))")
        elif s_len > cfg.max_position_embeddings:
            raise RefBitNetError(f"ids: {s_len} tokens exceed max_position_embeddings = "
                                 f"{cfg.max_position_embeddings}")
        cos, sin = rope_tables(start + np.arange(s_len), cfg.head_dim, cfg.rope_theta)  # [S, HD] x2

        h = embed(self.embed_tokens, ids)                                             # [S, D]
        _record(trace, "embed", h)
        if self.backend == "numba" and trace is None:
            from .runtime import forward_layers    # the same layers with compiled glue (bit-identical)
            # without a cache: a float32 one for this call only, which holds k and v exactly as computed
            layer_cache = cache if cache is not None else KVCache(cfg, s_len)
            h = forward_layers(self, h, cos, sin, layer_cache, start)                 # [S, D]
        else:
            for i in range(cfg.num_hidden_layers):
                h = self._layer(i, h, cos, sin, cache, start, trace)                   # [S, D]
        if cache is not None:
            cache.ids[start:start + s_len] = ids
            cache.length = start + s_len
        x = rms_norm(h, self.norm, cfg.rms_norm_eps)                                   # [S, D]
        _record(trace, "norm", x)
        logits = self._lm_head(x[-1:] if last_only else x)                             # [S or 1, V]
        _record(trace, "logits", logits)
        return logits

    def forward_layer(self, i: int, h: np.ndarray, trace: dict | None = None) -> np.ndarray:
        """Decoder layer i alone on hidden states h float32 [S, D] at positions 0..S-1 -> [S, D].

        Stateless; for layer-by-layer checks that feed each layer a reference model's input.
        """
        cfg = self.config
        if not 0 <= i < cfg.num_hidden_layers:
            raise RefBitNetError(f"layer: expected 0 <= i < {cfg.num_hidden_layers}, found {i}")
        h = np.asarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != cfg.hidden_size:
            raise RefBitNetError(f"h: expected shape [S, {cfg.hidden_size}], found {h.shape}")
        cos, sin = rope_tables(np.arange(h.shape[0]), cfg.head_dim, cfg.rope_theta)
        return self._layer(i, h, cos, sin, None, 0, trace)

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed=None, stop=None, stream: bool = False, kv_dtype: str | None = None,
                 cache: KVCache | None = None):
        """Continue prompt (text, or a sequence of token ids) by up to max_new_tokens tokens.

        stop: extra stop conditions, strings and/or token ids (the tokenizer's end-of-turn ids, or the
        config's eos ids without a tokenizer, always stop). Returns the list of new ids; with
        stream=True an iterator yielding them one by one. kv_dtype: the KV cache's element type,
        "float32" (exact, default) or "float16" (half the memory; see KVCache). cache: a KVCache to
        continue, e.g. the previous turn's of a chat (see refbitnet.generate.generate).
        """
        from .generate import generate as _generate
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RefBitNetError("prompt: a text prompt needs a tokenizer (this model has none; pass token ids)")
            prompt_ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            prompt_ids = [int(t) for t in self.check_ids(prompt)]
        stop_ids = list(self.tokenizer.eos_ids) if self.tokenizer is not None else list(self.config.eos_ids)
        stop_strings = []
        if stop is None or isinstance(stop, (str, int, np.integer)):
            stop_items = [] if stop is None else [stop]
        elif isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
            raise RefBitNetTypeError(f"stop: expected a string, a token id or a sequence of them, "
                                     f"found {type(stop).__name__} {stop!r:.60}")
        else:
            stop_items = list(stop)
        for item in stop_items:
            if isinstance(item, str):
                stop_strings.append(item)
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                stop_ids.append(int(item))
            else:
                raise RefBitNetTypeError(f"stop: expected strings or token ids, found {item!r}")
        tokens = _generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop_ids=stop_ids, stop_strings=stop_strings,
                           kv_dtype=kv_dtype, cache=cache)
        return tokens if stream else list(tokens)

    def check_ids(self, ids) -> np.ndarray:
        """Validate token ids: a 1-D integer array/sequence, non-empty, each in [0, vocab_size). -> int64 [S]."""
        vocab = self.config.vocab_size
        if isinstance(ids, (str, bytes)):
            raise RefBitNetTypeError("ids: expected token ids (a 1-D int array or list of ints), found a string")
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError) as e:        # e.g. a ragged nested list
            raise RefBitNetTypeError(f"ids: expected a 1-D sequence [S] of token ids, found a "
                                     f"{type(ids).__name__} numpy cannot read as one ({e})") from None
        if arr.size == 0:
            raise RefBitNetError("ids: expected at least one token id, found an empty sequence")
        if arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise RefBitNetTypeError(f"ids: expected integer token ids, found dtype {arr.dtype}")
        if arr.ndim != 1:
            raise RefBitNetError(f"ids: expected a 1-D sequence [S] of token ids, found shape {arr.shape}")
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            j = int(np.argmax(bad))
            raise TokenizerError(f"ids: expected token ids in [0, {vocab}) (vocab_size), found {int(arr[j])} "
                                 f"at position {j}")
        return arr.astype(np.int64)

    def release_tensors(self) -> dict:
        """The weights as release-format tensors by checkpoint name (what refbitnet.save writes):
        projections uint8 [N/4, K] + weight_scale float32 [1]; embedding/lm_head uint16 bf16 bits; norms float32."""
        cfg = self.config
        t = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if self.output_table is not self.embed_tokens:
            t["lm_head.weight"] = self.output_table
        for i in range(cfg.num_hidden_layers):
            layer = self.layers[i]
            for norm, module in NORMS:
                t[_name(i, norm, module)] = getattr(layer, norm)
            for proj, module, w in self._linears.ternary_weights(i):
                t[_name(i, proj, module)] = w.packed
                t[_name(i, proj, module, "weight_scale")] = np.array([w.weight_scale], dtype=np.float32)
        return t

    def __repr__(self):
        c = self.config
        return (f"Model(L={c.num_hidden_layers}, D={c.hidden_size}, F={c.intermediate_size}, "
                f"H={c.num_attention_heads}, KVH={c.num_key_value_heads}, V={c.vocab_size}, "
                f"numerics={self.numerics!r}, backend={self.backend!r}, source_format={self.source_format!r})")

    # -- one decoder layer (SPEC §2) ----------------------------------------------------------------
    def _layer(self, i, h, cos, sin, cache, start, trace):
        cfg, w, lin = self.config, self.layers[i], self._linears
        s_len, eps = h.shape[0], cfg.rms_norm_eps
        p = f"layers.{i}."
        # attention block
        x = rms_norm(h, w.input_layernorm, eps)                                       # [S, D]
        q, k, v = self._project(i, "q_proj/k_proj/v_proj", lin.qkv, x)                # [S, H*HD], [S, KVH*HD], [S, KVH*HD]
        q = rope(q.reshape(s_len, cfg.num_attention_heads, cfg.head_dim), cos, sin)   # [S, H, HD]
        k = rope(k.reshape(s_len, cfg.num_key_value_heads, cfg.head_dim), cos, sin)   # [S, KVH, HD]
        v = v.reshape(s_len, cfg.num_key_value_heads, cfg.head_dim)                   # [S, KVH, HD]
        if cache is not None:                 # append (float16 cache: rounded), then attend to all T
            cache.store(i, start, k, v)
            k_all, v_all = cache.read(i, start + s_len)                               # float32 [T, KVH, HD]
        else:
            k_all, v_all = k, v
        a = attention(q, k_all, v_all, start).reshape(s_len, -1)                      # [S, H*HD]
        a_norm = rms_norm(a, w.attn_sub_norm, eps)                                    # [S, D] SubLN
        o = self._project(i, "o_proj", lin.o, a_norm)                                 # [S, D]
        h_attn = h + o                                                                # [S, D]
        # feed-forward block
        x2 = rms_norm(h_attn, w.post_attention_layernorm, eps)                        # [S, D]
        gate, up = self._project(i, "gate_proj/up_proj", lin.gate_up, x2)             # [S, F] x2
        m = relu2(gate) * up                                                          # [S, F]
        m_norm = rms_norm(m, w.ffn_sub_norm, eps)                                     # [S, F] SubLN
        down = self._project(i, "down_proj", lin.down, m_norm)                        # [S, D]
        out = h_attn + down                                                           # [S, D]
        if trace is not None:
            for name, value in (("input_layernorm", x), ("q", q), ("k", k), ("v", v), ("attn", a),
                                ("attn_sub_norm", a_norm), ("o_proj", o), ("resid_attn", h_attn),
                                ("post_attention_layernorm", x2), ("gate", gate), ("up", up),
                                ("ffn_act", m), ("ffn_sub_norm", m_norm), ("down_proj", down),
                                ("out", out)):
                _record(trace, p + name, value)
        return out

    def _lm_head(self, x):
        if self.backend == "numba" and self.output_table.dtype == np.uint16:
            from . import kernels
            return kernels.bf16_matmul(np.ascontiguousarray(x, dtype=np.float32), self.output_table)
        return lm_head(x, self.output_table)

    def _project(self, i, names, linear, x):
        """linear(i, x), naming layer i and the projection when its input is rejected, e.g. an inf made
        inside the model reaching the activation quantizer."""
        try:
            return linear(i, x)
        except RefBitNetError as e:
            raise RefBitNetError(f"layers.{i}.{names}: input to the activation quantizer: {e}") from None

    def _check_cache(self, cache):
        if not isinstance(cache, KVCache):
            raise RefBitNetTypeError(f"cache: expected a KVCache from model.new_cache(), found {type(cache).__name__}")
        cfg = self.config
        want = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        found = (cache.k.shape[0], cache.k.shape[2], cache.k.shape[3])
        if want != found:
            raise RefBitNetError(f"cache: expected one made for this model (layers, KV heads, head_dim) = {want}, "
                                 f"found {found}")
        if cache.length and cache.owner is not self._cache_token:
            raise RefBitNetError("cache: holds keys and values computed by another model; use this model's "
                                 "new_cache(), or reset() the cache first")
        cache.owner = self._cache_token


# ============================================================================ the two BitLinear paths

class _NumpyLinears:
    """Projections on the readable path: unpack a projection's codes, then bitlinear() per projection."""

    def __init__(self, layers, numerics):
        self.layers, self.numerics = layers, numerics

    def _apply(self, w: TernaryWeight, x):
        return bitlinear(x, w.codes(), w.weight_scale, self.numerics)

    def qkv(self, i, x):
        w = self.layers[i]
        return self._apply(w.q_proj, x), self._apply(w.k_proj, x), self._apply(w.v_proj, x)

    def o(self, i, a):
        return self._apply(self.layers[i].o_proj, a)

    def gate_up(self, i, x):
        w = self.layers[i]
        return self._apply(w.gate_proj, x), self._apply(w.up_proj, x)

    def down(self, i, m):
        return self._apply(self.layers[i].down_proj, m)

    def ternary_weights(self, i):
        w = self.layers[i]
        return [(proj, module, getattr(w, proj)) for proj, module in PROJECTIONS]


@dataclass
class _KernelMatrix:
    """Ternary rows in kernel layout with one float32 scale per row (fused projections).

    linear: refbitnet.runtime.PackedLinear over packed uint8 [N, K/4] and row_scale float32 [N]."""
    linear: object                # runtime.PackedLinear
    parts: tuple                  # ((name, rows), ...) in row order

    @property
    def packed(self):
        return self.linear.packed

    @property
    def row_scale(self):
        return self.linear.row_scale


class _NumbaLinears:
    """Projections on the Numba kernels: q/k/v fused into one [H*HD + 2*KVH*HD, D] matrix, gate/up into one
    [2F, D]; per-row weight_scale keeps each part's own scale, so the outputs equal separate projections."""

    def __init__(self, layers):
        try:
            from . import kernels
        except ImportError as e:
            raise RefBitNetError(f"backend='numba': refbitnet.kernels is not available ({e}); "
                                 f"use backend='numpy'") from None
        self.kernels = kernels
        self.fused = []
        for w in layers:
            self.fused.append({
                "qkv": _fuse((("q_proj", w.q_proj), ("k_proj", w.k_proj), ("v_proj", w.v_proj))),
                "o": _fuse((("o_proj", w.o_proj),)),
                "gate_up": _fuse((("gate_proj", w.gate_proj), ("up_proj", w.up_proj))),
                "down": _fuse((("down_proj", w.down_proj),)),
            })

    def _apply(self, m: _KernelMatrix, x):
        # absmax_int8 + kernels.ternary_matmul in two compiled calls, into a buffer reused at S = 1
        # (refbitnet.runtime); the slices below are read before this matrix is used again (next layer)
        y = m.linear(x.astype(np.float32, copy=False))                              # [S, N]
        out, r0 = [], 0
        for _, rows in m.parts:
            out.append(y[:, r0:r0 + rows])
            r0 += rows
        return out

    def qkv(self, i, x):
        return tuple(self._apply(self.fused[i]["qkv"], x))

    def o(self, i, a):
        return self._apply(self.fused[i]["o"], a)[0]

    def gate_up(self, i, x):
        return tuple(self._apply(self.fused[i]["gate_up"], x))

    def down(self, i, m):
        return self._apply(self.fused[i]["down"], m)[0]

    def ternary_weights(self, i):
        """Back to the release layout (for saving): split the fused rows, repack in the HF layout."""
        from .layouts import pack_hf, unpack_kernel
        modules = dict(PROJECTIONS)
        result = []
        for m in self.fused[i].values():
            codes = unpack_kernel(m.packed)                                           # [N, K]
            r0 = 0
            for name, rows in m.parts:
                result.append((name, modules[name],
                               TernaryWeight(pack_hf(codes[r0:r0 + rows]), np.float32(m.row_scale[r0]))))
                r0 += rows
        order = [p for p, _ in PROJECTIONS]
        return sorted(result, key=lambda r: order.index(r[0]))


def _fuse(parts) -> _KernelMatrix:
    """Concatenate projections' rows into one kernel-layout matrix with a per-row scale."""
    from .runtime import PackedLinear, kernel_layout_rows
    rows = [4 * w.packed.shape[0] for _, w in parts]                                  # N_i
    # = np.concatenate([hf_to_kernel_layout(w.packed) ...]) in one compiled pass: [sum N_i, K/4]
    packed = kernel_layout_rows([read_private(w.packed) for _, w in parts])
    scales = [np.full(n, w.weight_scale, dtype=np.float32) for n, (_, w) in zip(rows, parts)]
    linear = PackedLinear(packed, np.concatenate(scales))
    return _KernelMatrix(linear, tuple((name, n) for (name, _), n in zip(parts, rows)))


def hf_to_kernel_layout(packed: np.ndarray) -> np.ndarray:
    """HF release layout uint8 [N/4, K] -> kernel layout uint8 [N, K/4], without unpacking to int8.

    Equals layouts.pack_kernel(layouts.unpack_hf(packed)). Field i of packed[r, c] is the code (+1) of
    row i*R + r, column c; the kernel layout wants 4 consecutive columns of one row per byte.
    Field values are not checked here (the loader rejects the value 3 once, at load).
    """
    rows, k = packed.shape
    out = np.empty((4, rows, k // 4), dtype=np.uint8)                                  # [4, R, K/4]
    for i in range(4):
        c = ((packed >> np.uint8(2 * i)) & np.uint8(3)).reshape(rows, k // 4, 4)      # rows i*R.. [R, K/4, 4]
        out[i] = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return out.reshape(4 * rows, k // 4)                                               # [N, K/4]


def _norms_only(layer: LayerWeights):
    """The layer's norm weights (the Numba path keeps projections in fused kernel form instead)."""
    return LayerWeights(layer.input_layernorm, layer.post_attention_layernorm, layer.attn_sub_norm,
                        layer.ffn_sub_norm, None, None, None, None, None, None, None)


def _name(i, name, module=None, suffix="weight"):
    """Checkpoint tensor name, e.g. _name(3, "q_proj", "self_attn") -> model.layers.3.self_attn.q_proj.weight."""
    mid = f"{module}.{name}" if module else name
    return f"model.layers.{i}.{mid}.{suffix}"


def _record(trace, name, value):
    if trace is not None:
        trace[name] = np.array(value, dtype=np.float32, copy=True)
