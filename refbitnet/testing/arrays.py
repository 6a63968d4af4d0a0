"""Arrays in, from NumPy or torch: the oracle takes a torch tensor wherever it takes an array.

A test of a torch project holds torch tensors (on a GPU, in bf16, requiring grad). Converting each one
by hand cost one user 32 lines and a bf16 tensor crashed the comparison. ``as_array`` converts at the
door: detached, moved to the CPU, bf16 widened to float32 (exactly: a bf16 value is the high half of
a float32). torch is never imported here: a tensor is recognised by the module of its type, so NumPy
users do not pay for (or need) torch.
"""

from __future__ import annotations

import numpy as np

from ..errors import RefBitNetError, RefBitNetTypeError


def is_torch_tensor(x) -> bool:
    """True for a torch.Tensor or subclass (nn.Parameter), without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def torch_dtype_name(x) -> str | None:
    """"bfloat16", "float16", "float32", ... for a torch tensor; None for anything else."""
    if not is_torch_tensor(x):
        return None
    return str(x.dtype).replace("torch.", "")


def as_array(x, name: str = "x"):
    """x as NumPy: a torch tensor (any device, any dtype NumPy has, bf16 as float32) is converted;
    anything else is returned unchanged for the caller's own checks."""
    if not is_torch_tensor(x):
        return x
    t = x.detach()
    if getattr(t, "is_sparse", False):
        t = t.to_dense()
    if str(t.device) == "meta" or getattr(t, "is_meta", False):
        raise RefBitNetError(f"{name}: expected a tensor with data, found a torch tensor on the meta device")
    dtype = str(t.dtype).replace("torch.", "")
    if dtype == "bfloat16":
        t = t.float()                                                   # exact widening
    elif dtype.startswith(("float8", "complex", "qint", "quint", "uint16", "uint32", "uint64")):
        raise RefBitNetTypeError(f"{name}: expected a real float or integer tensor, found torch.{dtype}")
    try:
        return t.cpu().resolve_conj().resolve_neg().numpy()
    except (RuntimeError, TypeError) as e:                            # e.g. a tensor subclass numpy cannot view
        raise RefBitNetTypeError(f"{name}: expected a tensor NumPy can read, found torch.{dtype} ({e})") from None


def as_float_array(x, name: str = "x") -> np.ndarray:
    """as_array, then a real float array (float16/32/64) or an integer array widened to float64."""
    a = as_array(x, name)
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as e:
            raise RefBitNetTypeError(f"{name}: expected an array or torch tensor, found {type(x).__name__} "
                                     f"({e})") from None
    if a.dtype == bool or a.dtype.kind not in "fiu":
        raise RefBitNetTypeError(f"{name}: expected a real numeric array, found dtype {a.dtype}")
    return a
