"""refbitnet.kernels.compile_cache: Numba's cache in a directory per version of refbitnet's source.

The hash changes with any byte of any .py file and with REFBITNET_NO_VNNI; a fresh process that imports
refbitnet.kernels and compiles a kernel writes its cache under $XDG_CACHE_HOME/refbitnet/numba/<hash>;
a NUMBA_CACHE_DIR set by the user wins.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refbitnet.kernels import compile_cache

ROOT = Path(__file__).resolve().parent.parent


def test_the_hash_follows_every_source_byte_and_the_vnni_switch(tmp_path, monkeypatch):
    tree = tmp_path / "refbitnet"
    shutil.copytree(compile_cache.PACKAGE_ROOT, tree, ignore=shutil.ignore_patterns("shipped", "__pycache__"))
    assert compile_cache.source_hash(tree) == compile_cache.source_hash()
    callee = tree / "kernels" / "v4_maddubs.py"
    callee.write_bytes(callee.read_bytes() + b"\n")                     # an edit in a callee's file
    edited = compile_cache.source_hash(tree)
    assert edited != compile_cache.source_hash()
    (tree / "kernels" / "new_module.py").write_text("")                  # a new file counts too
    assert compile_cache.source_hash(tree) not in (edited, compile_cache.source_hash())
    monkeypatch.delenv("REFBITNET_NO_VNNI", raising=False)
    plain = compile_cache.source_hash()
    monkeypatch.setenv("REFBITNET_NO_VNNI", "1")                         # v4 instead of v6 in the decode step
    assert compile_cache.source_hash() != plain


CHILD = """
import numpy as np, numba
from refbitnet.kernels import TernaryLinear, compile_cache
from refbitnet.layouts import pack_kernel
TernaryLinear(pack_kernel(np.ones((4, 16), np.int8)), kernel="v3")(np.ones((1, 16), np.float32))
print(numba.config.CACHE_DIR)
print(compile_cache.cache_dir())
"""


@pytest.mark.parametrize("user_dir", [False, True])
def test_a_fresh_process_compiles_into_the_directory_of_this_source(tmp_path, user_dir):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT))
    if user_dir:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    in_use, ours = out.stdout.split()
    assert Path(ours) == tmp_path / "xdg" / "refbitnet" / "numba" / compile_cache.source_hash()
    expected = tmp_path / "mine" if user_dir else Path(ours)
    assert Path(in_use) == expected
    assert any(expected.rglob("*.nbi")), "the child did not compile into that directory"
    assert user_dir or not (tmp_path / "mine").exists()
