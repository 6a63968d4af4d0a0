"""The one family of argument checks: each raises a refbitnet.errors exception "name: expected ..., found ...".

Every public entry point checks what it is given once, at the door, with these; code behind the door
(the ops of ``refbitnet.model``, the compiled kernels) trusts its inputs. Numba kernels do no bounds
checks, so their wrappers use ``check_array`` for dtype, rank, contiguity and emptiness before any call.
"""

from __future__ import annotations

import numpy as np

from .errors import RefBitNetError, RefBitNetTypeError, TokenizerError


def check_array(a, name: str, dtype=None, ndim: int | None = None, *, contiguous: bool = False,
                nonempty: bool = False) -> np.ndarray:
    """a as a plain ndarray (a np.memmap stays a view, never a copy) after checking it is a NumPy array of
    dtype (None: any), ndim dimensions (None: any), C-contiguous and non-empty where asked."""
    if not isinstance(a, np.ndarray):
        want = f"a numpy {np.dtype(dtype)} array" if dtype is not None else "a numpy array"
        raise RefBitNetTypeError(f"{name}: expected {want}, found {type(a).__name__}")
    if dtype is not None and a.dtype != dtype:
        raise RefBitNetTypeError(f"{name}: expected dtype {np.dtype(dtype)}, found {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        kind = "" if dtype is None else f" {np.dtype(dtype)}"
        raise RefBitNetError(f"{name}: expected a {ndim}-D{kind} array, found shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise RefBitNetError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray), "
                             f"found strides {a.strides} for shape {a.shape}")
    if nonempty and a.size == 0:
        raise RefBitNetError(f"{name}: expected a non-empty array, found shape {a.shape}")
    return np.asarray(a)


def check_float_array(a, name: str, min_ndim: int = 0) -> np.ndarray:
    """A real-valued array (any float or integer dtype, or a nested sequence) as float32, ndim >= min_ndim."""
    if isinstance(a, (str, bytes)):
        raise RefBitNetTypeError(f"{name}: expected a numeric array, found {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as e:
        raise RefBitNetTypeError(f"{name}: expected a numeric array, found {type(a).__name__} ({e})") from None
    if arr.dtype == bool or arr.dtype.kind not in "fiu":
        raise RefBitNetTypeError(f"{name}: expected a float array, found dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise RefBitNetError(f"{name}: expected at least {min_ndim} dimension(s), found shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) with lo <= value <= hi where given -> int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RefBitNetTypeError(f"{name}: expected an int, found {type(value).__name__} {value!r:.40}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{'' if lo is None else f'{lo} <= '}{name}{'' if hi is None else f' <= {hi}'}"
        raise RefBitNetError(f"{name}: expected {bounds}, found {value}")
    return value


def check_choice(value, name: str, choices) -> str:
    """One of choices (strings) -> value."""
    if not isinstance(value, str) or value not in choices:
        raise RefBitNetError(f"{name}: expected one of {tuple(choices)}, found {value!r:.60}")
    return value


def check_token_ids(ids, vocab_size: int, name: str = "ids") -> np.ndarray:
    """Token ids: a non-empty 1-D integer sequence, each in [0, vocab_size) -> int64 [S].

    The one token-id validator: the model, generation and the CLI all call this."""
    if isinstance(ids, (str, bytes)):
        raise RefBitNetTypeError(f"{name}: expected token ids (a 1-D int array or list of ints), found a string "
                                 f"({type(ids).__name__}; encode text with the tokenizer first)")
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as e:        # e.g. a ragged nested list
        raise RefBitNetTypeError(f"{name}: expected a 1-D sequence [S] of token ids, found a "
                                 f"{type(ids).__name__} numpy cannot read as one ({e})") from None
    if arr.size == 0:
        raise RefBitNetError(f"{name}: expected at least one token id, found an empty sequence")
    if arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise RefBitNetTypeError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    if arr.ndim != 1:
        raise RefBitNetError(f"{name}: expected a 1-D sequence [S] of token ids, found shape {arr.shape}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        j = int(np.argmax(bad))
        raise TokenizerError(f"{name}: expected token ids in [0, {vocab_size}) (vocab_size), found "
                             f"{int(arr[j])} at position {j}")
    return arr.astype(np.int64)
