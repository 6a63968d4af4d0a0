"""refbitnet.kernels (Numba) against the NumPy reference: bit-exact integers and floats, any thread count.

Numerics: "int" form throughout. Accumulators are int32 and compared for equality; the fused BitLinear
epilogue and the bf16 LM head are compared bit for bit (uint32 views) with the reference expressions.
Every ternary kernel is reached through the door, ``TernaryLinear(..., kernel=name)`` (and the one-call
``kernels.ternary_matmul(_acc)``, kernel "auto"); the ladder's unchecked v1/v2 functions are also called
directly. Shapes are small so a run stays fast; the kernels compile once per process (cached on disk).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refbitnet import kernels
from refbitnet.kernels import v6_vnni
from refbitnet.bf16 import bf16_to_f32, f32_to_bf16
from refbitnet.bitlinear import bitlinear_epilogue, bitlinear_int
from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.kernels import KERNELS, TernaryLinear, reference
from refbitnet.kernels.avx2 import available as avx2_available
from refbitnet.kernels.v1_unpacked_int8 import ternary_matmul_acc_v1
from refbitnet.kernels.v2_packed_scalar import ternary_matmul_acc_v2
from refbitnet.kernels.v3_word_planes import MAX_K
from refbitnet.layouts import pack_kernel

from _kernel_testing import MAX_THREADS, bits, restore_threads  # noqa: F401  (restore_threads: autouse fixture)



# --------------------------------------------------------------------------------------- strategies
@st.composite
def ternary_problem(draw, max_s=5, max_n=40, max_k_words=40):
    """(xq int8 [S, K], codes int8 [N, K]) with K % 8 == 0, values drawn to hit the extremes."""
    S = draw(st.integers(1, max_s))
    N = draw(st.integers(1, max_n))
    K = 8 * draw(st.integers(1, max_k_words))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x_kind = draw(st.sampled_from(["uniform", "min", "max", "extremes", "small"]))
    if x_kind == "uniform":
        xq = rng.integers(-128, 128, (S, K))
    elif x_kind == "min":
        xq = np.full((S, K), -128)
    elif x_kind == "max":
        xq = np.full((S, K), 127)
    elif x_kind == "extremes":
        xq = rng.choice([-128, 127], (S, K))
    else:
        xq = rng.integers(-2, 3, (S, K))
    w_kind = draw(st.sampled_from(["uniform", "plus", "minus", "zero", "sparse"]))
    if w_kind == "uniform":
        codes = rng.integers(-1, 2, (N, K))
    elif w_kind == "plus":
        codes = np.ones((N, K))
    elif w_kind == "minus":
        codes = -np.ones((N, K))
    elif w_kind == "zero":
        codes = np.zeros((N, K))
    else:
        codes = rng.choice([-1, 0, 0, 0, 1], (N, K))
    return xq.astype(np.int8), codes.astype(np.int8)


# ----------------------------------------------------------------------------------- integer results
@given(ternary_problem())
def test_accumulators_equal_reference_all_versions(problem):
    xq, codes = problem
    packed = pack_kernel(codes)
    expected = reference.ternary_matmul_acc_reference(xq, packed)                 # [S, N] int32
    np.testing.assert_array_equal(expected, (xq.astype(np.int64) @ codes.T.astype(np.int64)))
    np.testing.assert_array_equal(kernels.ternary_matmul_acc(xq, packed), expected)          # v3
    np.testing.assert_array_equal(ternary_matmul_acc_v1(xq, codes), expected)
    np.testing.assert_array_equal(ternary_matmul_acc_v2(xq, packed), expected)
    for name in runnable_kernels(xq.shape[1]):                                     # the door, each kernel
        np.testing.assert_array_equal(TernaryLinear(packed, kernel=name).acc(xq), expected, err_msg=name)


def runnable_kernels(K):
    """The kernel names TernaryLinear runs for this K on this CPU (v4/v4_blocked/v5: AVX2, K % 128 == 0;
    v6 also AVX512-VNNI)."""
    return [k for k in KERNELS if k not in ("v4", "v4_blocked", "v5", "v6")
            or (avx2_available() and K % 128 == 0 and (k != "v6" or v6_vnni.available()))]


@pytest.mark.parametrize("K", [2560, 6912, MAX_K])
@pytest.mark.parametrize("x", [-128, 127])
@pytest.mark.parametrize("w", [-1, 1])
def test_extreme_sums_beyond_int16(K, x, w):
    """All-(+-1) weights and saturated activations: |acc| = 128 K, far beyond int16; at K = MAX_K v3's
    scaled accumulator 64 * sum(c x) reaches -2**31 exactly, and |acc| = 2**24, the largest integer the
    AVX2 kernels' unit-scale path (acc through float32) returns exactly. Every kernel, S = 1 and S = 5."""
    packed = pack_kernel(np.full((2, K), w, np.int8))
    acc = kernels.ternary_matmul_acc(np.full((1, K), x, np.int8), packed)
    np.testing.assert_array_equal(acc, np.full((1, 2), x * w * K, np.int64))
    for name in runnable_kernels(K):
        if name in ("reference", "v1", "v2") and K == MAX_K:
            continue                                   # (NumPy int64 / scalar loops: slow at this K, no bound)
        for S in (1, 5):
            acc = TernaryLinear(packed, kernel=name).acc(np.full((S, K), x, np.int8))
            np.testing.assert_array_equal(acc, np.full((S, 2), x * w * K, np.int64), err_msg=name)


# --------------------------------------------------------------------------------------- float results
@given(ternary_problem(), st.integers(0, 2**32 - 1), st.sampled_from(["python", "f32", "one", "rows"]))
def test_fused_epilogue_bit_identical(problem, seed, scale_kind):
    xq, codes = problem
    S, N = xq.shape[0], codes.shape[0]
    rng = np.random.default_rng(seed)
    s = (rng.random(S) * 100 + 0.01).astype(np.float32)
    if scale_kind == "python":
        ws = float(rng.random() + 0.01)
    elif scale_kind == "f32":
        ws = np.float32(rng.random() + 0.01)
    elif scale_kind == "one":
        ws = np.array([rng.random() + 0.01], np.float32)
    else:
        ws = (rng.random(N) + 0.01).astype(np.float32)
    packed = pack_kernel(codes)
    acc = reference.ternary_matmul_acc_reference(xq, packed)
    expected = reference.epilogue_reference(acc, s, ws)
    assert expected.dtype == np.float32
    y = kernels.ternary_matmul(xq, s, packed, ws)
    np.testing.assert_array_equal(bits(y), bits(expected))
    np.testing.assert_array_equal(bits(y), bits(bitlinear_epilogue(acc, s, ws)))
    for name in runnable_kernels(xq.shape[1]):
        y = TernaryLinear(packed, ws, kernel=name).matmul(xq, s)
        np.testing.assert_array_equal(bits(y), bits(expected), err_msg=name)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 30), st.integers(1, 20))
def test_matches_bitlinear_int_from_float_activations(seed, S, N, k_words):
    """End to end from float x: absmax_int8 + kernel == refbitnet.bitlinear.bitlinear_int, bit for bit."""
    K = 8 * k_words
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((S, K)) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    codes = rng.integers(-1, 2, (N, K)).astype(np.int8)
    ws = (rng.random(N) + 0.5).astype(np.float32)
    out = bitlinear_int(x, codes, ws)
    np.testing.assert_array_equal(kernels.ternary_matmul_acc(out.xq, pack_kernel(codes)), out.acc)
    np.testing.assert_array_equal(bits(kernels.ternary_matmul(out.xq, out.s, pack_kernel(codes), ws)), bits(out.y))
    for name in runnable_kernels(K):                              # from float x: the door's quantizer + kernel
        np.testing.assert_array_equal(bits(TernaryLinear(pack_kernel(codes), ws, kernel=name)(x)), bits(out.y),
                                      err_msg=name)


# ---------------------------------------------------------------------------------------------- LM head
@st.composite
def head_problem(draw):
    S = draw(st.integers(1, 3))
    V = draw(st.integers(1, 40))
    K = draw(st.integers(1, 80))             # any K: exercises the 16-lane tail
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((S, K)) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    table = f32_to_bf16(rng.standard_normal((V, K)).astype(np.float32) * np.float32(0.05))
    return x, table


@given(head_problem())
def test_bf16_matmul_bit_identical_to_reference(problem):
    x, table = problem
    y = kernels.bf16_matmul(x, table)
    np.testing.assert_array_equal(bits(y), bits(reference.bf16_matmul_reference(x, table)))
    # and close to the exact product: a lane sums ceil(K/16) products, then 15 lane additions, so the
    # error is at most gamma_m * sum|x w| with m = ceil(K/16) + 16 (one rounding per product included)
    w = bf16_to_f32(table).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    m = -(-x.shape[1] // 16) + 16
    u = 2.0 ** -24
    bound = (m * u / (1 - m * u)) * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(y - exact) <= bound)


def test_bf16_matmul_reads_a_read_only_memmap(tmp_path):
    rng = np.random.default_rng(0)
    table = f32_to_bf16(rng.standard_normal((70, 48)).astype(np.float32))
    path = tmp_path / "table.bin"
    table.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=table.shape)
    x = rng.standard_normal((2, 48)).astype(np.float32)
    np.testing.assert_array_equal(bits(kernels.bf16_matmul(x, mapped)), bits(reference.bf16_matmul_reference(x, table)))
    np.testing.assert_array_equal(np.asarray(mapped), table)


# ----------------------------------------------------------------------------------------------- threads
@settings(max_examples=10)
@given(ternary_problem(max_n=200), head_problem())
def test_results_do_not_depend_on_thread_count(problem, head):
    xq, codes = problem
    packed = pack_kernel(codes)
    s = np.linspace(0.5, 3.0, xq.shape[0]).astype(np.float32)
    ws = np.linspace(0.1, 1.0, codes.shape[0]).astype(np.float32)
    x, table = head
    results = []
    for n in sorted({1, MAX_THREADS}):
        kernels.set_num_threads(n)
        assert kernels.get_num_threads() == n
        results.append((kernels.ternary_matmul_acc(xq, packed), bits(kernels.ternary_matmul(xq, s, packed, ws)),
                        bits(kernels.bf16_matmul(x, table)))
                       + tuple(bits(TernaryLinear(packed, ws, kernel=k).matmul(xq, s))
                               for k in runnable_kernels(xq.shape[1])))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_array_equal(a, b)


def test_refbitnet_threads_environment_variable():
    code = "from refbitnet import kernels; print(kernels.get_num_threads())"
    env = dict(os.environ, REFBITNET_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["REFBITNET_THREADS"] = "many"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "REFBITNET_THREADS" in bad.stderr


@pytest.mark.parametrize("n", [0, -1, 10**6, 1.5, "2", True, None])
def test_set_num_threads_rejects(n):
    with pytest.raises(RefBitNetError, match="set_num_threads"):
        kernels.set_num_threads(n)


# ------------------------------------------------------------------------------------------- bad inputs
def _good():
    xq = np.zeros((2, 16), np.int8)
    s = np.ones(2, np.float32)
    packed = pack_kernel(np.zeros((3, 16), np.int8))
    return xq, s, packed


BAD_TERNARY = {
    "xq list": (lambda xq, s, p: (xq.tolist(), s, p, 1.0), RefBitNetTypeError, "xq"),
    "xq int16": (lambda xq, s, p: (xq.astype(np.int16), s, p, 1.0), RefBitNetTypeError, "xq"),
    "xq 1-D": (lambda xq, s, p: (xq[0], s, p, 1.0), RefBitNetError, "xq"),
    "xq 3-D": (lambda xq, s, p: (xq[None], s, p, 1.0), RefBitNetError, "xq"),
    "xq strided": (lambda xq, s, p: (np.zeros((2, 32), np.int8)[:, ::2], s, p, 1.0), RefBitNetError, "contiguous"),
    "xq empty": (lambda xq, s, p: (xq[:0], s[:0], p, 1.0), RefBitNetError, "non-empty"),
    "packed int8": (lambda xq, s, p: (xq, s, p.view(np.int8), 1.0), RefBitNetTypeError, "packed"),
    "packed wrong K": (lambda xq, s, p: (xq, s, np.zeros((3, 5), np.uint8), 1.0), RefBitNetError, "packed"),
    "packed transposed": (lambda xq, s, p: (xq, s, np.zeros((4, 3), np.uint8).T, 1.0), RefBitNetError, "contiguous"),
    "K % 8": (lambda xq, s, p: (np.zeros((2, 12), np.int8), s, np.zeros((3, 3), np.uint8), 1.0), RefBitNetError, "K % 8"),
    "s float64": (lambda xq, s, p: (xq, s.astype(np.float64), p, 1.0), RefBitNetTypeError, "s"),
    "s wrong shape": (lambda xq, s, p: (xq, np.ones(3, np.float32), p, 1.0), RefBitNetError, "s"),
    "scale float64 array": (lambda xq, s, p: (xq, s, p, np.ones(3)), RefBitNetTypeError, "weight_scale"),
    "scale float64 scalar": (lambda xq, s, p: (xq, s, p, np.float64(1)), RefBitNetTypeError, "weight_scale"),
    "scale wrong rows": (lambda xq, s, p: (xq, s, p, np.ones(4, np.float32)), RefBitNetError, "weight_scale"),
    "scale 2-D": (lambda xq, s, p: (xq, s, p, np.ones((3, 1), np.float32)), RefBitNetError, "weight_scale"),
    "scale string": (lambda xq, s, p: (xq, s, p, "1"), RefBitNetTypeError, "weight_scale"),
}


@pytest.mark.parametrize("case", sorted(BAD_TERNARY))
def test_ternary_matmul_rejects_bad_input(case):
    make, error, message = BAD_TERNARY[case]
    xq, s, packed, ws = make(*_good())
    with pytest.raises(error, match=message):
        kernels.ternary_matmul(xq, s, packed, ws)
    if "scale" not in case and not case.startswith("s "):
        with pytest.raises(error, match=message):
            kernels.ternary_matmul_acc(xq, packed)


def test_k_beyond_int32_headroom_is_rejected():
    K = MAX_K + 8
    with pytest.raises(RefBitNetError, match="overflow"):
        kernels.ternary_matmul_acc(np.zeros((1, K), np.int8), np.zeros((1, K // 4), np.uint8))


@pytest.mark.parametrize("x, table, error, message", [
    (np.ones((1, 8), np.float64), np.zeros((4, 8), np.uint16), RefBitNetTypeError, "x"),
    (np.ones(8, np.float32), np.zeros((4, 8), np.uint16), RefBitNetError, "x"),
    (np.ones((1, 8), np.float32), np.zeros((4, 8), np.float32), RefBitNetTypeError, "table"),
    (np.ones((1, 8), np.float32), np.zeros((4, 9), np.uint16), RefBitNetError, "table"),
    (np.ones((1, 8), np.float32), np.zeros((8, 4), np.uint16).T, RefBitNetError, "contiguous"),
])
def test_bf16_matmul_rejects_bad_input(x, table, error, message):
    with pytest.raises(error, match=message):
        kernels.bf16_matmul(x, table)


def test_bf16_matmul_kernel_names():
    x, table = np.ones((1, 24), np.float32), np.zeros((4, 24), np.uint16)
    with pytest.raises(RefBitNetError, match="K % 16"):                 # v2 reads 16 values per step
        kernels.bf16_matmul(x, table, kernel="v2")
    for bad in ("v3", "", None, 2):
        with pytest.raises(RefBitNetError, match="kernel"):
            kernels.bf16_matmul(x, table, kernel=bad)
    for name in ("reference", "v1", "auto"):
        np.testing.assert_array_equal(kernels.bf16_matmul(x, table, kernel=name), np.zeros((1, 4), np.float32))


def test_openmp_threads_wait_passively_unless_told_otherwise():
    code = "import os; from refbitnet import kernels; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "passive"
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "active"


@settings(max_examples=60)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 12), st.integers(0, 2**32 - 1),
       st.sampled_from(["normal", "wide", "special"]))
def test_bf16_matmul_v2_bit_identical_to_reference(S, V, blocks, seed, kind):
    """lm_head_v2 (bf16 widened in registers; K % 16 == 0) against the reference order and against v1, bit
    for bit, with ragged row groups (V % 4 != 0), several tokens, and bf16 infinities, subnormals, -0.0
    and products that overflow (NaN results compared as NaN, their payload is not specified)."""
    from refbitnet.kernels.lm_head import bf16_matmul_v1
    from refbitnet.kernels.lm_head_v2 import bf16_matmul_v2
    K = 16 * blocks
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, K)).astype(np.float32)
    w = rng.standard_normal((V, K)).astype(np.float32)
    if kind == "wide":
        x *= np.float32(10.0) ** rng.integers(-30, 30, (S, K)).astype(np.float32)
        w *= np.float32(10.0) ** rng.integers(-38, 38, (V, K)).astype(np.float32)
    elif kind == "special":
        w.flat[rng.integers(0, w.size, 3)] = rng.choice(np.array([np.inf, -np.inf, -0.0, 1e-39, 3e38], np.float32), 3)
    table = f32_to_bf16(w)
    with np.errstate(over="ignore", invalid="ignore"):          # "wide"/"special" overflow on purpose
        ref = reference.bf16_matmul_reference(x, table)
    for got in (bf16_matmul_v2(x, table), bf16_matmul_v1(x, table), kernels.bf16_matmul(x, table),
                kernels.bf16_matmul(x, table, kernel="v1"), kernels.bf16_matmul(x, table, kernel="v2")):
        nan = np.isnan(ref)
        assert np.array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(bits(got)[~nan], bits(ref)[~nan])
