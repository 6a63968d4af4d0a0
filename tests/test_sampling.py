"""refbitnet.sampling: the RNG against published reference values, top-k / top-p against transformers'
logits warpers on the same logits, reproducibility, the draw's distribution, bad arguments."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from refbitnet.errors import RefBitNetError, RefBitNetTypeError
from refbitnet.sampling import (Sampler, SplitMix64, apply_temperature, sample_from_logits, softmax,
                                top_k_filter, top_p_filter)

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


# -- the RNG ---------------------------------------------------------------------------------------

def test_splitmix64_reference_values():
    # SplitMix64 (Steele, Lea, Flood 2014) seeded with 1234567: the values published with the
    # algorithm's reference code (Rosetta Code "Pseudo-random numbers/Splitmix64"), and seed 0.
    rng = SplitMix64(1234567)
    assert [rng.next_u64() for _ in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821]
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_uniform_is_53_bit_in_unit_interval():
    rng = SplitMix64(7)
    values = [rng.uniform() for _ in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert all(v * 2**53 == int(v * 2**53) for v in values)
    assert abs(np.mean(values) - 0.5) < 4 * math.sqrt(1 / 12 / len(values))
    # seeds are taken modulo 2**64
    assert SplitMix64(-1).next_u64() == SplitMix64(2**64 - 1).next_u64()


# -- top-k / top-p against transformers ------------------------------------------------------------

def hf_mask(warper, logits):
    scores = torch.from_numpy(np.asarray(logits)[None, :].copy())
    return np.isneginf(warper(None, scores)[0].numpy())


logit_vectors = hnp.arrays(np.float32, st.integers(1, 40),
                           elements=st.floats(-30, 30, width=32))


@given(logits=logit_vectors, k=st.integers(1, 45))
def test_top_k_matches_transformers(logits, k):
    # exact: the same comparisons against the k-th largest value (ties at it are kept by both)
    ours = np.isneginf(top_k_filter(logits.astype(np.float64), k))
    assert np.array_equal(ours, hf_mask(logits_process.TopKLogitsWarper(top_k=k), logits))


@given(logits=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(-20, 20),
                         unique=True),
       top_p=st.floats(0.01, 1.0))
def test_top_p_matches_transformers(logits, top_p):
    # transformers sums probabilities from the least probable up and removes while the sum is
    # <= 1 - top_p; we sum from the most probable down and keep while the mass before is < top_p.
    # The two sums are the same numbers added in a different order, so they can disagree only by
    # rounding (a few ulp of 1, < 1e-12 for 40 float64 terms): examples whose mass lies within
    # 1e-9 of the threshold are skipped. Logits are unique because transformers' sort is not
    # stable, so ties at the threshold have no defined winner there.
    probs = softmax(logits)
    mass_before = np.cumsum(np.sort(probs)[::-1]) - np.sort(probs)[::-1]
    assume(np.all(np.abs(mass_before - top_p) > 1e-9))
    ours = np.isneginf(top_p_filter(logits, top_p))
    assert np.array_equal(ours, hf_mask(logits_process.TopPLogitsWarper(top_p=top_p), logits))
    assert not ours.all()  # at least one token always stays


@given(logits=hnp.arrays(np.float64, st.integers(2, 30), unique=True,
                         elements=st.integers(-640, 640).map(lambda i: i / 64)),
       temperature=st.floats(0.05, 5.0), k=st.integers(0, 35), top_p=st.floats(0.05, 1.0))
def test_pipeline_matches_transformers_warper_chain(logits, temperature, k, top_p):
    # temperature, then top-k, then top-p, as transformers orders its warpers. We shift by the max
    # before dividing (so a tiny temperature cannot overflow). Logits are multiples of 1/64, so the
    # shift is exact and creates no ties that transformers' order would break differently; the kept
    # set is then the same unless a probability mass lies within rounding (1e-9) of top_p, skipped
    # as above.
    scaled = np.sort(logits / temperature)[::-1]
    if 0 < k < len(scaled):
        scaled = scaled[:k]
    probs = softmax(scaled)
    assume(np.all(np.abs(np.cumsum(probs) - probs - top_p) > 1e-9))
    ours = np.isneginf(Sampler(temperature, k, top_p, seed=0).filtered_logits(logits))
    scores = torch.from_numpy(logits[None, :].copy())
    scores = logits_process.TemperatureLogitsWarper(float(temperature))(None, scores)
    if k > 0:
        scores = logits_process.TopKLogitsWarper(top_k=k)(None, scores)
    scores = logits_process.TopPLogitsWarper(top_p=top_p)(None, scores)
    assert np.array_equal(ours, np.isneginf(scores[0].numpy()))


@given(logits=hnp.arrays(np.float64, st.integers(1, 60), elements=st.integers(-40, 40).map(float)),
       top_p=st.floats(0.01, 1.0), head=st.integers(1, 8))
def test_top_p_head_shortcut_is_exactly_the_full_sort(logits, top_p, head):
    # Integer logits: many ties, including across the head's boundary. Sorting only the head must
    # give bit-identical results to sorting everything (same prefix, same running sums).
    import refbitnet.sampling as sampling
    saved = sampling.TOP_P_HEAD
    try:
        sampling.TOP_P_HEAD = head
        shortcut = top_p_filter(logits, top_p)
        sampling.TOP_P_HEAD = 10**9
        full = top_p_filter(logits, top_p)
    finally:
        sampling.TOP_P_HEAD = saved
    assert np.array_equal(shortcut, full)


@pytest.mark.parametrize("seed, scale, top_p, kept", [
    (0, 5.0, 0.9, 27), (3, 4.0, 0.5, 16), (2, 8.0, 0.99, 1),    # the nucleus is inside the head
    (0, 3.0, 0.9, 4794), (1, 0.3, 0.5, 49039)])                 # it is not: the full sort
def test_top_p_matches_transformers_at_full_vocabulary(seed, scale, top_p, kept):
    # V = 128256 as in 2B4T, on both paths of top_p_filter
    logits = np.random.default_rng(seed).standard_normal(128256) * scale
    ours = np.isneginf(top_p_filter(logits, top_p))
    assert np.array_equal(ours, hf_mask(logits_process.TopPLogitsWarper(top_p=top_p), logits))
    assert (~ours).sum() == kept


def test_top_p_worked_example():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: (~np.isneginf(top_p_filter(logits, p))).nonzero()[0].tolist()  # noqa: E731
    assert kept(0.5) == [0]             # 0.5 before the 2nd token: not < 0.5
    assert kept(0.51) == [0, 1]
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_temperature_shift_keeps_tiny_temperatures_finite():
    # 1 / 1e-310 overflows float64: unshifted, every logit would become inf and softmax NaN
    scaled = apply_temperature(np.array([1.0, 2.0, 3.0], dtype=np.float32), 1e-310)
    assert scaled[2] == 0.0 and np.isneginf(scaled[:2]).all()
    assert Sampler(1e-310, seed=1)(np.array([1.0, 2.0, 3.0])) == 2


# -- the draw --------------------------------------------------------------------------------------

def test_inverse_cdf_draw():
    logits = np.log(np.array([0.2, 0.5, 0.3]))       # id order: cumulative 0.2, 0.7, 1.0
    assert sample_from_logits(logits, 0.0) == 0
    assert sample_from_logits(logits, 0.1999) == 0
    assert sample_from_logits(logits, 0.2001) == 1
    assert sample_from_logits(logits, 0.6999) == 1
    assert sample_from_logits(logits, 0.7001) == 2
    assert sample_from_logits(logits, 1 - 2**-53) == 2
    assert sample_from_logits(np.array([0.0, 0.0, -np.inf]), 0.99) == 1  # never a removed token
    assert sample_from_logits(np.array([-np.inf, 0.0, 0.0]), 0.0) == 1


def test_draws_follow_the_distribution():
    probs = np.array([0.05, 0.4, 0.25, 0.2, 0.1])
    sampler = Sampler(temperature=1.0, seed=2024)
    n = 20000
    counts = np.bincount([sampler(np.log(probs)) for _ in range(n)], minlength=5)
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) < 4.5 * sigma), counts


FIXED_LOGITS = (np.arange(16, dtype=np.float32) * 37 % 11) / 4  # [16] with ties, exact values


def test_same_seed_same_sequence_and_fixed_expected_ids():
    def draw(seed, **kw):
        sampler = Sampler(seed=seed, **kw)
        return [sampler(FIXED_LOGITS) for _ in range(12)]
    assert draw(42, temperature=1.0) == draw(42, temperature=1.0)
    assert draw(42, temperature=1.0) != draw(43, temperature=1.0)
    # Recorded once; a change to the RNG, the draw or the filters shows up here.
    assert draw(42, temperature=1.0) == EXPECTED_T1
    assert draw(7, temperature=0.7, top_k=4, top_p=0.9) == EXPECTED_K4_P09


EXPECTED_T1 = [10, 2, 5, 5, 1, 13, 4, 12, 5, 8, 4, 8]
EXPECTED_K4_P09 = [5, 2, 13, 8, 8, 5, 8, 5, 2, 5, 2, 13]


def test_greedy_is_argmax_lowest_id_and_draws_no_random_number():
    sampler = Sampler(temperature=0.0, seed=5)
    state = sampler.rng.state
    assert sampler(np.array([1.0, 3.0, 3.0, 2.0])) == 1
    assert sampler.rng.state == state


def test_seed_none_picks_a_recorded_seed():
    sampler = Sampler(temperature=1.0)
    again = Sampler(temperature=1.0, seed=sampler.seed)
    assert [sampler(FIXED_LOGITS) for _ in range(5)] == [again(FIXED_LOGITS) for _ in range(5)]


# -- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-0.1), RefBitNetError, "temperature"),
    (dict(temperature=float("nan")), RefBitNetError, "temperature"),
    (dict(temperature=float("inf")), RefBitNetError, "temperature"),
    (dict(temperature="hot"), RefBitNetTypeError, "temperature"),
    (dict(top_k=-1), RefBitNetError, "top_k"),
    (dict(top_k=2.5), RefBitNetTypeError, "top_k"),
    (dict(top_p=0.0), RefBitNetError, "top_p"),
    (dict(top_p=1.5), RefBitNetError, "top_p"),
    (dict(top_p=-0.5), RefBitNetError, "top_p"),
    (dict(top_p=float("nan")), RefBitNetError, "top_p"),
    (dict(seed="s"), RefBitNetTypeError, "seed"),
    (dict(seed=1.5), RefBitNetTypeError, "seed"),
])
def test_bad_sampling_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Sampler(**kwargs)


@pytest.mark.parametrize("logits", [np.array([0.0, np.nan]), np.array([0.0, np.inf]),
                                    np.array([-np.inf, -np.inf]), np.zeros((2, 3)), np.zeros(0)])
def test_bad_logits(logits):
    with pytest.raises(RefBitNetError, match="logits"):
        Sampler(temperature=1.0, seed=0)(logits)
