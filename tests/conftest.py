"""Shared test settings.

- TORCHDYNAMO_DISABLE=1: transformers wraps its BitNet quantizers in torch.compile, which costs
  18 s+ of compiling per process and changes nothing we compare. Set before torch is imported.
- Hypothesis: no per-example deadline (Numba compiles on first call, and the 2-core CI machine is
  shared); under CI=true the examples are derandomized so a run is reproducible.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")
