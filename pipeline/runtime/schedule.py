"""Learning-rate schedules as pure functions of the optimizer step (0-based).

The LR is a function of the step and the schedule's settings alone. Checkpoints record those
settings (the 'lr_schedule' dict) next to the step, so a resume continues the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """LR for optimizer step `step`: linear warmup to `lr`, then decay to `min_lr` at `total_steps`.

    `wsd` (warmup-stable-decay) holds `lr` and decays linearly over the last `decay_fraction`
    of the post-warmup steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # never 0: the first step already learns
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        stable = 1.0 - decay_fraction
        if progress <= stable:
            return lr
        return lr - (lr - min_lr) * (progress - stable) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r}")


def make_lr_fn(spec: dict) -> Callable[[int], float]:
    """step -> lr from a dict with lr_at's keyword arguments (what ds_config puts under 'lr_schedule')."""
    return partial(lr_at, **spec)
