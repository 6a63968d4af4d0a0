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
    h = embed(ref.weights.embed_tokens, np.array([128000, 9906, 1917, 374, 264]))        # [5, 2560]
    for i in (0, 29):
        t_ref, t_fast = {}, {}
        out_ref = ref.forward_layer(i, h, trace=t_ref)
        out_fast = fast.forward_layer(i, h, trace=t_fast)
        assert np.array_equal(out_ref, out_fast) and t_ref.keys() == t_fast.keys()
        for key in t_ref:
            assert np.array_equal(t_ref[key], t_fast[key]), key


def test_two_layers_at_full_width_match_transformers(tmp_path, one_torch_thread):
    """2B4T widths (D=2560, F=6912, H=20, KVH=5, HD=128, rope_theta=5e5, V=128256), 2 layers, against
    transformers' BitNetForCausalLM (fake-quant, float32), layer by layer. Bounds as in
    test_model_vs_transformers: 1e-5 relative until an int8 code flips, 5e-2 after (flips are printed)."""
    pytest.importorskip("transformers")
    import refbitnet
    from refbitnet.quant import absmax_int8
    from _tiny_bitnet import (QUANTIZER_SITES, check_bitlinear_against_autobitlinear, load_transformers,
                              run_transformers)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_random_2b4t.py"), str(tmp_path),
                    "--layers", "2"], check=True, cwd=ROOT)
    ids = np.random.default_rng(0).integers(0, 128256, 24)
    hf = load_transformers(str(tmp_path))
    ref_logits, ref = run_transformers(hf, ids)
    model = refbitnet.load(tmp_path, numerics="fake-quant")
    for i, layer in enumerate(model.weights.layers):              # each projection teacher-forced: exact codes, error bound
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            proj = getattr(layer, module.split(".")[1])
            check_bitlinear_against_autobitlinear(hf.model.layers[i].get_submodule(module),
                                                  ref[f"layers.{i}.{module}"], proj.codes(), proj.weight_scale,
                                                  f"full width layer {i} {module}")
    del hf
    trace = {}
    logits = model.forward(ids, trace=trace)
    flipped = 0
    for i in range(2):
        for module, name in QUANTIZER_SITES:
            flipped += int((absmax_int8(trace[f"layers.{i}.{name}"])[0] != absmax_int8(ref[f"layers.{i}.{module}"])[0]).sum())
        want = ref[f"layers.{i}.out"]
        rel = float(np.abs(trace[f"layers.{i}.out"] - want).max() / np.abs(want).max())
        print(f"full width layer {i}: relative max|diff| {rel:.1e}, int8 codes flipped so far {flipped}")
        assert rel <= (1e-5 if flipped == 0 else 5e-2)
    rel = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    print(f"full width logits: relative max|diff| {rel:.1e}")
    assert rel <= (1e-5 if flipped == 0 else 5e-2)
