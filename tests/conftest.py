"""Shared test settings.

- TORCHDYNAMO_DISABLE=1: transformers wraps its BitNet quantizers in torch.compile, which costs
  18 s+ of compiling per process and changes nothing we compare. Set before torch is imported.
- OPENBLAS_NUM_THREADS=1: the tests multiply tiny matrices; on a 2-core machine a multi-threaded
  BLAS spends more time waking and spinning its threads than computing (measured up to 70x slower
  under load). The Numba kernels have their own threads and are unaffected.
- Hypothesis: no per-example deadline (Numba compiles on first call, and the 2-core CI machine is
  shared); under CI=true the examples are derandomized so a run is reproducible.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny matmuls: its worker threads would only spin (0.2 s per
    forward on a busy 2-core machine). Modules opt in: pytestmark = pytest.mark.usefixtures(...)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
