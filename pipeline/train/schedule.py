"""Learning-rate schedules as pure functions of the optimizer step (0-based).

Because the LR is a function of the step alone, resuming only needs the step count (DeepSpeed
restores it); there is no scheduler state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial


def lr_at(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine"
) -> float:
    """LR for optimizer step `step`: linear warmup to `lr`, then decay to `min_lr` at `total_steps`."""
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
    raise ValueError(f"unknown schedule {schedule!r}")


def make_lr_fn(spec: dict) -> Callable[[int], float]:
    """step -> lr from a dict with lr_at's keyword arguments (what ds_config puts under 'lr_schedule')."""
    return partial(lr_at, **spec)
