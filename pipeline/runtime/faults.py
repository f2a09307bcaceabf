"""Preemption and failure handling: signals to a coordinated stop, and fault injection for tests.

Slurm (and people) stop jobs with SIGTERM or SIGUSR1. A handler here only records the signal;
the loop asks `StopRequest.agreed()` at every step boundary, which takes the max over all ranks,
so a signal that reached one rank (the deepspeed launcher forwards SIGTERM to one rank at a
time) stops every rank at the same step. The run then saves a checkpoint and exits with
REQUEUE_EXIT_CODE, which a Slurm script (or `RequeueExit=75` in slurm.conf) turns into a requeue;
the run directory's `status.json` says the same for launchers that mangle exit codes.

`GRISTMILL_FAULTS` injects failures for tests (never set it in production), e.g.
`nan_steps=3,5;nan_rank=1;spike_steps=6;spike_scale=1000;crash_save_step=4;step_sleep=0.2`:
  nan_steps        1-based optimizer steps whose loss is multiplied by NaN (on nan_rank, default 0)
  spike_steps      1-based optimizer steps whose loss is multiplied by spike_scale (default 1000) on
                   nan_rank: a loss spike for the spike guard
  crash_save_step  rank nan_rank dies with os._exit(CRASH_EXIT_CODE) while that step's checkpoint is
                   being written (after its files, before `latest` moves)
  step_sleep       seconds to sleep after each step (gives a test time to send a signal)
  main_sleep       seconds rank 0 sleeps at the start of each rank-0-only piece of work (checksums,
                   checkpoint conversion, exports): longer than a short collective timeout, it shows
                   that the other ranks do not wait for it inside a collective
  main_sleep_at    only before these pieces of work (shard_checksums, universal_conversion,
                   init_export, export); default all
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from pipeline import dist

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
"""Exit status after a signal-triggered save: EX_TEMPFAIL (sysexits.h), 'try again later'."""
NONFINITE_EXIT_CODE = 3
"""Exit status after max_nonfinite consecutive non-finite steps (checkpoint and sample indices written)."""
CRASH_EXIT_CODE = 86
"""Exit status of an injected crash (tests only)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM/SIGUSR1; `agreed()` is the max over ranks (collective: all ranks call it)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signum = 0
        self._previous: dict[int, object] = {}
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread (in-process tests): no handler
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame) -> None:
        self.signum = signum  # only a flag: the loop stops at the next step boundary

    def agreed(self) -> int:
        """The signal number any rank received (0: none), the same on every rank."""
        return int(dist.max_floats([self.signum])[0])

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Faults:
    """Injected failures (parsed from GRISTMILL_FAULTS); all off by default."""

    nan_steps: set[int] = field(default_factory=set)
    spike_steps: set[int] = field(default_factory=set)
    spike_scale: float = 1000.0
    nan_rank: int = 0
    crash_save_step: int = 0
    step_sleep: float = 0.0
    main_sleep: float = 0.0
    main_sleep_at: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get("GRISTMILL_FAULTS", "")
        out = cls()
        for item in filter(None, (p.strip() for p in spec.split(";"))):
            key, _, value = item.partition("=")
            if key in ("nan_steps", "spike_steps"):
                setattr(out, key, {int(v) for v in value.split(",") if v})
            elif key == "main_sleep_at":
                out.main_sleep_at = {v for v in value.split(",") if v}
            elif key in ("nan_rank", "crash_save_step"):
                setattr(out, key, int(value))
            elif key in ("step_sleep", "spike_scale", "main_sleep"):
                setattr(out, key, float(value))
            else:
                raise ValueError(f"GRISTMILL_FAULTS: unknown fault {key!r} in {spec!r}")
        if spec:
            log.warning("fault injection is on: %s", out)
        return out

    def loss_factor(self, step: int) -> float:
        """What this rank multiplies the loss of (1-based) optimizer step `step` by: 1, NaN or a spike."""
        if dist.rank() != self.nan_rank:
            return 1.0
        if step in self.nan_steps:
            return float("nan")
        return self.spike_scale if step in self.spike_steps else 1.0

    def crash_in_save(self, step: int) -> None:
        if self.crash_save_step == step and dist.rank() == self.nan_rank:
            log.error("injected crash while writing the checkpoint of step %d", step)
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)

    def after_step(self) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def slow_main(self, what: str) -> None:
        """Rank 0's injected delay before rank-0-only work."""
        if self.main_sleep and (not self.main_sleep_at or what in self.main_sleep_at):
            log.warning("injected %.1f s delay before %s", self.main_sleep, what)
            time.sleep(self.main_sleep)
