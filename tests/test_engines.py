"""Engine conformance (pytest -m engines): refbitnet's exports of the shipped model in upstream llama.cpp.

Builds llama.cpp from the llama-cpp-python sdist on PyPI (benchmarks/engine_conformance.py; the build is
cached under ~/.cache/refbitnet) and asserts what refbitnet documents, so that a change upstream (a
"bitnet-b1.58" architecture, an I2_S type, a ReLU² FFN for "bitnet") makes these tests fail and the
documentation can follow:

- "bitnet-b1.58" files (every layout's default) are refused: upstream does not know the name;
- I2_S files are refused whatever their name;
- "bitnet" TQ2_0 / TQ1_0 files load and compute a SiLU-gated FFN: every intermediate up to layer 0's
  FFN activation agrees with refbitnet's trace, that activation is the first to diverge, the engine's
  own gate/up tensors reproduce its FFN output through silu(gate) * up and not relu(gate)² * up, and
  greedy text parts from refbitnet's;
- embeddings rewritten by the engine's own quantizer (Q8_0, Q6_K, Q4_K) import into refbitnet.
Skipped where the sdist cannot be fetched or cmake / a C compiler is missing.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engines
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import engine_conformance as EC  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("cc") is None:
        pytest.skip("cmake and a C compiler are needed to build llama.cpp")
    try:
        llama_src = EC.fetch_sdist(None)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"the llama-cpp-python sdist could not be fetched: {e}")
    build = EC.build_llama(llama_src)
    runner = EC.build_runner(llama_src, build)
    return EC.run_conformance(runner, n_tokens=16, workdir=tmp_path_factory.mktemp("engines"))


def by_file(results, layout, arch):
    return next(f for f in results["files"] if (f["layout"], f["arch"]) == (layout, arch))


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_bitnet_b158_is_refused(results, layout):
    f = by_file(results, layout, "bitnet-b1.58")
    assert f["status"] == "refused"
    assert "unknown model architecture: 'bitnet-b1.58'" in f["reason"]


@pytest.mark.parametrize("arch", ["bitnet-b1.58", "bitnet"])
def test_i2s_is_refused_under_any_name(results, arch):
    """Upstream's ggml has no I2_S: its type id 36 is a removed type of block size 0."""
    f = by_file(results, "i2_s", arch)
    assert f["status"] == "refused"
    assert "of type 36" in f["reason"], f["reason"]


@pytest.mark.parametrize("layout", ["tq2_0", "tq1_0"])
def test_bitnet_loads_and_computes_a_silu_ffn(results, layout):
    f = by_file(results, layout, "bitnet")
    assert f["status"] == "loaded"
    *agree, first = f["tensors"]
    assert len(agree) >= 8 and all(r["rel"] is not None and r["rel"] <= EC.DIVERGED for r in agree), agree
    assert first["tensor"] == "layers.0.ffn_act" and first["rel"] > EC.DIVERGED
    act = f["ffn_activation"]
    assert act["silu_rel"] < 1e-3 < act["relu2_rel"], act
    assert any(p["first_divergence"] is not None for p in f["prompts"])
    assert max(p["max_abs_logit_diff"] for p in f["prompts"]) > 1.0


def test_everything_documented_holds(results):
    assert EC.expectations(results) == []


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q4_K"])
def test_tables_from_the_engines_quantizer_import(results, name):
    """llama_model_quantize (llama-quantize's library call) rewrites an export's embedding: refbitnet
    reads the file back with the same ternary codes and scales, and the table as exactly gguf's
    dequantization rounded to bf16; Q8_0 (ggml's reference quantizer) within its stated bound."""
    t = next(t for t in results["tables"] if t["type"] == name)
    assert t["quantized"] and t["codes_identical"] and t["exactly_gguf_dequantize"], t
    assert t["table_dtype"] == "uint16"
    if name == "Q8_0":
        assert t["within_q8_0_bound"]
