"""Reference tensors for projects that are not Python: .safetensors files any language can read.

Two kinds of file (``python -m refbitnet.testing dump --help``):

- **activations** (``dump activations``): every trace tensor of refbitnet's forward pass over given token
  ids (names as ``trace_names``: "embed", "layers.{i}.q", ..., "logits"), plus each projection's integer
  intermediates "layers.{i}.{proj}.xq" int8 [S, K], ".s" float32 [S], ".acc" int32 [S, N], and "ids"
  int64 [S]. A kernel or runtime project compares its own tensors with these, layer by layer.
- **golden vectors** (``dump golden``): one BitLinear in a given layout and shape: "packed" (the weight's
  bytes exactly as that layout stores them), "codes" int8 [N, K], "weight_scale" float32 [1] (the scale
  y uses: for TQ1_0/TQ2_0 the fp16 value the blocks store), "x" float32 [T, K], "xq" int8 [T, K],
  "s" float32 [T], "acc" int32 [T, N], "y" float32 [T, N]. The activations include the hard cases: an
  exact .5 tie after scaling, an outlier channel, an all-zero row.

The safetensors metadata (strings) records what was dumped: the layout, N, K, the numerics, refbitnet's
version, and for activations the model's source and config. examples/c_golden/ reads golden vectors
from C and checks a naive int8 x ternary kernel against them bit for bit.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import RefBitNetError
from ..quant import as_numerics
from .layouts import LAYOUTS, decode, encode
from .reference import load_reference_model, reference_activations, reference_bitlinear

#: Each layout's shape constraint: (N multiple, K multiple).
LAYOUT_MULTIPLES = {"codes": (1, 1), "hf": (4, 1), "kernel": (1, 4), "i2_s": (1, 128), "tq2_0": (1, 256),
                    "tq1_0": (1, 256), "bitnet_gpu": (16, 32)}


def hard_activations(tokens: int, k: int, seed: int = 0) -> np.ndarray:
    """x float32 [tokens, K]: gaussian rows of different magnitudes, and, when tokens allows, row 1 with
    exact .5 ties after scaling (max 127, so s = 1 and x * s = x), row 2 with an outlier channel
    (1000x the rest), row 3 all zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 10, (tokens, 1))).astype(np.float32)
    if tokens > 1:
        x[1] = (rng.integers(-126, 126, k) + 0.5).astype(np.float32)
        x[1, 0] = 127
    if tokens > 2:
        x[2, k // 2] = 1000 * np.abs(x[2]).max()
    if tokens > 3:
        x[3] = 0
    return x


def golden_vectors(layout: str, n: int, k: int, *, tokens: int = 4, seed: int = 0, numerics=None,
                   x=None, codes=None, weight_scale=None) -> dict[str, np.ndarray]:
    """Golden vectors of one BitLinear (see the module docstring for names, dtypes and shapes).

    Weights: ternary codes drawn with P(0) = 1/2 and a scale drawn from [0.01, 2), unless codes /
    weight_scale are given; activations: ``hard_activations(tokens, k, seed)`` unless x is given.
    numerics: a NUMERICS preset name or Numerics (refbitnet's own by default)."""
    if layout not in LAYOUTS:
        raise RefBitNetError(f"layout: expected one of {LAYOUTS}, found {layout!r}")
    nm, km = LAYOUT_MULTIPLES[layout]
    if n <= 0 or k <= 0 or n % nm or k % km:
        raise RefBitNetError(f"shape: layout {layout!r} expected N > 0 divisible by {nm} and K > 0 divisible "
                             f"by {km}, found N={n}, K={k}")
    rng = np.random.default_rng(seed + 1)
    if codes is None:
        codes = rng.choice(np.array([-1, 0, 0, 1], np.int8), size=(n, k))
    if weight_scale is None:
        weight_scale = np.float32(rng.uniform(0.01, 2.0))
    x = hard_activations(tokens, k, seed) if x is None else np.asarray(x, dtype=np.float32)
    packed = encode(codes, layout, scale=weight_scale)
    _, stored = decode(packed, layout, shape=(n, k))
    scale = np.float32(weight_scale if stored is None else stored)
    out = reference_bitlinear(x, packed, layout, shape=(n, k), weight_scale=scale,
                              numerics=as_numerics(numerics))
    return {"packed": np.ascontiguousarray(packed), "codes": np.asarray(codes, np.int8),
            "weight_scale": np.array([scale], np.float32), "x": x, "xq": out.xq, "s": out.s,
            "acc": out.acc, "y": out.y}


def _numerics_name(numerics) -> str:
    num = as_numerics(numerics)
    from ..quant import NUMERICS
    return next((name for name, value in NUMERICS.items() if value == num), repr(num))


def write_tensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write {name: array} to a .safetensors file with string metadata (the safetensors package)."""
    from safetensors.numpy import save_file
    save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def dump_golden(path, layout: str, n: int, k: int, *, tokens: int = 4, seed: int = 0, numerics=None) -> dict:
    """golden_vectors(...) written to path; returns the tensors."""
    from .. import __version__
    g = golden_vectors(layout, n, k, tokens=tokens, seed=seed, numerics=numerics)
    write_tensors(path, g, {"kind": "golden", "layout": layout, "n": n, "k": k, "tokens": tokens, "seed": seed,
                            "numerics": _numerics_name(numerics), "refbitnet": __version__})
    return g


def dump_activations(path, model, ids, *, integers: bool = True) -> dict:
    """reference_activations(model, ids, integers=...) and "ids" written to path; returns the tensors.
    model: a refbitnet Model, a checkpoint directory or a .gguf file (None: the default model)."""
    from .. import __version__
    from .reference import _is_model
    source = "refbitnet Model" if _is_model(model) else ("the shipped model" if model is None else str(model))
    if not _is_model(model):
        model = load_reference_model(model)
    ids = np.asarray(ids, dtype=np.int64)
    trace = reference_activations(model, ids, integers=integers)
    tensors = {"ids": ids, **trace}
    config = getattr(model, "config", None)
    meta = {"kind": "activations", "source": source, "numerics": getattr(model, "numerics", "int"),
            "refbitnet": __version__}
    if config is not None and hasattr(config, "to_dict"):
        meta["config"] = json.dumps(config.to_dict())
    write_tensors(path, tensors, meta)
    return tensors

