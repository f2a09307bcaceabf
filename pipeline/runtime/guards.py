"""The loss-spike guard: z-scores of the step loss and the gradient norm over a window of steps.

OLMo-core and Megatron watch for loss spikes the same way: a step whose value is far above the
recent mean (in standard deviations of the recent steps) is a spike. The guard logs and counts
them; with `spike_skip` the loop also skips the update of a loss spike, which it can decide
before the optimizer step (the gradient norm is only known after it, so its spikes are counted,
never skipped). The window holds only finite, non-spike values, so one spike does not widen the
band for the next, and no step is judged before the window is full. Its state goes into every
checkpoint, so a resumed run judges steps exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SpikeGuard:
    window: int = 128
    """Values the mean and standard deviation are taken over; 0 = the guard is off."""
    zscore: float = 6.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    loss_spikes: int = 0
    grad_norm_spikes: int = 0

    def z(self, value: float, history: list[float]) -> float | None:
        """(value - mean) / std over the full window; None while the window is not full."""
        if not self.window or len(history) < self.window:
            return None
        mean = sum(history) / len(history)
        std = math.sqrt(sum((h - mean) ** 2 for h in history) / len(history))
        return (value - mean) / max(std, 1e-8 * max(1.0, abs(mean)))  # a flat window still has a band

    def is_loss_spike(self, loss: float) -> bool:
        """Whether a (finite) step loss is a spike; pure, call `record_loss` once the step is done."""
        z = self.z(loss, self.losses)
        return z is not None and z > self.zscore

    def record_loss(self, loss: float, spike: bool) -> None:
        """Count a spike, or add a normal finite loss to the window."""
        if spike:
            self.loss_spikes += 1
        elif math.isfinite(loss):
            self.losses = [*self.losses, loss][-self.window :] if self.window else []

    def check_grad_norm(self, norm: float | None) -> bool:
        """Judge and record an applied step's gradient norm; True when it is a spike (counted)."""
        if norm is None or not math.isfinite(norm) or not self.window:
            return False
        z = self.z(norm, self.grad_norms)
        if z is not None and z > self.zscore:
            self.grad_norm_spikes += 1
            return True
        self.grad_norms = [*self.grad_norms, norm][-self.window :]
        return False

    def state(self) -> dict:
        """The window and counts, for a checkpoint."""
        return {
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "loss_spikes": self.loss_spikes,
            "grad_norm_spikes": self.grad_norm_spikes,
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state (empty: a fresh start)."""
        for key, value in state.items():
            setattr(self, key, value)
