"""The full 2B4T shape (slow): a random checkpoint in the release layout (1.18 GB, written by
benchmarks/make_random_2b4t.py) loads memory-mapped, decodes 8 tokens, and the process's peak RSS stays
under 2.0 GB -- i.e. nothing is inflated to float32 (the float32 embedding alone would be 1.3 GB, the
int8 codes 2.1 GB). The Numba backend holds the codes repacked (0.52 GB) and reads the bf16 embedding
through its memory map (0.66 GB); the NumPy backend keeps the codes memory-mapped too.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_LIMIT_BYTES = 2.0e9

DECODE_SCRIPT = r"""
import json, resource, sys, time
import numpy as np
import refbitnet
from refbitnet.config import BITNET_2B4T
try:
    import refbitnet.kernels
    backend = "numba"
except ImportError:
    backend = "numpy"
t0 = time.perf_counter()
model = refbitnet.load(sys.argv[1], backend=backend)
t1 = time.perf_counter()
assert model.config == BITNET_2B4T and model.source_format == "packed"
cache = model.new_cache(3 + 8)
logits = model.forward(np.array([128000, 9906, 1917]), cache=cache)      # prefill: one block of 3
assert logits.shape == (3, 128256) and np.isfinite(logits).all()
tokens = []
for _ in range(8):                                                        # decode: 8 tokens
    tokens.append(int(np.argmax(logits[-1])))
    logits = model.forward([tokens[-1]], cache=cache)
    assert np.isfinite(logits).all()
t2 = time.perf_counter()
print(json.dumps({"backend": backend, "tokens": tokens, "load_s": t1 - t0, "decode_s": t2 - t1,
                  "cache_length": cache.length,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.fixture(scope="module")
def random_2b4t(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("random_2b4t"))
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_random_2b4t.py"), directory],
                   check=True, cwd=ROOT)
    assert abs(os.path.getsize(os.path.join(directory, "model.safetensors")) - 1.18e9) < 0.01e9
    return directory


def test_random_2b4t_decodes_8_tokens_under_2gb_rss(random_2b4t):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, random_2b4t], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"2B4T-shaped random model, backend={report['backend']}: load {report['load_s']:.1f} s, prefill 3 + "
          f"decode 8 tokens {report['decode_s']:.1f} s, peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB")
    assert len(report["tokens"]) == 8 and report["cache_length"] == 11
    assert report["peak_rss_bytes"] < RSS_LIMIT_BYTES


def test_random_2b4t_numba_layers_equal_numpy_at_full_width(random_2b4t):
    """At the real widths (D=2560, F=6912, H=20, KVH=5), first and last layer: the Numba backend's every
    intermediate equals the NumPy path's, bit for bit."""
    pytest.importorskip("refbitnet.kernels")
    import refbitnet
    from refbitnet.model import embed
    ref = refbitnet.load(random_2b4t, backend="numpy")
    fast = refbitnet.load(random_2b4t, backend="numba")
    h = embed(ref.embed_tokens, np.array([128000, 9906, 1917, 374, 264]))        # [5, 2560]
    for i in (0, 29):
        t_ref, t_fast = {}, {}
        out_ref = ref.forward_layer(i, h, trace=t_ref)
        out_fast = fast.forward_layer(i, h, trace=t_fast)
        assert np.array_equal(out_ref, out_fast)
        for key in t_ref:
            assert np.array_equal(t_ref[key], t_fast[key]), key
