"""The two-stage schedules of the BitNet b1.58 2B4T report (section 2.2), as pure functions of the step.

Learning rate::

    stage 1 (steps 0 .. cooldown_step-1): linear warmup to peak_lr, then a cosine that would fall
            from peak_lr to final_lr by total_steps ("high-peak cosine decay")
    stage 2 (cooldown_step .. total_steps-1): the LR drops abruptly to cooldown_peak_lr (lower) and
            follows its own cosine down to final_lr at total_steps

Weight decay: stage 1 follows a cosine with the same horizon as the stage-1 LR, peaking at
weight_decay_peak (0.1 in the report) at step 0; stage 2 uses none (0). The report says only
"a cosine schedule, reaching a peak value of 0.1" for stage 1; we read it as the LR's cosine shape.
"""

import math
from dataclasses import dataclass

from ..errors import RefBitNetError


def cosine(progress: float, start: float, end: float) -> float:
    """Half cosine from start (progress 0) to end (progress 1)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass(frozen=True)
class TwoStageSchedule:
    total_steps: int
    peak_lr: float = 3e-3
    cooldown_peak_lr: float = 1e-3
    final_lr: float = 0.0
    warmup_steps: int = 0
    cooldown_step: int | None = None        # default: total_steps // 2 (the midpoint)
    weight_decay_peak: float = 0.1

    def __post_init__(self):
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise RefBitNetError(f"schedule total_steps: expected a positive integer, found {self.total_steps!r}")
        for name in ("peak_lr", "cooldown_peak_lr", "final_lr", "weight_decay_peak"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise RefBitNetError(f"schedule {name}: expected a finite number >= 0, found {value!r}")
        if self.peak_lr <= 0:
            raise RefBitNetError(f"schedule peak_lr: expected a positive learning rate, found {self.peak_lr!r}")
        if self.cooldown_peak_lr > self.peak_lr:
            raise RefBitNetError(f"schedule cooldown_peak_lr: expected at most peak_lr={self.peak_lr} "
                                 f"(the cooldown lowers the LR), found {self.cooldown_peak_lr}")
        if self.final_lr > self.cooldown_peak_lr:
            raise RefBitNetError(f"schedule final_lr: expected at most cooldown_peak_lr={self.cooldown_peak_lr}, "
                                 f"found {self.final_lr}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise RefBitNetError(f"schedule warmup_steps: expected an integer >= 0, found {self.warmup_steps!r}")
        c = self.cooldown
        if not 0 < c <= self.total_steps:
            raise RefBitNetError(f"schedule cooldown_step: expected a step in (0, total_steps={self.total_steps}], "
                                 f"found {c} (a cooldown after the end of training never happens)")
        if self.warmup_steps >= c:
            raise RefBitNetError(f"schedule warmup_steps: expected fewer than cooldown_step={c}, "
                                 f"found {self.warmup_steps}")

    @property
    def cooldown(self) -> int:
        return self.total_steps // 2 if self.cooldown_step is None else self.cooldown_step

    def _check_step(self, step):
        if not 0 <= step < self.total_steps:
            raise RefBitNetError(f"schedule step: expected 0 <= step < total_steps={self.total_steps}, found {step}")

    def lr(self, step: int) -> float:
        self._check_step(step)
        if step < self.warmup_steps:                                       # stage 1, linear warmup
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.cooldown:                                           # stage 1, high-peak cosine
            span = self.total_steps - self.warmup_steps
            return cosine((step - self.warmup_steps) / span, self.peak_lr, self.final_lr)
        span = self.total_steps - self.cooldown                            # stage 2, lower-peak cosine
        return cosine((step - self.cooldown) / span, self.cooldown_peak_lr, self.final_lr)

    def weight_decay(self, step: int) -> float:
        self._check_step(step)
        if step < self.cooldown:                                           # stage 1: cosine from the peak
            return cosine(step / self.total_steps, self.weight_decay_peak, 0.0)
        return 0.0                                                         # stage 2: none

    def stage(self, step: int) -> int:
        self._check_step(step)
        return 1 if step < self.cooldown else 2
