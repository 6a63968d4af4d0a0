"""Where Numba keeps refbitnet's compiled kernels: one directory per version of refbitnet's source.

Why: Numba's on-disk cache (``cache=True``) files each entry under the source file of the function it
compiled and checks only that file's timestamp, but a compiled function carries, inlined, the functions
it calls from other files: the decode step holds the GEMV of ``kernels/v4_maddubs.py``, the LM head, the
attention and the glue. After an edit to one of those (a development tree, a ``git pull`` into an
editable install) the caller's entry would go on running the old callee's machine code, and nothing
would say so. Naming the directory by a hash of every ``.py`` file of the package (and of
REFBITNET_NO_VNNI, which picks the GEMV compiled into the decode step) makes any change compile afresh,
once, as after an install.

``use()`` (run by ``refbitnet.kernels`` before anything is compiled) points ``numba.config.CACHE_DIR``
at ``cache_dir()``: ``$XDG_CACHE_HOME/refbitnet/numba/<hash>``, ``~/.cache`` without XDG_CACHE_HOME. A
NUMBA_CACHE_DIR set by the user is left as it is; where the directory cannot be written, Numba falls back
to its own places.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent            # the refbitnet package directory


def source_hash(root: Path = PACKAGE_ROOT) -> str:
    """16 hex digits of the SHA-256 of every .py file under root (relative path and bytes, in sorted
    order) and of REFBITNET_NO_VNNI."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(b"REFBITNET_NO_VNNI=" + os.environ.get("REFBITNET_NO_VNNI", "").encode())
    return digest.hexdigest()[:16]


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "refbitnet", "numba", source_hash())


def use() -> None:
    """Point Numba's cache at cache_dir(), unless NUMBA_CACHE_DIR is set. Only functions decorated after
    this call are affected, so refbitnet.kernels calls it before importing any of its kernels."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from numba.core import config
    config.CACHE_DIR = cache_dir()
