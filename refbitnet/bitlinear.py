"""BitLinear, the ternary linear layer of BitNet b1.58, in NumPy: integer form and fake-quant form.

Both take float activations x [..., K], ternary codes [N, K] (int8 in {-1, 0, 1}) and the weight
scale gamma (the release's ``weight_scale``, MULTIPLY convention: W ~= codes * gamma).

integer form (exact, what an int8 x ternary kernel computes; ``bitlinear_int``)::

    xq, s = absmax_int8(x)                        # int8 [..., K], float32 [...]
    acc   = xq @ codes.T                          # int32 [..., N], exact
    y     = (float32(acc) / s[..., None]) * weight_scale   # float32, in this order

fake-quant form (what transformers' AutoBitLinear and the trainer compute; ``bitlinear_fake_quant``)::

    y = ((xq / s) as float32) @ float32(codes).T * weight_scale

The two are equal in exact arithmetic; in float32 the fake-quant matmul rounds its partial sums in
an order chosen by BLAS, so they differ by a few ulps of the partial sums. Only the integer form is
bit-reproducible across machines; every comparison in refbitnet states which numerics it uses.

Both take ``numerics=`` (None for refbitnet's own, a preset name of ``refbitnet.quant.NUMERICS`` or a
``refbitnet.quant.Numerics``) to compute another implementation's roundings: its activation
quantizer, and bf16 outputs where numerics.dtype is "bfloat16". The default path is unchanged.
"""

from typing import NamedTuple

import numpy as np

from .errors import RefBitNetError, RefBitNetTypeError
from .quant import (absmax_int8, as_numerics, bf16_values, check_ternary_codes, dequantize_int8,
                    fake_quantize_activations)

# acc is computed with a float32 BLAS matmul of integer-valued matrices. Each product xq*w has
# |xq*w| <= 128, so every partial sum, in whatever order and grouping BLAS adds (FMA or not), is an
# integer of magnitude <= 128*K. float32 represents every integer up to 2**24 exactly, so for
# 128*K <= 2**24, i.e. K <= 2**17 = 131072, no addition ever rounds and the result is exact.
# That is ~10x faster than numpy's integer matmul (which has no BLAS). Beyond that bound we fall
# back to an exact int64 matmul; the int32 result itself needs 128*K < 2**31.
FLOAT32_EXACT_MAX_K = 2 ** 24 // 128      # 131072
INT32_MAX_K = (2 ** 31 - 1) // 128        # 16777215


class BitLinearOutput(NamedTuple):
    y: np.ndarray      # float32 [..., N]
    acc: np.ndarray    # int32 [..., N]
    xq: np.ndarray     # int8 [..., K]
    s: np.ndarray      # float32 [...]


def _codes_nk(codes, k):
    codes = check_ternary_codes(codes, "codes")
    if codes.ndim != 2:
        raise RefBitNetError(f"codes: expected a 2-D [N, K] array of ternary codes, found shape {codes.shape}")
    if codes.shape[1] != k:
        raise RefBitNetError(f"codes: expected K = {k} columns to match x's last axis, found shape {codes.shape}")
    if codes.shape[0] == 0:
        raise RefBitNetError(f"codes: expected at least one output row, found shape {codes.shape}")
    return codes


def _x_last_axis(x):
    if not isinstance(x, np.ndarray):
        raise RefBitNetTypeError(f"x: expected a numpy float array [..., K], found {type(x).__name__}")
    if x.ndim < 1:
        raise RefBitNetError(f"x: expected at least 1 dimension [..., K], found shape {x.shape}")
    return x.shape[-1]


def _weight_scale(weight_scale, n):
    """weight_scale as float32: a scalar (shape (), (1,)) or one per output row [N]; finite, >= 0."""
    ws = np.asarray(weight_scale)
    if ws.dtype.kind not in "fiu":
        raise RefBitNetTypeError(f"weight_scale: expected a real scalar or float array [N], found dtype {ws.dtype}")
    if ws.dtype == np.uint16:
        raise RefBitNetTypeError("weight_scale: expected float values, found uint16 "
                                 "(bf16 bits? widen them with refbitnet.bf16.bf16_to_f32 first)")
    if ws.shape not in ((), (1,), (n,)):
        raise RefBitNetError(f"weight_scale: expected a scalar, shape (1,) or shape ({n},), found shape {ws.shape}")
    ws32 = ws.astype(np.float32)
    if not np.isfinite(ws32).all() or (ws32 < 0).any():
        raise RefBitNetError(f"weight_scale: expected finite values >= 0, found {ws32.reshape(-1)[:4]}")
    return ws32.reshape(()) if ws.shape == (1,) else ws32


def ternary_matmul_exact(xq: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """acc = xq @ codes.T exactly: xq int8 [..., K], codes int8 [N, K] -> int32 [..., N].

    Uses a float32 BLAS matmul when K <= 131072 (exact, see FLOAT32_EXACT_MAX_K), int64 otherwise.
    """
    if not isinstance(xq, np.ndarray) or xq.dtype != np.int8:
        raise RefBitNetTypeError(f"xq: expected an int8 array [..., K], found {getattr(xq, 'dtype', type(xq).__name__)}")
    k = xq.shape[-1] if xq.ndim else 0
    codes = _codes_nk(codes, k)
    if k > INT32_MAX_K:
        raise RefBitNetError(f"xq: expected K <= {INT32_MAX_K} so that int32 accumulators cannot overflow, found {k}")
    if k <= FLOAT32_EXACT_MAX_K:
        acc = xq.astype(np.float32) @ codes.T.astype(np.float32)            # [..., K] @ [K, N] -> [..., N], exact
    else:
        acc = xq.astype(np.int64) @ codes.T.astype(np.int64)                # exact, slow
    return acc.astype(np.int32)


def bitlinear_epilogue(acc: np.ndarray, s: np.ndarray, weight_scale) -> np.ndarray:
    """y = (float32(acc) / s[..., None]) * weight_scale, float32 ops in exactly this order.

    acc int32 [..., N]; s float32 [...] (per-token activation scale); weight_scale float32 scalar,
    shape (1,), or [N] (one per output row, e.g. for fused q/k/v). Returns float32 [..., N].
    """
    if not isinstance(acc, np.ndarray) or acc.dtype != np.int32:
        raise RefBitNetTypeError(f"acc: expected an int32 array [..., N], found {getattr(acc, 'dtype', type(acc).__name__)}")
    if acc.ndim < 1:
        raise RefBitNetError(f"acc: expected at least 1 dimension [..., N], found shape {acc.shape}")
    s = np.asarray(s)
    if s.dtype != np.float32:
        raise RefBitNetTypeError(f"s: expected float32 activation scales, found dtype {s.dtype}")
    if s.shape != acc.shape[:-1]:
        raise RefBitNetError(f"s: expected shape {acc.shape[:-1]} (one scale per row of acc), found {s.shape}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise RefBitNetError(f"s: expected finite positive scales, found {s.reshape(-1)[:4]}")
    ws = _weight_scale(weight_scale, acc.shape[-1])
    return (acc.astype(np.float32) / s[..., None]) * ws                     # [..., N]


def bitlinear_int(x: np.ndarray, codes: np.ndarray, weight_scale, numerics=None) -> BitLinearOutput:
    """Integer-form BitLinear: x float [..., K], codes int8 [N, K] -> BitLinearOutput(y, acc, xq, s).

    y float32 [..., N] = bitlinear_epilogue(acc, s, weight_scale); acc int32 [..., N] = xq @ codes.T;
    xq int8 [..., K], s float32 [...] = absmax_int8(x, numerics). Bit-reproducible.
    numerics.dtype "bfloat16": y is the float32 epilogue rounded once to bf16, what microsoft/BitNet's
    gpu/ decode kernel writes (its epilogue is float32, its output tensor bf16).
    """
    num = as_numerics(numerics)
    k = _x_last_axis(x)
    codes = _codes_nk(codes, k)
    ws = _weight_scale(weight_scale, codes.shape[0])
    xq, s = absmax_int8(x, num)                                             # [..., K], [...]
    acc = ternary_matmul_exact(xq, codes)                                   # [..., N]
    y = bitlinear_epilogue(acc, np.asarray(s, dtype=np.float32), ws)        # [..., N]
    if num.dtype == "bfloat16":
        y = bf16_values(y)
    return BitLinearOutput(y, acc, xq, np.asarray(s, dtype=np.float32))


def bitlinear_fake_quant(x: np.ndarray, codes: np.ndarray, weight_scale, numerics=None) -> np.ndarray:
    """Fake-quant BitLinear: ((xq / s) as float32) @ float32(codes).T * weight_scale -> float32 [..., N].

    The numerics of transformers' AutoBitLinear (offline mode) in a float32 model: its ActQuant
    returns round(x * s) / s in float32, F.linear multiplies by the unpacked ternary weights, then
    the output is multiplied by weight_scale. Summation order inside the matmul is BLAS's.
    numerics.dtype "bfloat16" (AutoBitLinear in a bf16 model): xq / s, the matmul's result,
    weight_scale and the product are each rounded to bf16; the matmul accumulates in float32 in an
    order of our BLAS's choosing, so agreement with torch's bf16 matmul is to an ulp of bf16, not bits.
    """
    num = as_numerics(numerics)
    k = _x_last_axis(x)
    codes = _codes_nk(codes, k)
    ws = _weight_scale(weight_scale, codes.shape[0])
    if num.is_default:
        xq, s = absmax_int8(x)                                              # [..., K], [...]
        xdq = dequantize_int8(xq, s)                                        # [..., K] float32
        return (xdq @ codes.T.astype(np.float32)) * ws                      # [..., N]
    xdq = fake_quantize_activations(x, num)                                 # [..., K] float32 (bf16 values)
    lin = (xdq @ codes.T.astype(np.float32)).astype(np.float32)             # [..., N]
    if num.dtype == "bfloat16":
        return bf16_values(bf16_values(lin) * bf16_values(ws))
    return lin * ws
