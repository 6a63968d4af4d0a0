"""compare_tensor's modes and the boundary-flip classifier, on differences whose cause we know."""

import numpy as np
import pytest

from refbitnet import testing as oracle
from refbitnet.errors import RefBitNetError
from refbitnet.quant import Numerics, absmax_int8, absmean_scale, ternary_codes


def test_exact_mode_counts_and_shows_the_first_mismatches():
    ref = np.arange(100, dtype=np.int32).reshape(10, 10)
    cand = ref.copy()
    cand[2, 3] += 1
    cand[7, 0] -= 5
    cand[9, 9] += 2
    check = oracle.compare_tensor("acc", ref, cand, show=2)
    assert check.mode == "exact" and not check.ok                        # integers: exact by default
    assert check.n_differ == 3 and check.n_total == 100
    assert check.mismatches == (((2, 3), 23.0, 24.0), ((7, 0), 70.0, 65.0))
    assert "3 of 100 differ; first at (2, 3): reference 23, candidate 24, at (7, 0): reference 70, " \
           "candidate 65" in check.detail
    assert oracle.compare_tensor("acc", ref, ref).ok
    nan = np.array([1.0, np.nan], np.float32)
    assert oracle.compare_tensor("y", nan, nan.copy(), mode="exact").ok      # NaN where the reference has NaN


def test_ulp_mode():
    r = np.array([1.0, -1.0, 0.0, 3.0, 1e-30], np.float32)
    c = r.copy()
    c[0] = np.nextafter(c[0], np.float32(2))                             # 1 ulp
    c[1] = np.nextafter(np.nextafter(c[1], np.float32(0)), np.float32(0))  # 2 ulps
    c[2] = -np.float32(0.0)                                              # -0 == +0: 0 ulp
    check = oracle.compare_tensor("y", r, c, mode="ulp")
    assert not check.ok and check.max_ulp == 2 and check.n_beyond_ulp == 2
    assert "max 2 ulp (float32), 2 beyond 0" in check.detail
    assert oracle.compare_tensor("y", r, c, mode="ulp", ulps=2).ok
    across = oracle.ulp_distance(np.float32(1e-45), np.float32(-1e-45))   # the two smallest subnormals
    assert across == 2
    assert oracle.ulp_distance(np.float32(1.0), np.float32(1.0078125), "bfloat16") == 1


def test_default_tolerance_passes_reordering_and_fails_a_real_error():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 512)).astype(np.float32)
    b = rng.standard_normal((512, 32)).astype(np.float32)
    ref = a @ b
    reordered = np.stack([sum(a[:, k] * b[k, j] for k in range(512)) for j in range(32)], axis=1)
    assert not np.array_equal(ref, reordered)                            # really different bits
    assert oracle.compare_tensor("y", ref, reordered).ok
    wrong = ref.copy()
    wrong[3, 4] *= 1.0001                                                # 1e-4 relative: a real error
    check = oracle.compare_tensor("y", ref, wrong)
    assert not check.ok and "1 of 2048 outside tolerance" in check.detail


def test_shape_mismatch_raises():
    with pytest.raises(RefBitNetError, match="never reshapes"):
        oracle.compare_tensor("q", np.zeros((4, 2, 8)), np.zeros((4, 16)))
    with pytest.raises(RefBitNetError, match="mode: expected one of"):
        oracle.compare_tensor("q", np.zeros(3), np.zeros(3), mode="close")


def tie_activations(seed):
    """Rows where x * s lands on or within an ulp of .5 ties for many elements."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(32):
        m = np.float32(rng.uniform(0.5, 50))
        s = absmax_int8(np.array([[m]], np.float32))[1][0]
        half = (rng.integers(-126, 126, 200) + 0.5).astype(np.float32)
        x = (half / s).astype(np.float32)                                # x * s ~ k + 0.5
        rows.append(np.concatenate([[m], x]).astype(np.float32))
    return np.stack(rows)


def test_other_numerics_give_only_benign_int8_flips():
    """An implementation with an IEEE scale or half-up ties differs from refbitnet only at .5 ties."""
    x = tie_activations(0)
    for numerics in ("ieee", Numerics(ties="half_up"), "onebitllms"):
        cand, _ = absmax_int8(x, numerics)
        check = oracle.compare_int8_codes("xq", x, cand)
        assert check.ok and check.benign > 0 and check.real == 0, numerics
        assert check.detail.startswith(f"{check.benign} benign boundary flips, 0 real differences")


def test_a_wrong_quantizer_gives_real_differences():
    """On ordinary activations (few near a tie), a wrong rule shows up as real differences. (On
    activations built to sit on ties, every one-apart code is benign by definition.)"""
    x = (np.random.default_rng(1).standard_normal((32, 512)) * 3).astype(np.float32)
    s128 = np.float32(128) / np.abs(x).max(axis=-1)                      # mybitnet: 128, not 127
    cand = np.clip(np.rint(x * s128[:, None]), -128, 127).astype(np.int8)
    check = oracle.compare_int8_codes("xq", x, cand)
    assert not check.ok and check.real > 100
    assert f"{check.benign} benign boundary flips, {check.real} real differences" in check.line()
    per_tensor = np.float32(127) / np.abs(x).max()                      # one scale for the whole tensor
    cand = np.clip(np.rint(x * per_tensor), -128, 127).astype(np.int8)
    assert oracle.compare_int8_codes("xq", x, cand).real > 100


def test_ternary_flips_at_the_threshold():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    gamma = absmean_scale(w)
    w[0, :16] = gamma * np.float32(0.5)                                  # exactly at 0.5 * gamma
    w[1, :16] = np.nextafter(gamma * np.float32(0.5), np.float32(1))      # an ulp above
    half_up = ternary_codes(w, gamma, Numerics(ties="half_up"))
    check = oracle.compare_ternary_codes("w", w, half_up, gamma=gamma)
    assert check.ok and check.benign == 16 and check.real == 0
    flipped = ternary_codes(w, gamma).copy()
    flipped[5, 5] = -flipped[5, 5] if flipped[5, 5] else 1               # a code far from the threshold
    check = oracle.compare_ternary_codes("w", w, flipped, gamma=gamma)
    assert not check.ok and check.real == 1 and check.mismatches[0][0] == (5, 5)
    assert "0 benign boundary flips, 1 real differences" in check.detail
    binary = np.where(w >= 0, 1, -1).astype(np.int8)                     # `bitnet` 0.2.5: binary weights
    assert oracle.compare_ternary_codes("w", w, binary, gamma=gamma).real > 1000


def test_within_is_the_stated_distance():
    ref = np.array([3, 4], np.int8)
    cand = np.array([4, 4], np.int8)
    q = np.array([3.4995, 4.0], np.float32)                              # 5e-4 from the .5 tie
    assert oracle.compare_tensor("xq", ref, cand, quotient=q, codes="int8").ok           # default 2**-10
    assert not oracle.compare_tensor("xq", ref, cand, quotient=q, codes="int8", within=1e-4).ok
    with pytest.raises(RefBitNetError, match="codes: expected"):
        oracle.compare_tensor("xq", ref, cand, quotient=q)
