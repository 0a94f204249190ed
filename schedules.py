"""Scheduled training values, written the way the official DINOv3 configs write them.

Each scheduled number (learning rate, weight decay, teacher temperature and momentum, the Gram and DINO
local-crop weights) is a `Schedule`: a linear warmup from `start` to `peak`, then a half cosine from `peak` to
`end` over `cosine_iterations` (by default until the end of the run), then `end` until the run stops. This is
the official `schedules:` section (`start`, `peak`, `end`, `warmup_epochs`, `cosine_epochs`, in iterations here)
and its `linear_warmup_cosine_decay`, value for value: the warmup excludes its endpoint (step W is the first at
`peak`) and the cosine includes both of its ends (its first step is `peak`, its last `end`).

A constant needs only `peak` (start and end default to it), so `--optim.lr.peak 1e-3` alone changes a constant
learning rate. Every value is a pure function of the step and the run length, so resuming needs only the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    peak: float
    start: float | None = None  # None: no warmup ramp (the peak from step 0)
    end: float | None = None  # None: the peak, constant after the warmup
    warmup_iterations: int = 0
    cosine_iterations: int | None = None  # None: from the end of the warmup to the end of the run

    @property
    def final(self) -> float:
        """The value the schedule ends on (and keeps)."""
        return self.peak if self.end is None else self.end

    def at(self, step: int, total_iterations: int) -> float:
        start = self.peak if self.start is None else self.start
        end = self.final
        if step < self.warmup_iterations:
            return start + (self.peak - start) * step / self.warmup_iterations
        cosine = total_iterations - self.warmup_iterations if self.cosine_iterations is None else self.cosine_iterations
        into = step - self.warmup_iterations
        if into >= cosine:
            return end
        progress = into / (cosine - 1) if cosine > 1 else 0.0
        return cosine_between(self.peak, end, progress)

    def problems(self, name: str) -> list[str]:
        """What makes this schedule impossible, for config validation."""
        problems = []
        if self.warmup_iterations < 0:
            problems.append(f"{name}.warmup_iterations={self.warmup_iterations} must be >= 0")
        if self.cosine_iterations is not None and self.cosine_iterations < 0:
            problems.append(f"{name}.cosine_iterations={self.cosine_iterations} must be >= 0 (or None: to the end)")
        return problems


def constant(value: float) -> Schedule:
    return Schedule(peak=value)


def cosine_between(start: float, end: float, progress: float) -> float:
    """Half cosine from `start` (progress 0) to `end` (progress 1); progress is clamped to [0, 1]."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def sqrt_scaled_lr(base_lr: float, global_batch: int) -> float:
    """The official `sqrt_wrt_1024` scaling rule: the configs' lr values are base values, and the lr a run uses
    is base x 4 sqrt(global batch / 1024). Presets hold the scaled (effective) value for the batch they assume."""
    return base_lr * 4 * math.sqrt(global_batch / 1024)
