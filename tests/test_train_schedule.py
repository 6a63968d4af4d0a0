"""The two-stage LR / weight-decay schedules, AdamW against torch.optim.AdamW, and bad settings."""

import math

import numpy as np
import pytest
import torch

from refbitnet.errors import RefBitNetError
from refbitnet.train.optim import AdamW
from refbitnet.train.schedule import TwoStageSchedule


def test_learning_rate_two_stages():
    s = TwoStageSchedule(total_steps=100, peak_lr=3e-3, cooldown_peak_lr=1e-3, final_lr=1e-5, warmup_steps=10)
    lrs = [s.lr(t) for t in range(100)]
    assert s.cooldown == 50                                              # midpoint by default
    assert np.allclose(lrs[:10], 3e-3 * np.arange(1, 11) / 10)           # linear warmup to the peak
    assert lrs[9] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(lrs[9:50], lrs[10:50]))            # stage 1: cosine decay
    # stage 1's cosine spans warmup end .. total_steps, so at the midpoint it is still high
    assert lrs[49] == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * 39 / 90)))
    assert lrs[50] == pytest.approx(1e-3)                                # abrupt cooldown to the lower peak
    assert lrs[50] < 0.6 * lrs[49]                                       # a drop, not a continuation
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:]))               # stage 2: its own cosine
    assert lrs[99] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 49 / 50)))
    assert [s.stage(t) for t in (0, 49, 50, 99)] == [1, 1, 2, 2]


def test_weight_decay_cosine_then_zero():
    s = TwoStageSchedule(total_steps=40, weight_decay_peak=0.1)
    wds = [s.weight_decay(t) for t in range(40)]
    assert wds[0] == pytest.approx(0.1) and max(wds) == pytest.approx(0.1)   # peaks at 0.1
    assert all(a >= b for a, b in zip(wds[:20], wds[1:20]))                  # cosine in stage 1
    assert wds[19] > 0
    assert wds[20:] == [0.0] * 20                                            # none in stage 2


def test_custom_cooldown_step():
    s = TwoStageSchedule(total_steps=10, peak_lr=1.0, cooldown_peak_lr=0.2, cooldown_step=8)
    assert s.lr(7) > 0.2 and s.lr(8) == pytest.approx(0.2) and s.weight_decay(8) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_steps=10, peak_lr=-1e-3), "peak_lr"),
    (dict(total_steps=10, peak_lr=0.0), "peak_lr"),
    (dict(total_steps=10, peak_lr=float("nan")), "peak_lr"),
    (dict(total_steps=10, cooldown_peak_lr=-1.0), "cooldown_peak_lr"),
    (dict(total_steps=10, peak_lr=1e-3, cooldown_peak_lr=2e-3), "cooldown lowers"),
    (dict(total_steps=10, cooldown_step=11), "cooldown after the end"),
    (dict(total_steps=10, cooldown_step=0), "cooldown_step"),
    (dict(total_steps=10, warmup_steps=5), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, weight_decay_peak=-0.1), "weight_decay_peak"),
    (dict(total_steps=10, cooldown_peak_lr=1e-4, final_lr=1e-3), "final_lr"),
])
def test_nonsense_schedules_are_clear_errors(kwargs, match):
    with pytest.raises(RefBitNetError, match=match):
        TwoStageSchedule(**kwargs)


def test_step_outside_the_run_is_an_error():
    s = TwoStageSchedule(total_steps=5)
    with pytest.raises(RefBitNetError, match="0 <= step < total_steps=5"):
        s.lr(5)
    with pytest.raises(RefBitNetError, match="step"):
        s.weight_decay(-1)


def test_adamw_matches_torch():
    """float64, 8 steps with a changing lr and weight decay; torch.optim.AdamW is the reference.
    Bound 1e-13 relative: both compute the same formula, torch updating m by lerp (m + (1-b1)(g-m))
    where we write b1*m + (1-b1)*g, a difference of an ulp or so per step."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((6, 5)), "norm": rng.standard_normal(5)}
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt_ref = torch.optim.AdamW([{"params": [tp["w"]]}, {"params": [tp["norm"]], "weight_decay": 0.0}],
                                betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8)
    for step in range(8):
        grads = {k: rng.standard_normal(v.shape) * 10.0 ** (step % 3 - 1) for k, v in params.items()}
        lr, wd = 1e-2 / (step + 1), 0.1 * (step % 2)
        opt.step(params, grads, lr, wd)
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        for group in opt_ref.param_groups:
            group["lr"] = lr
        opt_ref.param_groups[0]["weight_decay"] = wd
        opt_ref.step()
        for k in params:
            ref = tp[k].detach().numpy()
            err = np.abs(params[k] - ref).max() / np.abs(ref).max()
            assert err <= 1e-13, (step, k, err)
    print(f"\nAdamW vs torch after 8 steps: rel maxdiff {err:.1e}")


def test_adamw_rejects_bad_rates():
    params = {"w": np.zeros((2, 2))}
    opt = AdamW(params)
    with pytest.raises(RefBitNetError, match="lr"):
        opt.step(params, {"w": np.ones((2, 2))}, -1e-3, 0.0)
    with pytest.raises(RefBitNetError, match="weight_decay"):
        opt.step(params, {"w": np.ones((2, 2))}, 1e-3, float("inf"))
