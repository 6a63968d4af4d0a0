"""The case-study scripts of examples/ run (--small shapes) against the third-party code installed here,
and fail (exit 2, one error line) on a path that is not that code. The full-size runs and their output
are quoted in the README."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def test_gguf_tq():
    pytest.importorskip("gguf")
    done = run("case_study_gguf_tq.py", "--small")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("bytes equal") == 8 and done.stdout.count("dequantize equal") == 8
    assert "real differences" in done.stdout and "verdict: TQ1_0/TQ2_0 pack refbitnet's codes bit for bit" in done.stdout


def test_transformers():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    done = run("case_study_transformers.py", "--small")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "DIFF" not in done.stdout and done.stdout.count("OK  ") >= 12
    assert "verdict: transformers' BitNet quantizers are refbitnet's numerics presets bit for bit" in done.stdout


def test_onebitllms():
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("onebitllms")
    if spec is None:
        pytest.skip("onebitllms is not installed")
    done = run("case_study_onebitllms.py", "--small", "--onebitllms", os.path.dirname(spec.origin))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "DIFF" not in done.stdout and "ties to even: " in done.stdout and "benign boundary flips" in done.stdout


@pytest.mark.parametrize("script, args", [("case_study_gguf_tq.py", ["--gguf-py"]),
                                          ("case_study_transformers.py", ["--transformers"]),
                                          ("case_study_onebitllms.py", ["--onebitllms"])])
def test_wrong_path_is_one_error_line(script, args, tmp_path):
    done = run(script, *args, tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
