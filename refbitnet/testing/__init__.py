"""refbitnet as an oracle: a small, stable API for other projects' test suites.

Kernels, converters and runtimes for BitNet b1.58 check their numbers against this module:

- **layouts** -- ``encode(codes, layout, scale)`` / ``decode(data, layout, shape)`` for every packed
  layout of SPEC §4-§5 ("codes", "hf", "kernel", "i2_s", "tq2_0", "tq1_0", "bitnet_gpu"), plus the
  ``pack_*`` / ``unpack_*`` pairs of :mod:`refbitnet.layouts` re-exported as they are, and
  ``pack_bitnet_gpu`` / ``unpack_bitnet_gpu`` (microsoft/BitNet's GPU kernel format) defined here.
- **BitLinear** -- ``reference_bitlinear(x, weight, layout, ...)`` returns the output ``y`` and the
  exact integer intermediates: ``acc`` (int32 accumulators), ``xq`` (int8 activations) and ``s``
  (per-token activation scales), so a kernel can be checked bit for bit on the integer part.
- **activations** -- ``reference_activations(model_or_path, ids)``: every named intermediate of the
  forward pass (norms, q/k/v after RoPE, attention, SubLN outputs, FFN, residuals, logits; see
  ``TRACE_TENSORS``) for a checkpoint directory, a GGUF file (bitnet.cpp I2_S or llama.cpp TQ1_0/TQ2_0)
  or a loaded Model.
- **comparison** -- ``compare_activations(reference, candidate)`` checks tensors in forward order and
  reports the FIRST layer and tensor where the candidate diverges, printing one llm.c-style line per
  tensor (``TENSOR OK, maxdiff = 3.0e-07  layers.0.q``); ``assert_activations_match`` raises an
  AssertionError naming that tensor.

Numerics: everything here uses refbitnet's integer form unless told otherwise (int8 activations x
ternary codes summed exactly in int32, then ``acc / s * weight_scale`` in float32). That is what
bitnet.cpp and integer kernels compute; transformers' AutoBitLinear computes the fake-quant form
(``numerics="fake-quant"``). The two agree up to float rounding, which can flip an int8 activation
code at the next quantizer; compare an implementation against the numerics it claims.

Stability: the names exported in ``__all__`` keep their signatures; new keyword arguments may be added.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .bitlinear import BitLinearOutput, bitlinear_fake_quant, bitlinear_int
from .errors import RefBitNetError
from .layouts import (pack_hf, pack_i2s, pack_kernel, pack_tq1_0, pack_tq2_0, unpack_hf, unpack_i2s,
                      unpack_kernel, unpack_tq1_0, unpack_tq2_0)
from .quant import absmax_int8, absmean_ternary

__all__ = [
    "LAYOUTS", "TRACE_TENSORS", "encode", "decode", "reference_bitlinear", "BitLinearOutput",
    "quantize_weights", "quantize_activations", "load_reference_model", "reference_activations",
    "trace_names", "TensorCheck", "Report", "compare_tensor", "compare_activations",
    "assert_activations_match",
    "pack_hf", "unpack_hf", "pack_kernel", "unpack_kernel", "pack_i2s", "unpack_i2s",
    "pack_tq2_0", "unpack_tq2_0", "pack_tq1_0", "unpack_tq1_0", "pack_bitnet_gpu", "unpack_bitnet_gpu",
]

#: Layout names accepted by encode / decode / reference_bitlinear.
#:   "codes"  int8 [N, K] in {-1, 0, 1}, no packing (scale passed separately)
#:   "hf"     uint8 [N/4, K], the released model.safetensors (scale = the weight_scale tensor)
#:   "kernel" uint8 [N, K/4], row-major 4 codes per byte (refbitnet's Numba kernels)
#:   "i2_s"   bitnet.cpp GGUF type 36: N*K/4 code bytes + 32 bytes holding one float32 scale
#:   "tq2_0"  llama.cpp GGUF type 35: 66 bytes per 256 elements (fp16 scale per block)
#:   "tq1_0"  llama.cpp GGUF type 34: 54 bytes per 256 elements (fp16 scale per block)
#:   "bitnet_gpu" int8 [N, K/4], microsoft/BitNet's GPU kernel format (see pack_bitnet_gpu)
LAYOUTS = ("codes", "hf", "kernel", "i2_s", "tq2_0", "tq1_0", "bitnet_gpu")

#: Per-layer intermediates recorded by Model.forward(trace=...), in forward order; the full name is
#: f"layers.{i}.{tensor}". Shapes (S tokens): q [S, H, HD], k and v [S, KVH, HD] (q, k after RoPE),
#: gate, up, ffn_act, ffn_sub_norm [S, F]; all others [S, D]. Outside the layers: "embed" [S, D]
#: first, then "norm" [S, D] and "logits" [S, V] last.
TRACE_TENSORS = ("input_layernorm", "q", "k", "v", "attn", "attn_sub_norm", "o_proj", "resid_attn",
                 "post_attention_layernorm", "gate", "up", "ffn_act", "ffn_sub_norm", "down_proj", "out")

quantize_weights = absmean_ternary          # w float [N, K] -> (codes int8, gamma float32)
quantize_activations = absmax_int8          # x float [..., K] -> (xq int8 [..., K], s float32 [...])


# ====================================================================================== layouts
def encode(codes: np.ndarray, layout: str, scale=None) -> np.ndarray:
    """Ternary codes int8 [N, K] -> the bytes of ``layout``. "i2_s", "tq2_0", "tq1_0" embed the scale
    (required); "codes", "hf", "kernel" do not (scale is ignored)."""
    _check_layout(layout)
    if layout in ("i2_s", "tq2_0", "tq1_0"):
        if scale is None:
            raise RefBitNetError(f"scale: layout {layout!r} stores the weight scale; pass scale=")
        return {"i2_s": pack_i2s, "tq2_0": pack_tq2_0, "tq1_0": pack_tq1_0}[layout](codes, scale)
    if layout == "hf":
        return pack_hf(codes)
    if layout == "kernel":
        return pack_kernel(codes)
    if layout == "bitnet_gpu":
        return pack_bitnet_gpu(codes)
    from .quant import check_ternary_codes
    return check_ternary_codes(codes).copy()


def decode(data: np.ndarray, layout: str, shape=None):
    """Bytes of ``layout`` -> (codes int8 [N, K], scale float32 or None).

    shape (N, K) is required for the 1-D GGUF layouts. The scale is None for layouts that do not
    store one. For TQ1_0/TQ2_0 it is the per-tensor scale: the fp16 block scale shared by every block
    holding a nonzero code (a file whose blocks disagree is not BitNet b1.58 and raises); the raw
    per-block scales are available from ``unpack_tq2_0`` / ``unpack_tq1_0``.
    """
    _check_layout(layout)
    if layout in ("i2_s", "tq2_0", "tq1_0"):
        if shape is None:
            raise RefBitNetError(f"shape: layout {layout!r} is a flat byte string; pass shape=(N, K)")
        if layout == "i2_s":
            return unpack_i2s(data, shape)
        from .gguf.mapping import per_tensor_scale as _per_tensor_scale
        codes, d = (unpack_tq2_0 if layout == "tq2_0" else unpack_tq1_0)(data, shape)
        return codes, _per_tensor_scale(codes, d, f"data ({layout})")
    if layout == "hf":
        return unpack_hf(data), None
    if layout == "kernel":
        return unpack_kernel(data), None
    if layout == "bitnet_gpu":
        return unpack_bitnet_gpu(data), None
    from .quant import check_ternary_codes
    return check_ternary_codes(data, "data"), None


# ---- microsoft/BitNet's GPU format (gpu/pack_weight.py: convert_weight_int8_to_int2) ----------------
_GPU_TILE_N, _GPU_TILE_K = 16, 32


def _gpu_tile_map():
    """Where element (ii, jj) of a 16x32 permuted tile comes from in the source tile: (row, col) [16, 32]."""
    ii, jj = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    thread = ii * 2 + jj // 16
    return (thread // 16) * 8 + thread % 8, jj % 16 + 16 * ((thread % 16) // 8)


# Within each little-endian int32 (16 codes), code number `offset` (0..15, at bits 2*offset after the
# 4-per-byte compression) moves to bit (offset % 4) * 8 + (offset // 4) * 2.
_GPU_SHIFTS = np.array([(o % 4) * 8 + (o // 4) * 2 for o in range(16)], dtype=np.uint32)


def pack_bitnet_gpu(codes: np.ndarray) -> np.ndarray:
    """Ternary codes int8 [N, K] -> microsoft/BitNet's GPU weight format, int8 [N, K/4] (N % 16 == 0,
    K % 32 == 0). Three steps, as ``gpu/pack_weight.py`` does them:

    1. c = codes + 2 (so -1, 0, +1 -> 1, 2, 3; not + 1 as in every other layout);
    2. each 16x32 tile is permuted for the kernel's shared-memory loads: element (ii, jj) of the new
       tile is source element (row, col) with t = 2*ii + jj // 16, row = (t // 16)*8 + t % 8,
       col = jj % 16 + 16*((t % 16) // 8); tiles are stored [N/16, K/32, 16, 32];
    3. four consecutive codes per byte (bits 2k), then within each little-endian int32 the 16 codes
       are interleaved: code o moves to bit (o % 4)*8 + (o // 4)*2.

    The decode kernel computes int8 activations x (c - 2) exactly, then acc / s * weight_scale.
    """
    from .layouts import _codes_2d
    codes = _codes_2d(codes, n_multiple=_GPU_TILE_N, k_multiple=_GPU_TILE_K, what="BitNet GPU layout: ")
    n, k = codes.shape
    rows, cols = _gpu_tile_map()                                                     # [16, 32] each
    c = (codes + np.int8(2)).astype(np.uint32)                                       # [N, K] in {1, 2, 3}
    tiles = c.reshape(n // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)                # [N/16, K/32, 16, 32]
    permuted = tiles[:, :, rows, cols]                                               # [N/16, K/32, 16, 32]
    words = permuted.reshape(-1, 16)                                                 # 16 codes per int32
    packed = np.bitwise_or.reduce(words << _GPU_SHIFTS, axis=1).astype("<u4")       # [N*K/16]
    return packed.view(np.int8).reshape(n, k // 4)


def unpack_bitnet_gpu(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_bitnet_gpu: int8 (or uint8) [N, K/4] -> ternary codes int8 [N, K]. A 2-bit field
    equal to 0 (which would decode to -2) raises."""
    if not isinstance(packed, np.ndarray) or packed.dtype not in (np.int8, np.uint8) or packed.ndim != 2:
        raise RefBitNetError(f"packed: expected an int8 array [N, K/4], found "
                             f"{getattr(packed, 'dtype', type(packed).__name__)} {getattr(packed, 'shape', '')}")
    n, k = packed.shape[0], packed.shape[1] * 4
    if n % _GPU_TILE_N or k % _GPU_TILE_K:
        raise RefBitNetError(f"packed: BitNet GPU layout: expected N % 16 == 0 and K % 32 == 0, found N={n}, K={k}")
    words = np.ascontiguousarray(packed).view("<u4").reshape(-1, 1)                  # [N*K/16, 1]
    c = ((words >> _GPU_SHIFTS) & np.uint32(3)).astype(np.int8)                      # [N*K/16, 16]
    if (c == 0).any():
        where = int(np.argwhere((c == 0).any(axis=1))[0][0])
        raise RefBitNetError(f"packed: BitNet GPU layout: expected codes 1, 2, 3 (-1, 0, +1 plus 2), found a "
                             f"field equal to 0 in int32 word {where}")
    permuted = c.reshape(n // 16, k // 32, 16, 32)
    rows, cols = _gpu_tile_map()
    tiles = np.empty_like(permuted)
    tiles[:, :, rows, cols] = permuted
    return (tiles.transpose(0, 2, 1, 3).reshape(n, k) - np.int8(2)).astype(np.int8)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise RefBitNetError(f"layout: expected one of {LAYOUTS}, found {layout!r}")


# ====================================================================================== BitLinear
def reference_bitlinear(x: np.ndarray, weight: np.ndarray, layout: str = "codes", *, weight_scale=None,
                        shape=None, numerics: str = "int") -> BitLinearOutput:
    """The reference BitLinear y = x W^T for a weight in any layout.

    x: float [..., K]; weight: the tensor in ``layout`` (see LAYOUTS); shape (N, K) for GGUF layouts;
    weight_scale: required for "codes", "hf", "kernel"; for GGUF layouts it overrides the stored scale.
    Returns BitLinearOutput(y float32 [..., N], acc int32 [..., N], xq int8 [..., K], s float32 [...]).
    numerics="int": y = (acc / s) * weight_scale exactly as refbitnet computes it (bit-reproducible).
    numerics="fake-quant": y = ((xq / s) @ codes.T) * weight_scale in float32 (AutoBitLinear's form);
    acc, xq, s are the same in both.
    """
    if numerics not in ("int", "fake-quant"):
        raise RefBitNetError(f"numerics: expected 'int' or 'fake-quant', found {numerics!r}")
    codes, stored = decode(weight, layout, shape)
    scale = weight_scale if weight_scale is not None else stored
    if scale is None:
        raise RefBitNetError(f"weight_scale: layout {layout!r} does not store the scale; pass weight_scale=")
    out = bitlinear_int(x, codes, scale)
    if numerics == "fake-quant":
        out = out._replace(y=bitlinear_fake_quant(x, codes, scale))
    return out


# ====================================================================================== activations
def load_reference_model(source, *, numerics: str = "int", backend: str = "numpy"):
    """A refbitnet Model from a checkpoint directory, a ``.gguf`` file (I2_S, TQ1_0, TQ2_0), or None for
    the model refbitnet.load() finds by default. Load once (e.g. a session-scoped pytest fixture) and
    pass the Model to reference_activations."""
    if source is not None and (os.path.isfile(os.fspath(source)) or os.fspath(source).endswith(".gguf")):
        from .gguf import load_gguf
        return load_gguf(source, numerics=numerics, backend=backend)
    import refbitnet
    return refbitnet.load(source, numerics=numerics, backend=backend)


def reference_activations(model, ids, *, numerics: str = "int") -> dict[str, np.ndarray]:
    """Every named intermediate of refbitnet's forward pass over token ids [S] (positions 0..S-1).

    model: a refbitnet Model (its own numerics apply), or a checkpoint directory / GGUF path, loaded
    with load_reference_model(model, numerics=numerics) -- load once and pass the Model when calling
    this repeatedly.
    Returns {name: float32 array} in forward order: "embed", "layers.{i}.{t}" for t in TRACE_TENSORS,
    "norm", "logits" [S, V].
    """
    from .model import Model
    if not isinstance(model, Model):
        model = load_reference_model(model, numerics=numerics)
    trace: dict[str, np.ndarray] = {}
    model.forward(np.asarray(ids), trace=trace)
    return trace


def trace_names(num_layers: int) -> list[str]:
    """All names reference_activations returns for a model with num_layers layers, in forward order."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{t}" for t in TRACE_TENSORS]
    return names + ["norm", "logits"]


# ====================================================================================== comparison
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorCheck:
    """The comparison of one named tensor: max |reference - candidate| and whether it is within
    tolerance (|c - r| <= atol + rtol * |r| everywhere, shapes equal, no NaN where the reference has none)."""
    name: str
    max_diff: float
    ok: bool
    detail: str = ""

    @property
    def layer(self) -> int | None:
        """The layer index for "layers.{i}.*" names, else None."""
        m = _LAYER_NAME.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def tensor(self) -> str:
        """The tensor name within its layer ("ffn_act" for "layers.3.ffn_act")."""
        m = _LAYER_NAME.match(self.name)
        return m.group(2) if m else self.name

    def line(self) -> str:
        status = "OK" if self.ok else "NOT OK"
        extra = f"  ({self.detail})" if self.detail else ""
        return f"TENSOR {status}, maxdiff = {self.max_diff:.3e}  {self.name}{extra}"


@dataclass
class Report:
    """The result of compare_activations: one TensorCheck per compared tensor, in forward order."""
    checks: list[TensorCheck]
    skipped: list[str] = field(default_factory=list)    # reference tensors the candidate did not give

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def first_divergence(self) -> TensorCheck | None:
        """The first tensor (in forward order) outside tolerance, or None if all agree."""
        return next((c for c in self.checks if not c.ok), None)

    def summary(self) -> str:
        first = self.first_divergence
        if first is None:
            return f"all {len(self.checks)} tensors OK"
        where = f"layer {first.layer}, tensor {first.tensor!r}" if first.layer is not None else \
            f"tensor {first.name!r}"
        return (f"first divergence at {where} ({first.name}): maxdiff = {first.max_diff:.3e}"
                + (f" ({first.detail})" if first.detail else ""))

    def __str__(self) -> str:
        return "\n".join([c.line() for c in self.checks] + [self.summary()])


def compare_tensor(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float = 1e-4,
                   rtol: float = 1e-3) -> TensorCheck:
    """Compare one tensor. A candidate of the same size but another shape (e.g. q as [S, H*HD]) is
    reshaped to the reference's shape; a different size is a divergence with maxdiff = inf."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    detail = ""
    if cand.shape != ref.shape:
        if cand.size != ref.size:
            return TensorCheck(name, float("inf"), False,
                               f"shape {list(cand.shape)}, expected {list(ref.shape)}")
        cand = cand.reshape(ref.shape)
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    nan_mismatch = np.isnan(c64) & ~np.isnan(r64)
    diff = np.abs(c64 - r64)
    diff = np.where(np.isnan(r64) & np.isnan(c64), 0.0, diff)
    max_diff = float(np.max(diff)) if diff.size else 0.0
    if nan_mismatch.any():
        where = tuple(int(i) for i in np.argwhere(nan_mismatch)[0])
        return TensorCheck(name, float("nan"), False, f"NaN at index {where}")
    bad = diff > atol + rtol * np.abs(r64)
    ok = not bad.any()
    if not ok:
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        detail = f"first at index {where}: reference {r64[where]:.6g}, candidate {c64[where]:.6g}"
    return TensorCheck(name, max_diff, ok, detail)


def compare_activations(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
                        atol: float = 1e-4, rtol: float = 1e-3, tolerances: Mapping[str, tuple] | None = None,
                        print_fn: Callable[[str], None] | None = print) -> Report:
    """Compare a candidate's intermediates with reference_activations' output, in forward order.

    candidate: {name: array} using refbitnet's names (see trace_names); it may give any subset (the
    rest are listed in Report.skipped); an unknown name raises (it is usually a typo).
    tolerances: per-tensor (atol, rtol) overrides keyed by full name ("logits") or in-layer name
    ("ffn_act"). print_fn: called with one "TENSOR OK, maxdiff = ..." line per tensor and a summary;
    None prints nothing. Returns a Report; ``report.first_divergence`` names the first bad tensor.

    Choosing tolerances: with the integer form on both sides, differences start at float32 rounding
    in norms, RoPE and softmax (~1e-6 relative); a rounding difference can move one int8 activation
    code by 1, which changes a BitLinear output by about weight_scale / s. A wrong op (SiLU for ReLU²,
    a divided scale, a misread layout) gives errors of the size of the values themselves, orders of
    magnitude above either.
    """
    unknown = [n for n in candidate if n not in reference]
    if unknown:
        raise RefBitNetError(f"candidate: unknown tensor name(s) {unknown[:5]}; expected names like "
                             f"{list(reference)[:4]} (see refbitnet.testing.trace_names)")
    tolerances = dict(tolerances or {})
    checks, skipped = [], []
    for name, ref in reference.items():
        if name not in candidate:
            skipped.append(name)
            continue
        m = _LAYER_NAME.match(name)
        a, r = tolerances.get(name, tolerances.get(m.group(2) if m else name, (atol, rtol)))
        check = compare_tensor(name, ref, candidate[name], atol=a, rtol=r)
        checks.append(check)
        if print_fn is not None:
            print_fn(check.line())
    report = Report(checks, skipped)
    if print_fn is not None:
        print_fn(report.summary())
    return report


def assert_activations_match(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                             **kwargs) -> Report:
    """compare_activations, then raise AssertionError naming the first divergent layer and tensor."""
    report = compare_activations(reference, candidate, **kwargs)
    if not report.ok:
        raise AssertionError(report.summary())
    if not report.checks:
        raise AssertionError("no tensor compared: the candidate gave none of the reference's names")
    return report
