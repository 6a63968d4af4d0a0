"""examples/case_study_bitnet_gpu.py without a BitNet checkout or a GPU: the scale-index rule of
microsoft/BitNet's decode kernel, modelled in NumPy on refbitnet's reference, and the script's argument errors.

The kernel itself runs only on a CUDA GPU with a library the user builds; what it measured there is in the
README's case study. Here we check the script's own logic: which rows the kernel's equal-parts scale index
ws[row / (N / ws_num)] gives another part's scale, and that refbitnet's reference with that index differs
from the reference on exactly those rows (bit for bit after bf16 rounding), and nowhere with the true index.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "case_study_bitnet_gpu.py")


@pytest.fixture(scope="module")
def cs():
    spec = importlib.util.spec_from_file_location("case_study_bitnet_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_scale_index_is_equal_parts_of_n(cs):
    idx = cs.kernel_scale_index(3840, 3)
    assert idx.shape == (3840,)
    assert (idx[:1280] == 0).all() and (idx[1280:2560] == 1).all() and (idx[2560:] == 2).all()
    part = cs.part_scale_index([2560, 640, 640])
    assert (part[:2560] == 0).all() and (part[2560:3200] == 1).all() and (part[3200:] == 2).all()


def test_equal_thirds_give_rows_1280_to_3199_another_scale(cs):
    rows = cs.rows_scaled_differently([2560, 640, 640], 3, [0.5, 0.75, 1.25])
    assert np.array_equal(rows, np.arange(1280, 3200))
    assert cs.row_ranges(rows) == "1280-3199"
    # equal scales (gpu/test.py sets every scale to 1) hide it; so does a q/k/v split into equal thirds
    assert cs.rows_scaled_differently([2560, 640, 640], 3, [1.0, 1.0, 1.0]).size == 0
    assert cs.rows_scaled_differently([1280, 1280, 1280], 3, [0.5, 0.75, 1.25]).size == 0
    # the fused gate/up (6912 + 6912, ws_num = 2) and single-scale projections are split correctly
    assert cs.rows_scaled_differently([6912, 6912], 2, [0.5, 0.75]).size == 0
    assert cs.rows_scaled_differently([2560], 1, [0.5]).size == 0


def test_row_ranges(cs):
    assert cs.row_ranges([]) == "none"
    assert cs.row_ranges([3]) == "3"
    assert cs.row_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_inputs_have_bf16_activation_scales(cs):
    from refbitnet.bf16 import round_to_bf16
    from refbitnet.testing import quantize_activations
    x = cs.input_with_bf16_scale(np.random.default_rng(5), 2560, tokens=16)       # [16, 2560]
    s = quantize_activations(x)[1]
    assert x.shape == (16, 2560) and x.dtype == np.float32
    assert np.array_equal(round_to_bf16(s), s)                                      # every s is a bf16 value
    assert len(np.unique(s)) > 1


def test_kernel_rule_on_the_reference_differs_exactly_on_rows_1280_to_3199(cs):
    """refbitnet's reference for the fused q/k/v projection (2B4T: 2560/640/640 rows, K = 2560) with three
    different bf16 scales; the kernel's epilogue modelled as a rule: bf16((acc / s) * ws[row / 1280])."""
    rng = np.random.default_rng(0)
    parts = cs.PROJECTIONS["q/k/v fused (wqkv)"]["parts"]
    codes, scales = cs.ternary_weights(rng, parts, 2560)                          # [3840, 2560], [3]
    assert len(set(scales.tolist())) == 3
    x = cs.input_with_bf16_scale(rng, 2560, tokens=4)                              # [4, 2560]
    row_scales = scales[cs.part_scale_index(parts.values())]                       # [3840]
    ref_bits, out = cs.reference_bf16(x, codes, row_scales)                        # [4, 3840]
    # the true index reproduces the reference bit for bit: the epilogue is the reference's own
    true_bits = cs.epilogue_with_index(out, scales, cs.part_scale_index(parts.values()))
    assert np.array_equal(true_bits, ref_bits)
    # the equal-thirds index changes every output of rows 1280..3199 except where acc = 0, and no other
    ruled = cs.epilogue_with_kernel_index(out, scales, parts.values(), 3)
    bad = ruled != ref_bits                                                        # [4, 3840]
    assert np.array_equal(np.flatnonzero(bad.any(axis=0)), np.arange(1280, 3200))
    inside = bad[:, 1280:3200]
    assert np.array_equal(inside, out.acc[:, 1280:3200] != 0)
    # with every scale 1 (gpu/test.py's setting) the rule agrees with the reference on every row
    ones = np.ones_like(scales)
    ref1, out1 = cs.reference_bf16(x, codes, ones[cs.part_scale_index(parts.values())])
    assert np.array_equal(cs.epilogue_with_kernel_index(out1, ones, parts.values(), 3), ref1)


def _run(*args):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_missing_bitnet_dir_is_a_usage_error():
    r = _run()
    assert r.returncode == 2
    assert "--bitnet-dir" in r.stderr and "required" in r.stderr


def test_wrong_bitnet_dir_says_what_was_expected(tmp_path, cs, capsys):
    assert cs.main(["--bitnet-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--bitnet-dir: expected a checkout of microsoft/BitNet, found no folder" in err
    (tmp_path / "gpu").mkdir()
    assert cs.main(["--bitnet-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gpu/pack_weight.py" in err and str(tmp_path) in err


def test_checkout_without_the_expected_functions_is_refused(tmp_path, cs, capsys):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    for name in ("pack_weight.py", "model.py", "convert_checkpoint.py"):
        (gpu / name).write_text("# not microsoft/BitNet's code\n")
    assert cs.main(["--bitnet-dir", str(tmp_path)]) == 2
    assert "pack_weight.py has no convert_weight_int8_to_int2" in capsys.readouterr().err


def test_kernel_lib_needs_cuda_or_an_existing_file(tmp_path, cs, capsys):
    torch = pytest.importorskip("torch")
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    for name in ("pack_weight.py", "model.py", "convert_checkpoint.py"):
        (gpu / name).write_text("")
    assert cs.main(["--bitnet-dir", str(tmp_path), "--kernel-lib", str(tmp_path / "libbitnet.so")]) == 2
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert "--kernel-lib: expected the library built from gpu/bitnet_kernels" in err
    else:
        assert "--kernel-lib: the decode kernel needs a CUDA GPU" in err
