"""The two BitNet b1.58 quantizers, in float32, exactly as docs/SPEC.md §3 defines them.

absmean (weights, one scale per tensor)::

    gamma = max(mean(|W|), 1e-5)
    Wt    = clip(round(W / gamma), -1, 1)      # int8 in {-1, 0, +1}, round half to even
    W    ~= Wt * gamma

So a weight becomes 0 when |W| < 0.5 * gamma (a tie at exactly 0.5 * gamma also goes to 0), not
when |W| < gamma, as some write-ups say.

absmax (activations, one scale per token = per row of the last axis)::

    s  = 127 / max(max(|x|), 1e-5)             # in float32 as torch evaluates it: 127 * (1 / m)
    xq = clip(round(x * s), -128, 127)         # int8
    x ~= xq / s

Those are refbitnet's numerics (and torch float32's). Other implementations compute the same rules
with other roundings; ``Numerics`` names each difference and ``NUMERICS`` holds presets for the
implementations people compare against, so a test can say which numerics its code under test uses.
"""

from dataclasses import dataclass

import numpy as np

from .bf16 import round_to_bf16
from .checks import check_choice
from .errors import RefBitNetError, RefBitNetTypeError

WEIGHT_SCALE_MIN = np.float32(1e-5)   # clamp of mean|W|
ACT_ABSMAX_MIN = np.float32(1e-5)     # clamp of max|x|
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


# ====================================================================================== numerics
@dataclass(frozen=True)
class Numerics:
    """How the quantizers and BitLinear round: four choices on which real implementations differ.

    The defaults are refbitnet's own numerics (what torch computes in float32); every choice changes
    at most a rounding, so two implementations that differ only here agree to an ulp of a scale and
    a code one apart at a tie (docs/SPEC.md §7 lists who computes what).

    act_scale -- the activation scale s = 127 / m, m = max(max|x|, 1e-5):
        "torch": 127 * fl(1 / m), two roundings. torch evaluates ``127 / t`` as
            ``t.reciprocal() * 127`` (``Tensor.__rtruediv__``), so every torch implementation
            does this: transformers' ActQuant, AutoBitLinear and legacy BitLinear, microsoft/BitNet
            ``gpu/model.py``, refbitnet's model.
        "ieee": fl(127 / m), one correctly rounded division: what C and C++ (``127.0f / m``),
            NumPy and Triton source (onebitllms' ``127.0 / row_absmax``) write.
    weight_round -- the quotient rounded to a ternary code:
        "divide": round(w / gamma), the paper's rule and refbitnet's.
        "reciprocal": round(w * fl(1 / gamma)): transformers' online ``WeightQuant``, onebitllms'
            ``weight_quant_triton`` and ``quantize_to_1bit`` (scale = 1 / mean|w|, then w * scale).
    ties -- the rounding of a code's quotient that lands exactly on .5:
        "even": round half to even (torch.round, np.rint, C nearbyint): refbitnet, transformers,
            microsoft/BitNet.
        "half_up": floor(fl(q + 0.5)), half towards +inf: onebitllms' Triton kernels
            (``tl.floor(x + 0.5)``). As there, q + 0.5 is itself rounded to float32, so
            q = 0.49999997 (the float32 below 0.5) also goes up.
    dtype -- the dtype of the activations a layer receives and returns:
        "float32": refbitnet.
        "bfloat16": inputs are bf16 values (rounded to bf16 here if they are not), the fake-quant
            form's dequantized activations xq / s and the BitLinear output y are rounded to bf16
            (round to nearest even): transformers' BitNet in its default dtype for the release
            (ActQuant computes in float32 and returns ``.to(bfloat16)``), microsoft/BitNet's
            ``gpu/`` decode kernel (writes bf16 outputs).
    quant_dtype -- the dtype in which the quantizers do their arithmetic:
        "float32": refbitnet, transformers' ActQuant / WeightQuant (they call ``.float()`` first).
        "bfloat16": each op rounded to bf16, as eager torch does on a bf16 tensor: the reciprocal,
            the scale, x * s (and w * fl(1/gamma) or w / gamma): transformers' legacy BitLinear
            ``activation_quant`` run eagerly in a bf16 model, onebitllms' ``quantize_to_1bit``
            (its bf16 ``_weight_quant``). Under torch.compile inductor keeps such chains in float32.
    scale_dtype -- the activation scale s as it is used (for x * s and in the epilogue) and returned:
        "float32": as computed (refbitnet, transformers).
        "bfloat16": computed as act_scale and quant_dtype say, then rounded once to bf16, and that bf16
            value multiplies x and divides acc: microsoft/BitNet ``gpu/``, whose ``quant_input`` returns
            s as a bf16 tensor (under torch.compile the chain runs in float32 and only the returned s is
            bf16) and whose decode kernel reads ``__nv_bfloat16* s``.
    """
    act_scale: str = "torch"
    weight_round: str = "divide"
    ties: str = "even"
    dtype: str = "float32"
    quant_dtype: str = "float32"
    scale_dtype: str = "float32"

    def __post_init__(self):
        check_choice(self.act_scale, "act_scale", ("torch", "ieee"))
        check_choice(self.weight_round, "weight_round", ("divide", "reciprocal"))
        check_choice(self.ties, "ties", ("even", "half_up"))
        check_choice(self.dtype, "dtype", ("float32", "bfloat16"))
        check_choice(self.quant_dtype, "quant_dtype", ("float32", "bfloat16"))
        check_choice(self.scale_dtype, "scale_dtype", ("float32", "bfloat16"))

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_NUMERICS


DEFAULT_NUMERICS = Numerics()

#: Named numerics of the implementations refbitnet is compared with (tests/test_numerics.py checks
#: each against the implementation it names, bit for bit where that code runs here).
NUMERICS = {
    # refbitnet's model and transformers' BitNet in a float32 model (ActQuant, offline AutoBitLinear)
    "torch": DEFAULT_NUMERICS,
    # one correctly rounded 127 / m: C/C++ kernels written from the paper
    "ieee": Numerics(act_scale="ieee"),
    # transformers' BitNet in bf16 (the release's torch_dtype): ActQuant in float32, bf16 in and out;
    # weights quantized online by WeightQuant (w * fl(1/gamma))
    "transformers-bf16": Numerics(weight_round="reciprocal", dtype="bfloat16"),
    # transformers' legacy BitLinear (no linear_class) in a bf16 model, run eagerly: activation_quant
    # on the bf16 tensor itself
    "transformers-legacy-bf16": Numerics(dtype="bfloat16", quant_dtype="bfloat16"),
    # onebitllms' Triton training kernels: floor(x + 0.5), 127.0 / absmax, w * (1 / mean|w|)
    "onebitllms": Numerics(act_scale="ieee", weight_round="reciprocal", ties="half_up"),
    # onebitllms' quantize_to_1bit (the checkpoint writer): bf16 torch, w * (1 / mean|w|), ties to even
    "onebitllms-checkpoint": Numerics(weight_round="reciprocal", quant_dtype="bfloat16"),
    # microsoft/BitNet gpu/: torch's quantizer compiled (float32 chain, s returned as bf16 and used as
    # such for x * s and by the kernel's epilogue), exact int8 x int2 accumulators, bf16 outputs
    "bitnet-gpu": Numerics(dtype="bfloat16", scale_dtype="bfloat16"),
}


def as_numerics(numerics) -> Numerics:
    """None (refbitnet's default), a preset name of NUMERICS, or a Numerics -> Numerics."""
    if numerics is None:
        return DEFAULT_NUMERICS
    if isinstance(numerics, Numerics):
        return numerics
    if isinstance(numerics, str) and numerics in NUMERICS:
        return NUMERICS[numerics]
    raise RefBitNetError(f"numerics: expected a Numerics, None or one of {tuple(NUMERICS)}, "
                         f"found {numerics!r:.60}")


def round_codes(q: np.ndarray, ties: str = "even") -> np.ndarray:
    """Round float32 quotients to integral float32 values: "even" = np.rint (half to even);
    "half_up" = floor(fl(q + 0.5)) in float32, as onebitllms' kernels compute it."""
    if ties == "even":
        return np.rint(q)
    return np.floor((q + np.float32(0.5)).astype(np.float32))


def bf16_values(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), kept as float32; shape kept."""
    return round_to_bf16(np.asarray(a, dtype=np.float32)).reshape(np.shape(a))


def _as_float32(a, name: str, min_ndim: int) -> np.ndarray:
    """Validate a real floating array with no NaN/inf and return it as float32 (values exact for f16/f32)."""
    if not isinstance(a, np.ndarray):
        raise RefBitNetTypeError(f"{name}: expected a numpy array, found {type(a).__name__}")
    if a.dtype.type not in _FLOAT_DTYPES:
        raise RefBitNetTypeError(f"{name}: expected a float16/float32/float64 array, found dtype {a.dtype}")
    if a.ndim < min_ndim:
        raise RefBitNetError(f"{name}: expected at least {min_ndim} dimension(s), found shape {a.shape}")
    if a.size == 0:
        raise RefBitNetError(f"{name}: expected a non-empty array, found shape {a.shape}")
    with np.errstate(over="ignore"):                                     # reported below as an overflow
        a32 = a.astype(np.float32, copy=False)
    if not np.isfinite(a32).all():
        bad = np.argwhere(~np.isfinite(a32))[0]
        raise RefBitNetError(f"{name}: expected finite values, found {a32[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
                             + (" (overflow converting float64 to float32)" if np.isfinite(a[tuple(bad)]) else ""))
    return a32


def absmean_ternary(w: np.ndarray, numerics=None):
    """Quantize a weight tensor to ternary codes.

    w: float array, any shape (usually [out, in]). numerics: None (refbitnet's), a NUMERICS preset
    name or a Numerics (its weight_round, ties and quant_dtype apply).
    Returns (codes int8 of w's shape with values in {-1, 0, +1}, gamma float32 scalar = max(mean|w|, 1e-5)).
    The mean is numpy's float32 pairwise sum divided by the count (see ``absmean_scale``).
    """
    w32 = _as_float32(w, "w", 1)
    gamma = absmean_scale(w32, numerics)
    return ternary_codes(w32, gamma, numerics), gamma


def absmean_scale(w: np.ndarray, numerics=None) -> np.float32:
    """gamma = max(mean(|w|), 1e-5) as float32, accumulated in float32 (numpy's pairwise summation).

    torch sums in another order, so its mean can differ from ours by a few ulps (docs/SPEC.md §3.1 gives
    the measured distance); the codes for a given gamma are identical (``ternary_codes``). With
    quant_dtype "bfloat16" the mean is rounded to bf16, as torch's mean of a bf16 tensor is.
    """
    num = as_numerics(numerics)
    w32 = _as_float32(w, "w", 1)
    with np.errstate(over="ignore"):
        mean = np.mean(np.abs(w32), dtype=np.float32)
    if not np.isfinite(mean):
        raise RefBitNetError(f"w: expected weights whose mean |w| fits in float32, found a float32 sum that "
                             f"overflows (max |w| = {np.max(np.abs(w32))}, {w32.size} elements)")
    if num.quant_dtype == "bfloat16":
        return np.float32(max(bf16_values(mean), bf16_values(WEIGHT_SCALE_MIN)))
    return np.float32(max(mean, WEIGHT_SCALE_MIN))


def ternary_codes(w: np.ndarray, gamma, numerics=None) -> np.ndarray:
    """codes = clip(round(w / gamma), -1, 1) as int8; w: float array, gamma: positive float32 scalar.

    We divide, as docs/SPEC.md §3 writes it. transformers' online ``WeightQuant`` multiplies by the
    float32 reciprocal instead, round(w * fl(1/gamma)) (numerics weight_round="reciprocal"); the two
    quotients differ by at most an ulp or two, so the codes can differ only for a weight within a few
    ulps of the threshold |w| = 0.5 * gamma (tests/test_quant.py pins down exactly that).
    With quant_dtype "bfloat16", gamma is taken as the bf16 it is in such code and each op is
    rounded to bf16.
    """
    num = as_numerics(numerics)
    w32 = _as_float32(w, "w", 1)
    gamma = np.float32(gamma)
    if not (np.isfinite(gamma) and gamma > 0):
        raise RefBitNetError(f"gamma: expected a positive finite scale, found {gamma}")
    if num.is_default:
        with np.errstate(over="ignore"):                             # |w| / tiny gamma -> inf -> clipped to 1
            return np.clip(np.round(w32 / gamma), -1, 1).astype(np.int8)
    rnd = bf16_values if num.quant_dtype == "bfloat16" else (lambda a: a)
    if num.quant_dtype == "bfloat16":
        w32, gamma = bf16_values(w32), bf16_values(gamma)
    with np.errstate(over="ignore"):
        if num.weight_round == "divide":
            q = rnd(w32 / gamma)
        else:
            q = rnd(w32 * rnd(np.float32(1.0) / gamma))                  # w * fl(1 / gamma)
        return np.clip(round_codes(q.astype(np.float32), num.ties), -1, 1).astype(np.int8)


def fake_quantize_weights(w: np.ndarray, numerics=None):
    """What a fake-quant (online) BitLinear multiplies by: (wq float32 of w's shape, gamma).

    weight_round "divide": wq = codes * gamma; "reciprocal": wq = codes / fl(1/gamma), as
    transformers' ``WeightQuant`` and onebitllms compute it. Rounded to bf16 when numerics.dtype is
    "bfloat16" (``.to(dtype)`` of a bf16 model).
    """
    num = as_numerics(numerics)
    codes, gamma = absmean_ternary(w, num)
    c32 = codes.astype(np.float32)
    if num.weight_round == "divide":
        wq = c32 * gamma
    else:
        wq = c32 / (np.float32(1.0) / gamma).astype(np.float32)
    return (bf16_values(wq) if num.dtype == "bfloat16" else wq.astype(np.float32)), gamma


def dequantize_ternary(codes: np.ndarray, gamma) -> np.ndarray:
    """codes int8 {-1,0,1} (any shape) * gamma -> float32 of the same shape."""
    codes = check_ternary_codes(codes, "codes")
    return codes.astype(np.float32) * np.float32(gamma)


def absmax_int8(x: np.ndarray, numerics=None):
    """Per-token int8 quantization of activations.

    x: float array [..., K]; each row (last axis) gets its own scale.
    Returns (xq int8 [..., K], s float32 [...]) with x ~= xq / s[..., None].

    s is computed as 127 * fl(1 / max(max|x|, 1e-5)), two float32 roundings, because that is what
    the reference code ``127 / t.abs().max(...)`` does in torch: ``Tensor.__rtruediv__`` is
    ``t.reciprocal() * 127``. A single correctly rounded 127 / m differs from it by one ulp for
    some m (e.g. m = 1835), which would change s bit-for-bit and occasionally a code.
    numerics (None, a NUMERICS preset name or a Numerics) selects another implementation's rounding:
    act_scale, ties, dtype (bf16 inputs), quant_dtype (bf16 arithmetic; s is then a bf16 value) and
    scale_dtype (s rounded to bf16 before it is used).
    """
    num = as_numerics(numerics)
    x32 = _as_float32(x, "x", 1)
    if num.is_default:
        absmax = np.max(np.abs(x32), axis=-1)                             # [...]
        inv = (np.float32(1.0) / np.maximum(absmax, ACT_ABSMAX_MIN)).astype(np.float32)  # [...]
        s = (np.float32(127.0) * inv).astype(np.float32)             # [...], torch's 127 / t (see docstring)
        xq = np.clip(np.round(x32 * s[..., None]), -128, 127).astype(np.int8)  # [..., K]
        return xq, s
    if num.dtype == "bfloat16":
        x32 = bf16_values(x32)                                                  # the layer's input is bf16
    rnd = bf16_values if num.quant_dtype == "bfloat16" else (lambda a: a)
    floor = rnd(ACT_ABSMAX_MIN)
    m = np.maximum(np.max(np.abs(x32), axis=-1), floor).astype(np.float32)  # [...]
    if num.act_scale == "torch":
        s = rnd((np.float32(127.0) * rnd((np.float32(1.0) / m).astype(np.float32))).astype(np.float32))
    else:
        s = rnd((np.float32(127.0) / m).astype(np.float32))                  # [...]
    s = np.asarray(s, dtype=np.float32)
    if num.scale_dtype == "bfloat16":                                       # the scale as it is used
        s = np.asarray(bf16_values(s), dtype=np.float32)
    xs = rnd((x32 * s[..., None]).astype(np.float32))                    # [..., K]
    xq = np.clip(round_codes(xs, num.ties), -128, 127).astype(np.int8)  # [..., K]
    return xq, s


def fake_quantize_activations(x: np.ndarray, numerics=None) -> np.ndarray:
    """xq / s as the fake-quant form computes it: x float [..., K] -> float32 [..., K].

    The division is in float32 (in bf16 with quant_dtype "bfloat16"), then rounded to bf16 when
    numerics.dtype is "bfloat16": transformers' ``ActQuant`` returns exactly this, ``.to(dtype)``.
    """
    num = as_numerics(numerics)
    xq, s = absmax_int8(x, num)
    xdq = (xq.astype(np.float32) / s[..., None]).astype(np.float32)     # [..., K]
    if num.quant_dtype == "bfloat16" or num.dtype == "bfloat16":
        xdq = bf16_values(xdq)
    return xdq


def dequantize_int8(xq: np.ndarray, s: np.ndarray) -> np.ndarray:
    """xq int8 [..., K], s float32 [...] -> xq / s as float32 [..., K]."""
    if not isinstance(xq, np.ndarray) or xq.dtype != np.int8:
        raise RefBitNetTypeError(f"xq: expected an int8 array, found {getattr(xq, 'dtype', type(xq).__name__)}")
    s = np.asarray(s, dtype=np.float32)
    if s.shape != xq.shape[:-1]:
        raise RefBitNetError(f"s: expected shape {xq.shape[:-1]} (one scale per row of xq), found {s.shape}")
    return xq.astype(np.float32) / s[..., None]


def check_ternary_codes(codes, name: str = "codes") -> np.ndarray:
    """Return codes if it is an int8 array with values in {-1, 0, 1}; raise otherwise."""
    if not isinstance(codes, np.ndarray):
        raise RefBitNetTypeError(f"{name}: expected a numpy int8 array, found {type(codes).__name__}")
    if codes.dtype != np.int8:
        raise RefBitNetTypeError(f"{name}: expected dtype int8 ternary codes, found {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        bad = np.argwhere((codes < -1) | (codes > 1))[0]
        raise RefBitNetError(f"{name}: expected values in {{-1, 0, 1}}, found {int(codes[tuple(bad)])} "
                             f"at index {tuple(int(i) for i in bad)}")
    return codes
