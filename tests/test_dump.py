"""python -m refbitnet.testing dump: what it writes, and a C program that checks its golden vectors.

The C program (examples/c_golden/golden_check.c) decodes the packed weight, quantizes x, runs a naive
int8 x ternary kernel and the float epilogue, and compares each step bit for bit; it is built with the
system C compiler where there is one (skipped otherwise).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from refbitnet import testing as oracle
from refbitnet.testing.dump import LAYOUT_MULTIPLES, golden_vectors

ROOT = Path(__file__).resolve().parents[1]
C_SOURCE = ROOT / "examples" / "c_golden" / "golden_check.c"
SHAPES = {"codes": (12, 40), "hf": (64, 512), "kernel": (20, 36), "i2_s": (16, 256), "tq2_0": (32, 512),
          "tq1_0": (16, 256), "bitnet_gpu": (32, 64)}


def dump(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "refbitnet.testing", "dump", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def golden_check(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("c") / "golden_check"
    build = subprocess.run([cc, "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-o",
                            str(exe), str(C_SOURCE), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
def test_golden_file_is_the_reference(layout, tmp_path):
    n, k = SHAPES[layout]
    path = tmp_path / "g.safetensors"
    run = dump("golden", "--layout", layout, "--shape", f"{n}x{k}", "--tokens", 5, "--out", path)
    assert run.returncode == 0, run.stderr
    got = load_file(str(path))
    want = golden_vectors(layout, n, k, tokens=5)
    assert set(got) == {"packed", "codes", "weight_scale", "x", "xq", "s", "acc", "y"}
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    ref = oracle.reference_bitlinear(got["x"], got["packed"], layout, shape=(n, k),
                                     weight_scale=got["weight_scale"][0])
    for part in ("y", "acc", "xq", "s"):
        assert np.array_equal(getattr(ref, part), got[part]), part
    assert np.array_equal(oracle.decode(got["packed"], layout, shape=(n, k))[0], got["codes"])
    x, xq = got["x"], got["xq"]
    assert (x[3] == 0).all() and (xq[3] == 0).all()                     # the all-zero row
    assert (np.abs(x[1] * got["s"][1] - np.rint(x[1] * got["s"][1])) == 0.5).sum() > k // 2   # exact ties
    meta = safe_open(str(path), "np").metadata()
    assert meta["layout"] == layout and meta["n"] == str(n) and meta["numerics"] == "torch"


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
def test_c_kernel_is_bit_exact_on_golden_vectors(layout, tmp_path, golden_check):
    n, k = SHAPES[layout]
    path = tmp_path / "g.safetensors"
    assert dump("golden", "--layout", layout, "--shape", f"{n}x{k}", "--out", path).returncode == 0
    run = subprocess.run([str(golden_check), str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("codes", "xq", "s", "acc", "y"):
        assert f"TENSOR OK  {name}" in run.stdout
    assert run.stdout.strip().endswith("golden check passed: bit-equal to refbitnet")


def test_c_check_fails_on_a_wrong_golden_and_on_other_numerics(tmp_path, golden_check):
    """The C check can fail: one accumulator changed, or golden vectors of other numerics (onebitllms'
    half-up ties) against the C kernel's torch rounding."""
    path = tmp_path / "g.safetensors"
    assert dump("golden", "--layout", "i2_s", "--shape", "16x256", "--out", path).returncode == 0
    g = load_file(str(path))
    g["acc"][0, 3] += 1
    meta = safe_open(str(path), "np").metadata()
    save_file(g, str(tmp_path / "bad.safetensors"), metadata=meta)
    run = subprocess.run([str(golden_check), str(tmp_path / "bad.safetensors")], capture_output=True, text=True)
    assert run.returncode == 1 and "TENSOR NOT OK  acc    1 of 64 differ" in run.stdout
    assert dump("golden", "--layout", "i2_s", "--shape", "16x256", "--numerics", "onebitllms",
                "--out", tmp_path / "ob.safetensors").returncode == 0
    run = subprocess.run([str(golden_check), str(tmp_path / "ob.safetensors")], capture_output=True, text=True)
    assert run.returncode == 1 and "TENSOR NOT OK  xq" in run.stdout            # the tie row rounds up there
    run = subprocess.run([str(golden_check), str(tmp_path / "missing.safetensors")], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "cannot open" in run.stderr


def test_activations_file_holds_every_trace_tensor_and_the_integers(tmp_path):
    ids = [0, 5, 77, 301, 12, 9]
    path = tmp_path / "a.safetensors"
    run = dump("activations", "--ids", ",".join(map(str, ids)), "--out", path)
    assert run.returncode == 0, run.stderr
    got = load_file(str(path))
    model = oracle.load_reference_model(None)
    n_layers = model.config.num_hidden_layers
    assert set(got) == set(oracle.trace_names(n_layers, integers=True)) | {"ids"}
    assert np.array_equal(got["ids"], ids)
    want = oracle.reference_activations(model, np.array(ids), integers=True)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert got["layers.0.down_proj.acc"].shape == (len(ids), model.config.hidden_size)
    assert got["layers.0.q_proj.xq"].dtype == np.int8 and got["layers.0.q_proj.s"].shape == (len(ids),)
    meta = safe_open(str(path), "np").metadata()
    assert meta["kind"] == "activations" and '"num_hidden_layers": %d' % n_layers in meta["config"]


def test_integers_from_the_model_equal_integers_recomputed_from_its_trace():
    """The model's own trace_integers and the oracle's derivation (refbitnet.bitlinear on the traced
    inputs and the model's codes) agree bit for bit: the derivation is exact."""
    from refbitnet.bitlinear import bitlinear_int
    from refbitnet.testing.reference import INTEGER_PARTS, PROJECTION_INPUTS

    def _add_integers(model, trace):             # xq, s, acc of each projection from its traced input
        for i, layer in enumerate(model.weights.layers):
            for proj, source in PROJECTION_INPUTS.items():
                w = getattr(layer, proj)
                out = bitlinear_int(trace[f"layers.{i}.{source}"], w.codes(), w.weight_scale)
                for part in INTEGER_PARTS:
                    trace[f"layers.{i}.{proj}.{part}"] = getattr(out, part)

    model = oracle.load_reference_model(None)
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    trace = oracle.reference_activations(model, ids, integers=True)
    derived = oracle.reference_activations(model, ids)
    _add_integers(model, derived)
    assert set(derived) == set(trace)
    for name in trace:
        assert np.array_equal(trace[name], derived[name]), name


def test_command_errors(tmp_path):
    assert dump().returncode == 2                                       # no kind: usage, not a silent 0
    run = dump("golden", "--layout", "i2_s", "--shape", "16x100", "--out", tmp_path / "g.safetensors")
    assert run.returncode == 2 and "divisible by 128" in run.stderr
    run = dump("golden", "--layout", "i2_s", "--shape", "16", "--out", tmp_path / "g.safetensors")
    assert run.returncode == 2 and "expected NxK" in run.stderr
    run = dump("activations", "--ids", "1,x", "--out", tmp_path / "a.safetensors")
    assert run.returncode == 2 and "comma-separated token ids" in run.stderr
    run = dump("activations", "--ids", "99999999", "--out", tmp_path / "a.safetensors")
    assert run.returncode == 2 and "error: ids" in run.stderr
    assert set(LAYOUT_MULTIPLES) == set(oracle.LAYOUTS)
    assert os.path.exists(C_SOURCE)
