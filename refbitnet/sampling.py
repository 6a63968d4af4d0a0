"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with refbitnet's own RNG.

What it is: pure functions on one row of logits ``[V]`` plus a tiny seeded random number generator
(SplitMix64, integer arithmetic only), so that a seed gives the same sampled sequence on every machine
and every NumPy version: the generator never changes under us the way library generators may.

The pipeline, in the order transformers applies its logits warpers:

    logits [V] --/ temperature--> --top-k--> --top-p--> softmax --inverse CDF at u--> token id

- temperature == 0 means greedy: ``argmax`` (ties go to the lowest id); no random number is drawn.
- top-k keeps every token whose logit is >= the k-th largest (so ties at the k-th value all stay,
  as in transformers' TopKLogitsWarper); ``top_k == 0`` disables it.
- top-p keeps, in order of decreasing probability, each token whose preceding probability mass is
  < top_p: the smallest head of the distribution holding at least ``top_p`` (transformers'
  TopPLogitsWarper, written from the top instead of the bottom); ``top_p == 1`` disables it.
- The draw: one uniform ``u`` in [0, 1) from the RNG; the first kept token, in id order, whose
  cumulative probability exceeds ``u`` (no sort needed; top-p alone sorts, stably).

All arithmetic after the logits is float64. Reproducibility is exact for identical logits, except
that ``np.exp`` may differ by an ulp between platforms, which changes a draw only when ``u`` lands
within about 1e-16 of a cumulative-probability boundary.
"""

from __future__ import annotations

import secrets

import numpy as np

from .errors import RefBitNetError, RefBitNetTypeError

MASK64 = (1 << 64) - 1


class SplitMix64:
    """Steele, Lea & Flood's SplitMix64: a 64-bit counter passed through a bijective mixer.

    Seeded with 1234567 its first outputs are 6457827717110365317, 3203168211198807973, ...
    (the published reference values; tests/test_sampling.py checks them).
    """

    GOLDEN_GAMMA = 0x9E3779B97F4A7C15

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise RefBitNetTypeError(f"seed must be an int, found {type(seed).__name__}")
        self.state = int(seed) & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + self.GOLDEN_GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        """A float in [0, 1): the top 53 bits of the next output, times 2**-53 (exact in float64)."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


# -- argument checks (done once, before any work) ----------------------------------------------

def check_sampling_args(temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    """Raise a RefBitNetError naming the argument if any sampling setting is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise RefBitNetTypeError(f"temperature must be a number, found {type(temperature).__name__}")
    if not np.isfinite(temperature) or temperature < 0:
        raise RefBitNetError(f"temperature must be finite and >= 0 (0 = greedy), found {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise RefBitNetTypeError(f"top_k must be an int, found {type(top_k).__name__}")
    if top_k < 0:
        raise RefBitNetError(f"top_k must be >= 0 (0 = off), found {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating)):
        raise RefBitNetTypeError(f"top_p must be a number, found {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:  # also rejects NaN
        raise RefBitNetError(f"top_p must be in (0, 1] (1 = off), found {top_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise RefBitNetTypeError(f"seed must be an int or None, found {type(seed).__name__}")


# -- one op per function, each on logits [V] ---------------------------------------------------

def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(logits - max) / temperature in float64. Shifting first changes no probability and keeps a
    tiny temperature from overflowing to inf: the largest logit becomes exactly 0."""
    logits = logits.astype(np.float64)                     # [V] float64
    with np.errstate(over="ignore"):                       # overflow -> -inf: probability 0
        return (logits - np.max(logits)) / float(temperature)  # [V], max entry 0


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Logits below the k-th largest become -inf (k == 0 or k >= V: unchanged)."""
    if top_k == 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = np.partition(logits, -top_k)[-top_k]
    return np.where(logits >= kth_largest, logits, -np.inf)


TOP_P_HEAD = 1024   # top-p first tries the 1024 largest logits (a full sort of V=128256 is ~50 ms)


def decreasing_order(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (increasing) reordered by decreasing logit; equal logits keep increasing id (stable)."""
    return ids[np.argsort(-logits[ids], kind="stable")]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))  # -inf -> 0
    return shifted / shifted.sum()


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most probable tokens while the mass before each is < top_p; the rest -> -inf.

    Only the head of the distribution is sorted: every id whose logit is >= the TOP_P_HEAD-th
    largest. Its ids come first in the full decreasing order too, with the same running sums, so if
    the head's total reaches top_p no token outside it can be kept; otherwise sort all tokens.
    """
    if top_p >= 1.0:
        return logits
    probs = softmax(logits)                                # [V]
    finite = np.flatnonzero(logits > -np.inf)              # [C] ids still in play
    head = finite
    if len(finite) > TOP_P_HEAD:
        threshold = np.partition(logits[finite], -TOP_P_HEAD)[-TOP_P_HEAD]
        head = finite[logits[finite] >= threshold]         # [>= TOP_P_HEAD] ids, increasing
    order = decreasing_order(logits, head)                 # most probable first
    mass_through = np.cumsum(probs[order])                 # running sums in that order
    if mass_through[-1] < top_p and len(head) < len(finite):
        order = decreasing_order(logits, finite)           # the head is not enough: sort them all
        mass_through = np.cumsum(probs[order])
    mass_before = mass_through - probs[order]              # mass of the tokens ahead of each
    kept = order[mass_before < top_p]                      # the first token always stays
    filtered = np.full_like(logits, -np.inf)
    filtered[kept] = logits[kept]
    return filtered


def sample_from_logits(logits: np.ndarray, u: float) -> int:
    """Inverse-CDF draw: the first id (in id order) whose cumulative probability exceeds u.

    Id order, as llama2.c's sampler, needs no sort: a full stable sort of 128256 logits would cost
    more than the rest of the step. Removed (-inf) tokens are skipped and can never be drawn."""
    candidates = np.flatnonzero(logits > -np.inf)          # [C] ids still in play, increasing
    cdf = np.cumsum(softmax(logits[candidates]))           # [C] nondecreasing, cdf[-1] ~ 1
    position = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(candidates[min(position, len(candidates) - 1)])


class Sampler:
    """Holds the settings and the RNG; ``sampler(logits [V]) -> token id``.

    ``seed=None`` draws a fresh seed from the operating system (available as ``sampler.seed``, so
    a run can still be repeated).
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None):
        check_sampling_args(temperature, top_k, top_p, seed)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.seed = secrets.randbits(64) if seed is None else int(seed)
        self.rng = SplitMix64(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def filtered_logits(self, logits: np.ndarray) -> np.ndarray:
        """Temperature, then top-k, then top-p: the logits the draw is made from (float64 [V])."""
        scaled = apply_temperature(logits, self.temperature)
        return top_p_filter(top_k_filter(scaled, self.top_k), self.top_p)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise RefBitNetError(f"sampler: logits must have shape [V], found {logits.shape}")
        if np.isnan(logits).any() or np.isposinf(logits).any() or np.isneginf(logits).all():
            raise RefBitNetError(
                "sampler: logits must be finite or -inf with at least one finite entry; found "
                f"{int(np.isnan(logits).sum())} NaN, {int(np.isposinf(logits).sum())} +inf")
        if self.greedy:
            return int(np.argmax(logits))
        return sample_from_logits(self.filtered_logits(logits), self.rng.uniform())
