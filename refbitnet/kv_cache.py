"""The KV cache: keys and values of every layer for the positions already processed, the one stateful object.

Prefill appends a whole prompt block, each decode step one position; attention then reads positions
0 .. length-1 of a layer. The cache also records each position's token id, so a conversation can keep the
positions whose ids match its next prompt (``keep_prefix``) and run only the rest.
"""

from __future__ import annotations

import numpy as np

from .errors import RefBitNetError, RefBitNetTypeError


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

    def __init__(self, config, capacity: int, dtype: str = "float32"):
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

    def commit(self, start: int, ids: np.ndarray) -> None:
        """Mark positions start .. start+S-1 valid, holding the keys and values of token ids [S] (stored
        layer by layer with store() during the forward pass that calls this)."""
        self.ids[start:start + ids.shape[0]] = ids
        self.length = start + ids.shape[0]

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
