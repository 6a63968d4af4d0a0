"""The public ``Model``: every user argument checked once, at the door, then one path chosen once.

``Model(config, weights, numerics, backend)`` holds the weights (``refbitnet.weights.ModelWeights``) and
picks how to compute, the way microsoft/BitNet's gpu/model.py picks ``BitLinearKernel`` or ``BitLinear``:

- ``backend="numba"``: ``refbitnet.runtime.FastPath``, the packed kernels (numerics "int" only);
- ``backend="numpy"``: ``refbitnet.model.forward``, the readable path, to read and step through;
- ``backend="auto"`` (default): numba when it can run this model (Numba importable, numerics "int", every
  projection's width fitting the kernels), else numpy. Both compute the same integer codes bit for bit.

``numerics`` picks the arithmetic: "int" (refbitnet's, the integer form), "fake-quant" (float32, as
transformers in a float32 model), "transformers-bf16" (the whole model as transformers' BitNet computes it
in bf16, the release's torch_dtype: ``refbitnet.model_bf16``) and "transformers-legacy-bf16" (the same
with transformers' legacy BitLinear, which a divide-convention checkpoint gets). The last three run on
the NumPy path.

Behind the door nothing is checked again: refbitnet.model and refbitnet.runtime trust their inputs.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

from . import model as readable
from . import model_bf16
from .checks import check_choice, check_int, check_token_ids
from .config import Config
from .errors import RefBitNetError, RefBitNetTypeError
from .generate import generate as _generate
from .generation_config import GenerationDefaults
from .kv_cache import KVCache, check_kv_dtype
from .weights import ModelWeights, model_weights

NUMERICS = ("int", "fake-quant", "transformers-bf16", "transformers-legacy-bf16")
# numerics computed by refbitnet.model_bf16, with the transformers BitLinear class each one follows
BF16_NUMERICS = {"transformers-bf16": "autobitlinear", "transformers-legacy-bf16": "legacy"}
BACKENDS = ("auto", "numba", "numpy")
LM_HEADS = ("bf16", "int8")


class Model:
    """BitNet b1.58: ``forward(ids) -> logits``, incremental decoding with a KVCache, ``generate``.

    Model(config, weights, numerics="int", backend="auto"): weights is a ``ModelWeights`` or a mapping of
    release-format tensors by checkpoint name (checked by ``refbitnet.weights.model_weights``).
    ``refbitnet.load(dir)`` builds one from a model directory.
    """

    def __init__(self, config: Config, weights, numerics: str = "int", backend: str = "auto", *,
                 tokenizer=None, source: str = "weights", generation_defaults: GenerationDefaults | None = None):
        if not isinstance(config, Config):
            raise RefBitNetTypeError(f"config: expected a refbitnet Config, found {type(config).__name__}")
        check_choice(numerics, "numerics", NUMERICS)
        check_choice(backend, "backend", BACKENDS)
        if not isinstance(weights, ModelWeights):
            weights = model_weights(config, weights, source=source)
        _check_bf16_numerics(numerics, weights)
        self.config = config
        self.weights = weights
        self.numerics = numerics
        self.tokenizer = tokenizer
        # sampling defaults from generation_config.json; none: greedy
        self.generation_defaults = GenerationDefaults() if generation_defaults is None else generation_defaults
        self.source = source                       # where the weights came from (a path or a description)
        self.backend = _choose_backend(backend, numerics, config)
        self._fast = None
        if self.backend == "numba":
            from .runtime import FastPath
            self._fast = FastPath(config, weights)
        self._cache_token = object()               # marks the KV caches this model has filled

    # -- what the weights are --------------------------------------------------------------------
    @property
    def source_format(self) -> str:
        """"packed" (release uint8 + weight_scale) or "bf16-master" (quantized at load)."""
        return self.weights.source_format

    @property
    def scale_convention(self) -> str:
        """"multiply" or "divide": what the checkpoint's weight_scale meant (see refbitnet.weights)."""
        return self.weights.scale_convention

    def release_tensors(self) -> dict:
        """The weights as release-format tensors by checkpoint name (what refbitnet.save writes)."""
        return self.weights.release_tensors()

    def set_lm_head(self, kind: str) -> None:
        """"int8" opts in to an 8-bit copy of the tied LM head (each vocabulary row int8 with one float32
        scale: half the bytes read per token, logits changed slightly; measured in
        benchmarks/results/int8_head.md): not the model's arithmetic, so never the default. "bf16" goes
        back to the model's own head. The 8-bit head runs on the Numba kernels only."""
        check_choice(kind, "lm_head", LM_HEADS)
        if self._fast is None:
            if kind == "int8":
                raise RefBitNetError(f"lm_head='int8': the 8-bit LM head runs on the Numba kernels, found "
                                     f"backend {self.backend!r}")
            return
        self._fast.use_int8_head(kind == "int8")

    # -- computing ---------------------------------------------------------------------------------
    def new_cache(self, max_tokens: int | None = None, kv_dtype: str = "float32") -> KVCache:
        """An empty KV cache for up to max_tokens positions (default: the model's context length).

        kv_dtype: "float32" (default, exact) or "float16" (half the memory; keys and values rounded to
        float16 when stored, see KVCache)."""
        limit = self.config.max_position_embeddings
        max_tokens = check_int(limit if max_tokens is None else max_tokens, "max_tokens")
        if not 1 <= max_tokens <= limit:
            raise RefBitNetError(f"max_tokens: expected 1 <= max_tokens <= max_position_embeddings = {limit}, "
                                 f"found {max_tokens}")
        dtype = check_kv_dtype(kv_dtype)
        try:
            return KVCache(self.config, max_tokens, dtype.name)
        except (MemoryError, ValueError):       # a context length from the file that cannot be allocated
            cfg = self.config
            gib = 2 * dtype.itemsize * cfg.num_hidden_layers * max_tokens * cfg.num_key_value_heads \
                * cfg.head_dim / 2**30
            raise RefBitNetError(f"max_tokens: a KV cache of {max_tokens} positions needs {gib:.3g} GiB, more than "
                                 f"can be allocated; pass a smaller max_tokens to new_cache()") from None

    def forward(self, ids, cache: KVCache | None = None, trace: dict | None = None,
                last_only: bool = False, trace_integers: bool = False) -> np.ndarray:
        """Logits float32 [S, V] for token ids [S] ([1, V] for the last position only if last_only).

        Without a cache: a full causal forward over ids at positions 0..S-1 that leaves no state behind.
        With a cache: ids continue after the cache.length positions it holds (prefill: the whole
        prompt as one block; decode: one token), and their keys/values are appended to it.
        trace: if a dict, receives every named intermediate as a float32 copy [S, ...]: "embed";
        per layer i "layers.{i}." + input_layernorm, q, k (after RoPE, [S, heads, HD]), v, attn,
        attn_sub_norm, o_proj, resid_attn, post_attention_layernorm, gate, up, ffn_act (relu2(gate) * up),
        ffn_sub_norm, down_proj, out (the layer's output hidden state); then "norm" and "logits".
        trace_integers: also each projection's integer intermediates "layers.{i}.{proj}.xq" (int8 [S, K]),
        ".s" (float32 [S]) and ".acc" (int32 [S, N]) (numerics "int"). The trace is recorded by the path
        that runs (backend), so it checks the code that ships.
        last_only: apply the LM head to the last position only (prefill before sampling: the head reads
        the whole V x D table per token, so a 128-token prompt would otherwise spend most of its time there).
        """
        cfg = self.config
        ids = self.check_ids(ids)                                                    # [S]
        start = 0
        if cache is not None:
            self._check_cache(cache)
            start = cache.length
            if start + ids.shape[0] > cache.capacity:
                raise RefBitNetError(f"cache: {ids.shape[0]} new tokens after {start} cached ones exceed its "
                                     f"capacity {cache.capacity} (make it with new_cache(max_tokens))")
        elif ids.shape[0] > cfg.max_position_embeddings:
            raise RefBitNetError(f"ids: {ids.shape[0]} tokens exceed max_position_embeddings = "
                                 f"{cfg.max_position_embeddings}")
        self._check_trace(trace, trace_integers)
        if self._fast is not None:
            return self._fast.forward(ids, cache, start, trace, bool(last_only), trace_integers)
        if self.numerics in BF16_NUMERICS:
            return model_bf16.forward(cfg, self.weights, ids, cache, start, trace, bool(last_only),
                                      BF16_NUMERICS[self.numerics])
        return readable.forward(cfg, self.weights, ids, self.numerics, cache, start, trace, bool(last_only),
                                trace_integers)

    def forward_layer(self, i: int, h: np.ndarray, trace: dict | None = None) -> np.ndarray:
        """Decoder layer i alone on hidden states h float32 [S, D] at positions 0..S-1 -> [S, D].

        Stateless; for layer-by-layer checks that feed each layer a reference model's input. trace
        receives the layer's intermediates as "layers.{i}.<name>", as in forward. With the bf16 numerics
        h is rounded to bf16 first (the hidden state such a model passes between layers is bf16)."""
        cfg = self.config
        i = check_int(i, "layer", 0, cfg.num_hidden_layers - 1)
        h = np.asarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != cfg.hidden_size or h.shape[0] == 0:
            raise RefBitNetError(f"h: expected shape [S, {cfg.hidden_size}] with S >= 1, found {h.shape}")
        self._check_trace(trace, False)
        cos, sin = readable.rope_tables(np.arange(h.shape[0]), cfg.head_dim, cfg.rope_theta)
        record = readable.recorder(trace)
        layer_record = None if record is None else readable.prefixed(record, f"layers.{i}.")
        if self.numerics in BF16_NUMERICS:
            cos, sin = model_bf16.rope_tables_bf16(np.arange(h.shape[0]), cfg.head_dim, cfg.rope_theta)
            return model_bf16.decoder_layer(i, model_bf16.bf16(h), self.weights.layers[i], cfg, cos, sin,
                                            record=layer_record, linear=BF16_NUMERICS[self.numerics])
        if self._fast is not None:
            return np.array(self._fast.layers_forward(h, cos, sin, KVCache(cfg, h.shape[0]), 0, record,
                                                      first=i, last=i + 1))
        return readable.decoder_layer(i, h, self.weights.layers[i], cfg, cos, sin, self.numerics,
                                      record=layer_record)

    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed=None, stop=None, stream: bool = False,
                 kv_dtype: str | None = None, cache: KVCache | None = None, ignore_eos: bool = False,
                 do_sample: bool | None = None):
        """Continue prompt (text, or a sequence of token ids) by up to max_new_tokens tokens.

        max_new_tokens, temperature, top_k, top_p, seed, do_sample: None takes the model's default from its
        generation_config.json (refbitnet.generation_config; no file: greedy), a value overrides it.
        stop: extra stop conditions, a string, a token id, or a sequence of them; the default stop ids
        (the tokenizer's end-of-turn ids, or the config's eos ids, and generation_config.json's) stop too
        unless ignore_eos.
        Returns the list of new ids; with stream=True an iterator yielding them one by one.
        kv_dtype: the KV cache's element type, "float32" (exact, default) or "float16" (half the memory;
        see KVCache). cache: a KVCache to continue, e.g. the previous turn's of a chat: the cached
        positions whose ids match the start of the prompt are kept and only the rest runs (see
        refbitnet.generate).
        """
        s = self.generation_defaults.resolve(do_sample=do_sample, temperature=temperature, top_k=top_k,
                                             top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)
        if s.max_new_tokens is None:
            raise RefBitNetError("max_new_tokens: expected the number of tokens to generate, found None (the "
                                 "model's generation_config.json sets no max_new_tokens)")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RefBitNetError("prompt: a text prompt needs a tokenizer (this model has none; pass token ids)")
            prompt = self.tokenizer.encode_prompt(prompt)
        else:
            prompt = self.check_ids(prompt)
        tokens = _generate(self, prompt, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                           top_p=s.top_p, seed=s.seed, stop=stop, ignore_eos=ignore_eos, kv_dtype=kv_dtype,
                           cache=cache)
        return tokens if stream else list(tokens)

    # -- the door's checks ------------------------------------------------------------------------
    def check_ids(self, ids) -> np.ndarray:
        """Validate token ids: a 1-D integer array/sequence, non-empty, each in [0, vocab_size). -> int64 [S]."""
        return check_token_ids(ids, self.config.vocab_size)

    def _check_trace(self, trace, trace_integers):
        if trace is not None and not isinstance(trace, dict):
            raise RefBitNetTypeError(f"trace: expected a dict to fill, or None, found {type(trace).__name__}")
        if trace_integers and self.numerics != "int":
            raise RefBitNetError(f"trace_integers: the integer intermediates exist with numerics='int', "
                                 f"found numerics={self.numerics!r}")

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

    def __repr__(self):
        c = self.config
        return (f"Model(L={c.num_hidden_layers}, D={c.hidden_size}, F={c.intermediate_size}, "
                f"H={c.num_attention_heads}, KVH={c.num_key_value_heads}, V={c.vocab_size}, "
                f"numerics={self.numerics!r}, backend={self.backend!r}, source_format={self.source_format!r})")


def _check_bf16_numerics(numerics: str, weights: ModelWeights) -> None:
    """The bf16 numerics follow the BitLinear class transformers builds for this checkpoint: offline
    AutoBitLinear for a packed multiply-convention file, the legacy BitLinear for a divide-convention one.
    Asking for the other class, or for a bf16 master (transformers quantizes it online from the master
    weights, which refbitnet does not keep), is refused rather than answered for another model."""
    if numerics not in BF16_NUMERICS:
        return
    if weights.source_format != "packed":
        raise RefBitNetError(f"numerics={numerics!r}: follows a packed checkpoint (uint8 + weight_scale); "
                             f"these weights are {weights.source_format!r}, which transformers quantizes online "
                             f"from the master weights (use numerics='fake-quant' or 'int')")
    want = "transformers-bf16" if weights.scale_convention == "multiply" else "transformers-legacy-bf16"
    if numerics != want:
        cls = "AutoBitLinear" if want == "transformers-bf16" else "the legacy BitLinear"
        raise RefBitNetError(f"numerics={numerics!r}: this checkpoint's weight_scale convention is "
                             f"{weights.scale_convention!r}, which transformers runs with {cls}; "
                             f"use numerics={want!r}")


def _choose_backend(backend: str, numerics: str, config: Config) -> str:
    """The path that runs: "numba" or "numpy" (see the module docstring)."""
    if backend == "numpy":
        return "numpy"
    if numerics != "int":
        if backend == "numba":
            raise RefBitNetError(f"numerics={numerics!r} runs on backend='numpy' only; the Numba kernels "
                                 f"compute the integer form (numerics='int')")
        return "numpy"
    if importlib.util.find_spec("numba") is None:       # the one cheap fallback: Numba not installed
        if backend == "numba":
            raise RefBitNetError("backend='numba': the numba package is not installed (pip install numba); "
                                 "use backend='numpy'")
        warnings.warn("refbitnet: numba is not installed; running the readable NumPy path (slow; "
                      "pass backend='numpy' to choose it explicitly)", RuntimeWarning, stacklevel=3)
        return "numpy"
    from . import runtime
    if not runtime.kernels_fit(config):
        if backend == "numba":
            raise RefBitNetError(f"backend='numba': the kernels need every projection width (D, F, H*HD) to be a "
                                 f"positive multiple of 8 up to {runtime.MAX_K}, found D={config.hidden_size}, "
                                 f"F={config.intermediate_size}; use backend='numpy'")
        return "numpy"
    return "numba"
