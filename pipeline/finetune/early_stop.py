"""Early stopping on a validation metric: which eval is the best so far, and when to give up.

Pure bookkeeping (no tensors, no processes): the loop feeds it each eval's value; it says whether
that eval improved on the best by more than `min_delta` (the loop then saves the checkpoint that
will be exported) and whether `patience` evals in a row have not (the loop then stops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOWER_IS_BETTER = {"eval_loss": True, "accuracy": False, "macro_f1": False}


@dataclass
class EarlyStopper:
    metric: str
    patience: int = 0
    """Evals in a row without improvement before stopping; 0 = never stop."""
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, value: float, step: int) -> bool:
        """Record one eval; True when it is the new best (a non-finite value never is)."""
        self.history.append((step, value))
        if math.isfinite(value) and (self.best is None or self._better(value, self.best)):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def _better(self, value: float, best: float) -> bool:
        if LOWER_IS_BETTER[self.metric]:
            return value < best - self.min_delta
        return value > best + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def summary(self, tag: str | None, stopped_early: bool) -> dict:
        """What best.json records."""
        return {
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "tag": tag,
            "stopped_early": stopped_early,
            "evals": [{"step": s, self.metric: v} for s, v in self.history],
        }
