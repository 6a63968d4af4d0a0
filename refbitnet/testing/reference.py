"""The reference answers: one BitLinear in any layout and numerics, and every intermediate of a forward pass.

Everything takes NumPy arrays or torch tensors (see ``arrays.as_array``) and returns NumPy arrays.
"""

from __future__ import annotations


import numpy as np

from ..bitlinear import BitLinearOutput, bitlinear_fake_quant, bitlinear_int
from ..errors import RefBitNetError
from ..quant import NUMERICS, Numerics, absmax_int8, absmean_ternary, as_numerics
from .arrays import as_array, as_float_array
from .layouts import decode

#: Per-layer intermediates recorded by Model.forward(trace=...), in forward order; the full name is
#: f"layers.{i}.{tensor}". Shapes (S tokens): q [S, H, HD], k and v [S, KVH, HD] (q, k after RoPE),
#: gate, up, ffn_act, ffn_sub_norm [S, F]; all others [S, D]. Outside the layers: "embed" [S, D]
#: first, then "norm" [S, D] and "logits" [S, V] last.
TRACE_TENSORS = ("input_layernorm", "q", "k", "v", "attn", "attn_sub_norm", "o_proj", "resid_attn",
                 "post_attention_layernorm", "gate", "up", "ffn_act", "ffn_sub_norm", "down_proj", "out")

#: Each projection and the trace tensor that is its input (what its activation quantizer sees).
PROJECTION_INPUTS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                     "o_proj": "attn_sub_norm", "gate_proj": "post_attention_layernorm",
                     "up_proj": "post_attention_layernorm", "down_proj": "ffn_sub_norm"}

#: The integer intermediates of each projection: f"layers.{i}.{proj}.{part}", xq int8 [S, K],
#: s float32 [S], acc int32 [S, N].
INTEGER_PARTS = ("xq", "s", "acc")


def quantize_weights(w, numerics=None):
    """w float [N, K] (array or tensor) -> (codes int8 [N, K], gamma float32): refbitnet.quant.absmean_ternary."""
    return absmean_ternary(as_float_array(w, "w"), numerics)


def quantize_activations(x, numerics=None):
    """x float [..., K] (array or tensor) -> (xq int8 [..., K], s float32 [...]): refbitnet.quant.absmax_int8."""
    return absmax_int8(as_float_array(x, "x"), numerics)


def _form_and_rules(numerics, form):
    """numerics="int"/"fake-quant" is the form (refbitnet's first API); a preset name or Numerics the rules."""
    if isinstance(numerics, str) and numerics in ("int", "fake-quant"):
        if form is not None and form != numerics:
            raise RefBitNetError(f"form: expected {numerics!r} to agree with numerics={numerics!r}, "
                                 f"found {form!r}")
        return numerics, None
    form = "int" if form is None else form
    if form not in ("int", "fake-quant"):
        raise RefBitNetError(f"form: expected 'int' or 'fake-quant', found {form!r}")
    if not isinstance(numerics, Numerics) and numerics not in NUMERICS:
        raise RefBitNetError(f"numerics: expected 'int', 'fake-quant', one of {tuple(NUMERICS)} or a "
                             f"refbitnet.quant.Numerics, found {numerics!r:.60}")
    return form, as_numerics(numerics)


def reference_bitlinear(x, weight, layout: str = "codes", *, weight_scale=None, shape=None,
                        numerics="int", form: str | None = None) -> BitLinearOutput:
    """The reference BitLinear y = x W^T for a weight in any layout.

    x: float [..., K]; weight: the tensor in ``layout`` (see LAYOUTS); shape (N, K) for GGUF layouts;
    weight_scale: required for "codes", "hf", "kernel"; for GGUF layouts it overrides the stored scale.
    Each may be a NumPy array or a torch tensor (any device, bf16 included).
    Returns BitLinearOutput(y float32 [..., N], acc int32 [..., N], xq int8 [..., K], s float32 [...]).

    form "int" (default): y = (acc / s) * weight_scale exactly as refbitnet computes it (bit-reproducible).
    form "fake-quant": y = ((xq / s) @ codes.T) * weight_scale in float32 (AutoBitLinear's form);
    acc, xq, s are the same in both.
    numerics: the rounding rules, a preset name of refbitnet.quant.NUMERICS ("torch", "ieee",
    "transformers-bf16", "onebitllms", "bitnet-gpu", ...) or a refbitnet.quant.Numerics; for
    compatibility "int" and "fake-quant" here name the form with refbitnet's own rules.
    """
    form, rules = _form_and_rules(numerics, form)
    x = as_float_array(x, "x")
    codes, stored = decode(weight, layout, shape)
    scale = as_array(weight_scale, "weight_scale") if weight_scale is not None else stored
    if scale is None:
        raise RefBitNetError(f"weight_scale: layout {layout!r} does not store the scale; pass weight_scale=")
    out = bitlinear_int(x, codes, scale, rules)
    if form == "fake-quant":
        out = out._replace(y=bitlinear_fake_quant(x, codes, scale, rules))
    return out


def load_reference_model(source, *, numerics: str = "int", backend: str = "numpy"):
    """A refbitnet Model from a checkpoint directory, a ``.gguf`` file (I2_S, TQ1_0, TQ2_0), or None for
    the model refbitnet.load() finds by default. Load once (e.g. a session-scoped pytest fixture, see
    the ``refbitnet_model`` fixture of the pytest plugin) and pass the Model to reference_activations."""
    from ..loading import load                 # a directory, a .gguf file, a hub id, or the shipped model
    return load(source, numerics=numerics, backend=backend)


def _is_model(model) -> bool:
    from ..api import Model
    return isinstance(model, Model)


def reference_activations(model, ids, *, numerics: str = "int",
                          integers: bool = False) -> dict[str, np.ndarray]:
    """Every named intermediate of refbitnet's forward pass over token ids [S] (positions 0..S-1).

    model: a refbitnet Model (its own numerics apply), or a checkpoint directory / GGUF path, loaded
    with load_reference_model(model, numerics=numerics) -- load once and pass the Model when calling
    this repeatedly. ids: a 1-D int array, list or torch tensor.
    Returns {name: array} in forward order: "embed", "layers.{i}.{t}" for t in TRACE_TENSORS,
    "norm", "logits" [S, V] (float32). integers=True adds each projection's integer intermediates
    "layers.{i}.{proj}.xq" int8 [S, K], ".s" float32 [S], ".acc" int32 [S, N] (numerics "int" only).
    """
    if not _is_model(model):
        model = load_reference_model(model, numerics=numerics)
    ids = np.asarray(as_array(ids, "ids"))
    trace: dict[str, np.ndarray] = {}
    if not integers:
        model.forward(ids, trace=trace)
        return trace
    model.forward(ids, trace=trace, trace_integers=True)      # recorded by the path that runs
    return trace


def trace_names(num_layers: int, integers: bool = False) -> list[str]:
    """All names reference_activations returns for a model with num_layers layers (forward order when
    integers is False; with integers, each layer's projection parts follow its float tensors)."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{t}" for t in TRACE_TENSORS]
        if integers:
            names += [f"layers.{i}.{p}.{part}" for p in PROJECTION_INPUTS for part in INTEGER_PARTS]
    return names + ["norm", "logits"]
