"""Comparing a candidate's tensors with the reference: exact, in ulps, or to a tolerance; and why they differ.

Three modes for one tensor (``compare_tensor``):

- ``"exact"``: every element equal (NaN equal to NaN); counts the elements that differ and shows the
  first few with index, reference and candidate. The mode for integers (codes, accumulators) and for
  anything the integer form makes bit-reproducible (s, the epilogue's y).
- ``"ulp"``: the distance in units in the last place of the format (float32, bfloat16 or float16),
  max and count beyond ``ulps``. The mode for float code that computes the same ops in another order.
- ``"tol"``: |candidate - reference| <= atol + rtol * |reference|, with defaults tied to the format
  (below). The mode for whole-model comparisons between different implementations.

Shapes must match: a candidate of another shape raises (nothing is reshaped behind the caller's back).

Codes that differ by one where the reference sits on a rounding boundary are the expected result of a
float rounding difference upstream, not a bug: given the reference's quotient (x * s for int8
activation codes, w / gamma for ternary codes), a differing code is a *benign boundary flip* when it
is one apart and the quotient lies within ``within`` of the boundary (a .5 tie for int8, |q| = 0.5 for
ternary); every other difference is *real*. The check reports "N benign boundary flips, M real
differences" and passes when M = 0. ``compare_int8_codes`` / ``compare_ternary_codes`` compute the
reference and its quotient for you.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..bf16 import f32_to_bf16
from ..errors import RefBitNetError
from ..quant import absmax_int8, absmean_scale, as_numerics, bf16_values, ternary_codes
from .arrays import as_float_array, torch_dtype_name

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
MODES = ("tol", "exact", "ulp")
FORMATS = ("float32", "bfloat16", "float16")

#: Default relative tolerance of mode "tol" per format: 8 ulps of float32 (2**-20), 2 ulps of bf16
#: (2**-6), 2 ulps of float16 (2**-9). atol defaults to rtol * max|reference|, so elements near zero
#: are held to the tensor's scale rather than to their own. A candidate computing the same ops in
#: another order passes; a wrong op, scale or layout fails by orders of magnitude.
DEFAULT_RTOL = {"float32": 2.0 ** -20, "bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}

#: Default distance from the boundary within which a code one apart is a benign flip, in units of the
#: quotient (codes): 2**-10. float32 implementations that differ in s by an ulp or two, or sum x in
#: another order, move x * s by about 1e-5 at |x * s| = 127; bf16 implementations move it by up to
#: 0.5 and need within=0.5 (then every one-apart code counts as benign; say so in your test).
DEFAULT_WITHIN = 2.0 ** -10


@dataclass(frozen=True)
class TensorCheck:
    """The comparison of one named tensor.

    ok: the tensor passes in its mode. max_diff: max |reference - candidate|. n_differ: elements not
    exactly equal, of n_total. max_ulp / n_beyond_ulp: in mode "ulp". mismatches: the first few failing
    elements as (index, reference, candidate). benign / real: counts of classified code differences
    (None when no quotient was given)."""
    name: str
    max_diff: float
    ok: bool
    detail: str = ""
    mode: str = "tol"
    n_differ: int = 0
    n_total: int = 0
    max_ulp: int | None = None
    n_beyond_ulp: int | None = None
    mismatches: tuple = ()
    benign: int | None = None
    real: int | None = None

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

    def __str__(self) -> str:
        return self.line()


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


# ====================================================================================== one tensor
def _format_of(reference, candidate, ref, cand, fmt):
    if fmt is not None:
        if fmt not in FORMATS:
            raise RefBitNetError(f"dtype: expected one of {FORMATS}, found {fmt!r}")
        return fmt
    names = [torch_dtype_name(reference), torch_dtype_name(candidate), str(ref.dtype), str(cand.dtype)]
    for f in ("bfloat16", "float16"):
        if f in names[:2] or (f == "float16" and "float16" in names[2:] and "float32" not in names[2:]):
            return f
    return "float32"


def ulp_distance(a, b, dtype: str = "float32") -> np.ndarray:
    """|a - b| in units in the last place of dtype ("float32", "bfloat16", "float16"), as int64.

    a, b are rounded to dtype first (exact if they already are values of it). Ordered integer
    encodings: +0 and -0 are 0 apart, adjacent values 1 apart across zero too; NaN gives a huge value."""
    a32 = np.asarray(a, dtype=np.float32)
    b32 = np.asarray(b, dtype=np.float32)
    if dtype == "float32":
        ia, ib, sign = a32.view(np.int32).astype(np.int64), b32.view(np.int32).astype(np.int64), 1 << 31
    elif dtype == "bfloat16":
        ia = f32_to_bf16(a32).astype(np.int64).reshape(a32.shape)
        ib = f32_to_bf16(b32).astype(np.int64).reshape(b32.shape)
        sign = 1 << 15
    else:
        ia = a32.astype(np.float16).view(np.uint16).astype(np.int64)
        ib = b32.astype(np.float16).view(np.uint16).astype(np.int64)
        sign = 1 << 15
    if dtype == "float32":
        ia, ib = ia & 0xFFFFFFFF, ib & 0xFFFFFFFF
    oa = np.where(ia >= sign, sign - ia, ia)                                # sign-magnitude -> ordered
    ob = np.where(ib >= sign, sign - ib, ib)
    return np.abs(oa - ob)


def boundary_distance(quotient, codes: str) -> np.ndarray:
    """How far each quotient is from the rounding boundary of its code: for "int8", |frac(q) - 0.5|
    (0 at a .5 tie); for "ternary", ||q| - 0.5| (0 at the 0.5 * gamma threshold)."""
    q = np.asarray(quotient, dtype=np.float64)
    if codes == "int8":
        return np.abs(q - np.floor(q) - 0.5)
    if codes == "ternary":
        return np.abs(np.abs(q) - 0.5)
    raise RefBitNetError(f"codes: expected 'int8' or 'ternary', found {codes!r}")


def compare_tensor(name: str, reference, candidate, *, mode: str | None = None, atol: float | None = None,
                   rtol: float | None = None, ulps: int = 0, dtype: str | None = None, show: int = 5,
                   quotient=None, codes: str | None = None, within: float | None = None) -> TensorCheck:
    """Compare one tensor of the candidate with the reference (NumPy arrays or torch tensors).

    mode: "exact", "ulp" (pass when no element is more than ``ulps`` apart in ``dtype``) or "tol"
    (|c - r| <= atol + rtol * |r|). Default: "exact" for integer references, "tol" otherwise; atol /
    rtol default to DEFAULT_RTOL of the format and rtol * max|reference|. dtype: the float format of
    ulps and default tolerances, "float32", "bfloat16" or "float16"; default: bf16 or float16 when
    either side is such a torch tensor (or float16 array), else float32.
    quotient (with codes "int8" or "ternary"): the reference's value before rounding, same shape;
    differing codes are then classified as benign boundary flips or real differences (see the module
    docstring) and the check passes when there is no real difference. show: how many failing elements
    the detail and ``mismatches`` list. A shape mismatch raises RefBitNetError.
    """
    ref = as_float_array(reference, "reference")
    cand = as_float_array(candidate, "candidate")
    if cand.shape != ref.shape:
        raise RefBitNetError(f"{name}: expected the candidate's shape {list(ref.shape)} (the reference's), found "
                             f"{list(cand.shape)}; compare_tensor never reshapes: reshape or slice it yourself")
    fmt = _format_of(reference, candidate, ref, cand, dtype)
    if mode is None:
        mode = "exact" if ref.dtype.kind in "iu" or (atol == 0 and rtol == 0) else "tol"
    if mode not in MODES:
        raise RefBitNetError(f"mode: expected one of {MODES}, found {mode!r}")
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    both_nan = np.isnan(r64) & np.isnan(c64)
    differ = ~((r64 == c64) | both_nan)
    diff = np.where(both_nan, 0.0, np.abs(c64 - r64))
    finite = diff[~np.isnan(diff)]
    max_diff = float(finite.max()) if finite.size else 0.0
    if np.isnan(diff).any():
        max_diff = float("nan")
    extra: dict = {}
    if mode == "exact":
        bad = differ
    elif mode == "ulp":
        dist = np.where(both_nan, 0, ulp_distance(ref, cand, fmt))
        dist = np.where(np.isnan(r64) ^ np.isnan(c64), np.iinfo(np.int64).max, dist)
        bad = dist > ulps
        extra = dict(max_ulp=int(dist.max()) if dist.size else 0, n_beyond_ulp=int(bad.sum()))
    else:
        rt = DEFAULT_RTOL[fmt] if rtol is None else float(rtol)
        finite_ref = np.abs(r64[np.isfinite(r64)])
        at = (rt * float(finite_ref.max()) if finite_ref.size else 0.0) if atol is None else float(atol)
        bad = (diff > at + rt * np.abs(r64)) | (np.isnan(c64) & ~np.isnan(r64))
    benign = real = None
    if quotient is not None:
        q = as_float_array(quotient, "quotient")
        if q.shape != ref.shape:
            raise RefBitNetError(f"quotient: expected the reference's shape {list(ref.shape)}, "
                                 f"found {list(q.shape)}")
        if codes is None:
            raise RefBitNetError("codes: expected 'int8' or 'ternary' with quotient=")
        w = DEFAULT_WITHIN if within is None else float(within)
        flip = differ & (diff == 1) & (boundary_distance(q, codes) <= w)
        benign, real = int(flip.sum()), int((differ & ~flip).sum())
        bad = differ & ~flip
    n_bad = int(bad.sum())
    idx = np.argwhere(bad)[:show]
    mism = tuple((tuple(int(i) for i in ix), float(r64[tuple(ix)]), float(c64[tuple(ix)])) for ix in idx)
    parts = []
    if benign is not None:
        parts.append(f"{benign} benign boundary flips, {real} real differences")
    if mode == "ulp":
        parts.append(f"max {extra['max_ulp']} ulp ({fmt}), {extra['n_beyond_ulp']} beyond {ulps}")
    if n_bad:
        first = "first " + ", ".join(f"at {ix}: reference {r:.9g}, candidate {c:.9g}" for ix, r, c in mism)
        if benign is not None:
            parts.append(first)
        else:
            parts.append(f"{n_bad} of {ref.size} {'differ' if mode == 'exact' else 'outside tolerance'}; {first}")
    elif mode != "exact" and differ.any() and benign is None:
        parts.append(f"{int(differ.sum())} of {ref.size} not bit-equal")
    return TensorCheck(name, max_diff, n_bad == 0, "; ".join(parts), mode, int(differ.sum()), int(ref.size),
                       mismatches=mism, benign=benign, real=real, **extra)


def compare_int8_codes(name: str, x, candidate_xq, *, numerics=None, within: float | None = None,
                       show: int = 5) -> TensorCheck:
    """A candidate's int8 activation codes [..., K] against refbitnet's absmax_int8(x, numerics), exactly,
    each difference classified: benign when one apart with x * s within ``within`` of a .5 tie."""
    x = as_float_array(x, "x")
    xq, s = absmax_int8(x, numerics)
    num = as_numerics(numerics)
    x32 = bf16_values(x.astype(np.float32)) if num.dtype == "bfloat16" else x.astype(np.float32)
    quotient = x32 * s[..., None]                                           # [..., K], before rounding
    return compare_tensor(name, xq, candidate_xq, mode="exact", quotient=quotient, codes="int8",
                          within=within, show=show)


def compare_ternary_codes(name: str, w, candidate_codes, *, gamma=None, numerics=None,
                          within: float | None = None, show: int = 5) -> TensorCheck:
    """A candidate's ternary codes [N, K] against refbitnet's ternary_codes(w, gamma) (gamma: refbitnet's
    absmean_scale(w) unless given), exactly, each difference classified: benign when one apart with
    w / gamma within ``within`` of the 0.5 threshold."""
    w = as_float_array(w, "w")
    gamma = absmean_scale(w, numerics) if gamma is None else np.float32(gamma)
    ref = ternary_codes(w, gamma, numerics)
    quotient = w.astype(np.float32) / gamma
    return compare_tensor(name, ref, candidate_codes, mode="exact", quotient=quotient, codes="ternary",
                          within=within, show=show)


# ====================================================================================== many tensors
def _merged_trailing(ref_shape, cand_shape) -> bool:
    """cand is ref with its trailing axes merged ([S, H, HD] given as [S, H*HD])."""
    return (len(cand_shape) == 2 and len(ref_shape) > 2 and cand_shape[0] == ref_shape[0]
            and cand_shape[1] == int(np.prod(ref_shape[1:])))


def compare_activations(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
                        atol: float | None = None, rtol: float | None = None,
                        tolerances: Mapping[str, tuple] | None = None, mode: str | None = None,
                        print_fn: Callable[[str], None] | None = print) -> Report:
    """Compare a candidate's intermediates with reference_activations' output, in forward order.

    candidate: {name: array or torch tensor} using refbitnet's names (see trace_names); it may give any
    subset (the rest are listed in Report.skipped); an unknown name raises (it is usually a typo). A
    tensor given with its trailing axes merged (q as [S, H*HD] for [S, H, HD]) is compared as the
    reference's shape and the line says so; any other shape is a failed check naming both shapes.
    Integer tensors (the .xq / .acc parts) are compared exactly.
    tolerances: per-tensor (atol, rtol) overrides keyed by full name ("logits") or in-layer name
    ("ffn_act"). print_fn: called with one "TENSOR OK, maxdiff = ..." line per tensor and a summary;
    None prints nothing. Returns a Report; ``report.first_divergence`` names the first bad tensor.

    Choosing tolerances: the defaults (compare_tensor's, 8 float32 ulps) suit an implementation of the
    same numerics. Between implementations, differences start at float32 rounding in norms, RoPE and
    softmax (~1e-6 relative); a rounding difference can move one int8 activation code by 1, which
    changes a BitLinear output by about weight_scale / s, so whole-model comparisons need an atol of
    that size. A wrong op (SiLU for ReLU², a divided scale, a misread layout) gives errors of the size
    of the values themselves, orders of magnitude above either.
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
        cand = as_float_array(candidate[name], name)
        ref_arr = np.asarray(ref)
        note = ""
        if cand.shape != ref_arr.shape and _merged_trailing(ref_arr.shape, cand.shape):
            cand, note = cand.reshape(ref_arr.shape), f"given as {list(candidate[name].shape)}"
        if cand.shape != ref_arr.shape:
            check = TensorCheck(name, float("inf"), False,
                                f"shape {list(cand.shape)}, expected {list(ref_arr.shape)}")
        else:
            tensor_mode = "exact" if ref_arr.dtype.kind in "iu" else mode
            check = compare_tensor(name, ref, cand, mode=tensor_mode, atol=a, rtol=r)
            if note:
                detail = "; ".join(p for p in (note, check.detail) if p)
                check = TensorCheck(**{**check.__dict__, "detail": detail})
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
