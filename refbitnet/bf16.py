"""bfloat16 <-> float32 without numpy bfloat16 support.

A bf16 value is the high 16 bits of a float32. We keep bf16 tensors as ``uint16`` arrays (that is how
they sit in a safetensors or GGUF file) and widen them only where a float32 is needed.
"""

import numpy as np

from .errors import RefBitNetTypeError


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Widen bf16 bits (uint16, any shape) to float32 exactly."""
    u16 = np.asarray(u16)
    if u16.dtype != np.uint16:
        raise RefBitNetTypeError(f"u16: expected uint16 bf16 bits, found dtype {u16.dtype}")
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits (uint16), round to nearest, ties to even, as torch does.

    NaN stays NaN (quiet, sign kept; torch may pick other NaN bits); infinities stay infinite;
    values beyond bf16's range round to inf. float64 input is rounded to float32 first, as torch's
    double -> bfloat16 conversion does.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    lsb = (bits >> 16) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lsb) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 value, returned as float32."""
    return bf16_to_f32(f32_to_bf16(x))
