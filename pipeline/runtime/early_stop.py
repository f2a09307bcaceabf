"""Early stopping on a validation metric: which eval is the best so far, and when to give up.

Pure bookkeeping (no tensors, no processes): the loop feeds it each eval's value; it says whether
that eval improved on the best by more than `min_delta` (the loop then saves the checkpoint that
is kept as the best) and whether `patience` evals in a row have not (the loop then stops). Its
state goes into every checkpoint's trainer state, so a resumed run judges the next eval exactly
as the uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class EarlyStopper:
    metric: str
    lower_is_better: bool = True
    patience: int = 0
    """Evals in a row without improvement before stopping; 0 = never stop."""
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    best_tag: str | None = None
    """The checkpoint holding the best weights (kept on disk, exported by fine-tuning)."""
    bad_evals: int = 0
    history: list[list] = field(default_factory=list)
    """[step, value] of every eval."""

    def update(self, value: float, step: int) -> bool:
        """Record one eval; True when it is the new best (a non-finite value never is)."""
        self.history.append([step, value])
        if math.isfinite(value) and (self.best is None or self._better(value, self.best)):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def _better(self, value: float, best: float) -> bool:
        if self.lower_is_better:
            return value < best - self.min_delta
        return value > best + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        """What a checkpoint records (the settings come from the config on resume)."""
        d = asdict(self)
        return {k: d[k] for k in ("best", "best_step", "best_tag", "bad_evals", "history")}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state (empty: a fresh start)."""
        for key, value in state.items():
            setattr(self, key, value)

    def summary(self) -> dict:
        """What best.json records."""
        return {
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "tag": self.best_tag,
            "stopped_early": self.should_stop,
            "evals": [{"step": s, self.metric: v} for s, v in self.history],
        }
