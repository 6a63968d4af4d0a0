"""The pytest plugin, as another project sees it: installing refbitnet registers the fixtures and the
--refbitnet-model option (pytest11 entry point); each test runs pytest in a fresh directory."""

import os
import subprocess
import sys

import pytest

from test_oracle import files  # noqa: F401

USER_TESTS = r'''
import numpy as np
from hypothesis import given, settings
from refbitnet.testing import strategies as bst


def test_model_and_reference(refbitnet_model, refbitnet_reference, refbitnet_oracle):
    ids = [1, 2, 3]
    ref = refbitnet_reference(ids, integers=True)
    assert ref["logits"].shape == (3, refbitnet_model.config.vocab_size)
    assert ref["layers.0.q_proj.acc"].dtype == np.int32
    assert refbitnet_reference(ids, integers=True) is ref                     # cached
    print("LAYERS", refbitnet_model.config.num_hidden_layers)


def test_golden(refbitnet_golden, refbitnet_oracle):
    g = refbitnet_golden("tq2_0", 16, 256)
    acc = g["xq"].astype(np.int32) @ refbitnet_oracle.decode(g["packed"], "tq2_0", shape=(16, 256))[0].T
    assert refbitnet_oracle.compare_tensor("acc", g["acc"], acc).ok


@settings(max_examples=10)
@given(bst.bitlinear_cases("i2_s"))
def test_strategies(case):
    x, codes, scale = case
    assert codes.shape[1] % 128 == 0
'''


def run_pytest(tmp_path, *args, env=None):
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args,
                           "test_user.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_entry_point_is_registered(tmp_path):
    """Asked from outside the checkout (in it, a stale refbitnet.egg-info from a build can shadow the
    installed metadata, as it would for any package)."""
    code = ("from importlib.metadata import entry_points\n"
            "print({ep.name: ep.value for ep in entry_points(group='pytest11')}.get('refbitnet'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.stdout.strip() == "refbitnet.testing.plugin", run.stderr


def test_fixtures_with_the_shipped_model(tmp_path):
    run = run_pytest(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3 passed" in run.stdout and "LAYERS 4" in run.stdout


def test_model_option_and_environment(tmp_path, files):                    # noqa: F811
    run = run_pytest(tmp_path, "--refbitnet-model", str(files["i2_s"]))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "LAYERS 2" in run.stdout                                          # the 2-layer test model
    run = run_pytest(tmp_path, env={"REFBITNET_MODEL": str(files["checkpoint"])})
    assert run.returncode == 0 and "LAYERS 2" in run.stdout


def test_missing_model_is_a_clear_failure(tmp_path):
    run = run_pytest(tmp_path, "--refbitnet-model", str(tmp_path / "nope.gguf"))
    assert run.returncode == 1
    assert "nope.gguf does not exist (from --refbitnet-model" in run.stdout
    assert "2 passed" in run.stdout                                           # tests without the model still run


@pytest.mark.parametrize("args", [["--help"]])
def test_option_in_help(tmp_path, args):
    run = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=tmp_path, capture_output=True, text=True)
    assert "--refbitnet-model=PATH" in run.stdout
