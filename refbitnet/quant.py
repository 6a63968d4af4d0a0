"""The two BitNet b1.58 quantizers, in float32, exactly as SPEC §3 defines them.

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
"""

import numpy as np

from .errors import RefBitNetError, RefBitNetTypeError

WEIGHT_SCALE_MIN = np.float32(1e-5)   # clamp of mean|W|
ACT_ABSMAX_MIN = np.float32(1e-5)     # clamp of max|x|
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


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


def absmean_ternary(w: np.ndarray):
    """Quantize a weight tensor to ternary codes.

    w: float array, any shape (usually [out, in]).
    Returns (codes int8 of w's shape with values in {-1, 0, +1}, gamma float32 scalar = max(mean|w|, 1e-5)).
    The mean is numpy's float32 pairwise sum divided by the count (see ``absmean_scale``).
    """
    w32 = _as_float32(w, "w", 1)
    gamma = absmean_scale(w32)
    return ternary_codes(w32, gamma), gamma


def absmean_scale(w: np.ndarray) -> np.float32:
    """gamma = max(mean(|w|), 1e-5) as float32, accumulated in float32 (numpy's pairwise summation).

    torch sums in another order, so its mean can differ from ours by a few ulps; the codes for a
    given gamma are identical (``ternary_codes``).
    """
    w32 = _as_float32(w, "w", 1)
    with np.errstate(over="ignore"):
        mean = np.mean(np.abs(w32), dtype=np.float32)
    if not np.isfinite(mean):
        raise RefBitNetError(f"w: expected weights whose mean |w| fits in float32, found a float32 sum that "
                             f"overflows (max |w| = {np.max(np.abs(w32))}, {w32.size} elements)")
    return np.float32(max(mean, WEIGHT_SCALE_MIN))


def ternary_codes(w: np.ndarray, gamma) -> np.ndarray:
    """codes = clip(round(w / gamma), -1, 1) as int8; w: float array, gamma: positive float32 scalar.

    We divide, as SPEC §3 writes it. transformers' online ``WeightQuant`` multiplies by the float32
    reciprocal instead, round(w * fl(1/gamma)); the two quotients differ by at most an ulp or two,
    so the codes can differ only for a weight within a few ulps of the threshold |w| = 0.5 * gamma
    (tests/test_quant.py pins down exactly that).
    """
    w32 = _as_float32(w, "w", 1)
    gamma = np.float32(gamma)
    if not (np.isfinite(gamma) and gamma > 0):
        raise RefBitNetError(f"gamma: expected a positive finite scale, found {gamma}")
    with np.errstate(over="ignore"):                                     # |w| / tiny gamma -> inf -> clipped to 1
        return np.clip(np.round(w32 / gamma), -1, 1).astype(np.int8)


def dequantize_ternary(codes: np.ndarray, gamma) -> np.ndarray:
    """codes int8 {-1,0,1} (any shape) * gamma -> float32 of the same shape."""
    codes = check_ternary_codes(codes, "codes")
    return codes.astype(np.float32) * np.float32(gamma)


def absmax_int8(x: np.ndarray):
    """Per-token int8 quantization of activations.

    x: float array [..., K]; each row (last axis) gets its own scale.
    Returns (xq int8 [..., K], s float32 [...]) with x ~= xq / s[..., None].

    s is computed as 127 * fl(1 / max(max|x|, 1e-5)), two float32 roundings, because that is what
    the reference code ``127 / t.abs().max(...)`` does in torch: ``Tensor.__rtruediv__`` is
    ``t.reciprocal() * 127``. A single correctly rounded 127 / m differs from it by one ulp for
    some m (e.g. m = 1835), which would change s bit-for-bit and occasionally a code.
    """
    x32 = _as_float32(x, "x", 1)
    absmax = np.max(np.abs(x32), axis=-1)                                 # [...]
    inv = (np.float32(1.0) / np.maximum(absmax, ACT_ABSMAX_MIN)).astype(np.float32)  # [...]
    s = (np.float32(127.0) * inv).astype(np.float32)                     # [...], torch's 127 / t (see docstring)
    xq = np.clip(np.round(x32 * s[..., None]), -128, 127).astype(np.int8)  # [..., K]
    return xq, s


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
