"""refbitnet's pytest plugin: installing refbitnet is enough (a ``pytest11`` entry point loads it).

Fixtures for a test suite that checks BitNet code against refbitnet:

- ``refbitnet_model`` (session): the reference Model, loaded once, from ``--refbitnet-model PATH`` (a model
  directory or .gguf file), else the ini option ``refbitnet_model``, else the environment variable
  ``REFBITNET_MODEL``, else the model shipped with refbitnet (a small one, for tests of the plumbing).
  A PATH that does not exist fails the tests that use it, with the reason.
- ``refbitnet_reference`` (session): ``reference(ids, integers=False)`` -> {name: array}, every trace
  tensor of refbitnet_model for those token ids (cached per ids).
- ``refbitnet_golden``: ``golden(layout, n, k, tokens=4, seed=0, numerics=None)`` -> golden vectors of
  one BitLinear (refbitnet.testing.dump.golden_vectors: packed, codes, weight_scale, x, xq, s, acc, y).
- ``refbitnet_oracle``: the refbitnet.testing module.

Importing this module costs only pytest: refbitnet itself is imported by the fixtures that use it.
"""

from __future__ import annotations

import os

import pytest

ENV = "REFBITNET_MODEL"


def pytest_addoption(parser):
    group = parser.getgroup("refbitnet", "refbitnet oracle")
    group.addoption("--refbitnet-model", action="store", default=None, metavar="PATH",
                    help=f"model directory or .gguf file for the refbitnet_model fixture (or ${ENV}; "
                         f"default: the model shipped with refbitnet)")
    parser.addini("refbitnet_model", "model directory or .gguf file for the refbitnet_model fixture",
                  default=None)


def model_path(config):
    """The model the options name, or None for refbitnet's shipped model."""
    return (config.getoption("--refbitnet-model") or config.getini("refbitnet_model") or os.environ.get(ENV)
            or None)


def pytest_report_header(config):
    return f"refbitnet model: {model_path(config) or 'the shipped model'}"


@pytest.fixture(scope="session")
def refbitnet_oracle():
    from refbitnet import testing
    return testing


@pytest.fixture(scope="session")
def refbitnet_model(request):
    from refbitnet.errors import RefBitNetError
    from refbitnet.testing import load_reference_model
    path = model_path(request.config)
    if path is not None and not os.path.exists(path):
        pytest.fail(f"refbitnet_model: {path} does not exist (from --refbitnet-model, the refbitnet_model ini "
                    f"option or ${ENV})", pytrace=False)
    try:
        return load_reference_model(path)
    except RefBitNetError as e:
        pytest.fail(f"refbitnet_model: cannot load {path or 'the shipped model'}: {e}", pytrace=False)


@pytest.fixture(scope="session")
def refbitnet_reference(refbitnet_model):
    import numpy as np

    from refbitnet.testing import reference_activations
    cache: dict = {}

    def reference(ids, integers: bool = False):
        from refbitnet.testing.arrays import as_array
        key = (tuple(int(i) for i in np.asarray(as_array(ids, "ids")).reshape(-1)), bool(integers))
        if key not in cache:
            cache[key] = reference_activations(refbitnet_model, np.array(key[0]), integers=integers)
        return cache[key]
    return reference


@pytest.fixture
def refbitnet_golden():
    from refbitnet.testing.dump import golden_vectors
    return golden_vectors
