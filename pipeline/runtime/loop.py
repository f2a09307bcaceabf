"""The training loop every task runs in (pretraining, SFT, LoRA, classification, ...).

Per optimizer step: take this rank's micro batches of the step from the task (fetched in a
background thread while the previous step trained), count the step's targets on all ranks,
forward/backward each micro batch normalised by that count, and step. Before the last backward
the step's loss is summed over ranks (the one host sync of a step): a loss that is not finite on
any rank, or (with `spike_skip`) a loss spike, makes every rank skip the update before it happens
(engine.py says how); `max_nonfinite` non-finite steps in a row stop the run with a checkpoint and
the offending sample indices. Every `log_every` steps a metrics row, every `eval_every` the task's
validation metrics (early stopping and the best checkpoint follow `early_stop_metric`), extra
evaluators (lm-eval tasks in pretraining) on their own cadence, every `save_every` (and at the
end) a checkpoint, with its duration in a metrics row (`save_s`: the preemption lead time must
cover it). SIGTERM/SIGUSR1 stop every rank at the next step boundary with a checkpoint and
REQUEUE_EXIT_CODE. The set-up around it (resume, status.json) is
in trainer.py; no DeepSpeed in here.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline import dist
from pipeline.errors import ConfigError
from pipeline.io import write_json
from pipeline.log import progress
from pipeline.runtime import checkpoint, telemetry
from pipeline.runtime.checkpoint import TrainerState
from pipeline.runtime.config import BatchConfig, LoopConfig
from pipeline.runtime.early_stop import EarlyStopper
from pipeline.runtime.engine import Engine, device_name, peak_memory_mib
from pipeline.runtime.faults import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, Faults, StopRequest
from pipeline.runtime.guards import SpikeGuard
from pipeline.runtime.metrics import MetricsWriter
from pipeline.runtime.task import Task

log = logging.getLogger(__name__)
PARITY_TOKENS = 32  # length of the fixed batch whose logits every checkpoint records for export


class Evaluator(Protocol):
    """An evaluation besides the task's own, run every `every` steps and at the last step (collective:
    every rank calls it); returns metrics for the run's metrics row of that step."""

    every: int

    def __call__(self, engine: Engine) -> dict[str, float]: ...


@dataclass
class LoopSettings:
    """What the loop needs besides the task and the engine."""

    run_dir: Path
    batch: BatchConfig
    loop: LoopConfig
    max_steps: int
    precision: str
    flops_per_token: float = 0.0
    """Training FLOPs per token of the model, for TFLOP/s and MFU (0: not known)."""
    evaluators: list[Evaluator] = field(default_factory=list)


@dataclass
class LoopResult:
    """How the loop ended: status is completed, preempted or stopped_nonfinite."""

    state: TrainerState
    status: str = "completed"
    exit_code: int = 0
    signal: int = 0


@dataclass
class Window:
    """Sums since the last metrics row (over all ranks)."""

    loss_sum: float = 0.0
    targets: float = 0.0
    tokens: float = 0.0
    data_wait: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class StepOutcome:
    """One step as seen by every rank (all numbers already summed over ranks)."""

    loss_sum: float
    targets: float
    tokens: float
    nonfinite: bool
    spike: bool
    skipped: bool


class Prefetcher:
    """Fetches step s+1's micro batches in a background thread while step s trains.

    The task's batches are a pure function of the step, so what is fetched ahead is exactly what
    the step would have fetched itself: prefetching changes the timing, never the data.
    """

    def __init__(self, task: Task, dp_rank: int, dp_size: int):
        self._fetch = lambda step: task.micro_batches(step, dp_rank, dp_size)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gristmill-prefetch")
        self._next: tuple[int, Future] | None = None

    def get(self, step: int) -> list[dict]:
        """Step `step`'s micro batches (waiting for the background fetch); starts fetching the next."""
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._fetch(step)
        self._next = (step + 1, self._pool.submit(self._fetch, step + 1))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Loop:
    """Runs one task's optimizer steps with evals, checkpoints, guards and metrics (collective)."""

    def __init__(
        self,
        settings: LoopSettings,
        task: Task,
        engine: Engine,
        state: TrainerState,
        metrics: MetricsWriter,
        stop: StopRequest,
        faults: Faults,
        *,
        resumed: bool = False,
    ):
        self.s, self.task, self.engine, self.state = settings, task, engine, state
        self.metrics, self.stop, self.faults = metrics, stop, faults
        cfg = settings.loop
        self.stopper = _stopper(cfg, task)
        if self.stopper is not None:
            self.stopper.restore(state.early_stop)
        self.guard = SpikeGuard(cfg.spike_window, cfg.spike_zscore)
        self.guard.restore(state.spike)
        self.saved_at = state.step if resumed else -1
        self.bad_steps: list[dict] = []
        self.window = Window()
        self.last_grad_norm: float | None = None
        self.start = time.perf_counter()
        self.prefetch = Prefetcher(task, engine.dp_rank, engine.dp_size)
        self.bar = progress(
            total=settings.max_steps, initial=state.step, desc=task.name, unit="step", enabled=cfg.progress
        )
        self.peak = telemetry.peak_tflops(device_name(), settings.precision, cfg.peak_tflops)
        self._parity_ids: torch.Tensor | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stopper is not None and self.stopper.should_stop

    def run(self) -> LoopResult:
        cfg, state = self.s.loop, self.state
        while state.step < self.s.max_steps and not self.stopped_early:
            self.train_step()
            last = state.step == self.s.max_steps
            if state.step % cfg.log_every == 0 or last:
                self.log_window()
            t_aside = time.perf_counter()
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
                self.evaluate()
                last = last or self.stopped_early
            for ev in self.s.evaluators:
                if (ev.every and state.step % ev.every == 0) or last:
                    self.run_evaluator(ev)
            if (
                (cfg.save_every and state.step % cfg.save_every == 0) or last
            ) and self.saved_at != state.step:
                self.save()
            self.window.t0 += time.perf_counter() - t_aside  # throughput counts training time only
            if state.nonfinite_in_row >= cfg.max_nonfinite:
                return self.stop_nonfinite()
            signum = self.stop.agreed()  # after eval and save too: a signal during them still counts
            if signum and not last:
                if self.saved_at != state.step:
                    self.save()
                log.warning(
                    "signal %d: stopped at step %d with a checkpoint; exit %d",
                    signum,
                    state.step,
                    REQUEUE_EXIT_CODE,
                )
                return LoopResult(state, "preempted", REQUEUE_EXIT_CODE, signum)
        return LoopResult(state)

    # ------------------------------------------------------------ one step

    def train_step(self) -> None:
        """One optimizer step (or one agreed skip) over the next global batch."""
        state, engine, task = self.state, self.engine, self.task
        t0 = time.perf_counter()
        micro = self.prefetch.get(state.step)
        self.window.data_wait += time.perf_counter() - t0
        local = [sum(task.count_targets(b) for b in micro), sum(b["input_ids"].numel() for b in micro)]
        targets, tokens = (x / engine.tp_size for x in dist.sum_floats(local))  # TP ranks share a batch
        normalizer = max(targets, 1.0)  # a step without targets (only truncated prompts) changes nothing
        factor = self.faults.loss_factor(state.step + 1)
        step_sum = None  # this rank's loss sum, kept on the device: no host sync per micro batch
        for i, mb in enumerate(micro):
            loss = task.loss_sum(engine, mb)
            if factor != 1.0:
                loss = loss * factor
            step_sum = loss.detach().double() if step_sum is None else step_sum + loss.detach().double()
            if i < len(micro) - 1:
                engine.backward(loss, normalizer)
        outcome = self.judge(step_sum, targets, tokens, normalizer)
        engine.backward(loss, normalizer, skip=outcome.skipped)
        result = engine.step()
        if outcome.nonfinite is False and not outcome.skipped and not result.applied:
            outcome.nonfinite = self.s.precision != "fp16"  # inf/NaN gradients at a finite loss
        if outcome.nonfinite and result.applied:
            raise RuntimeError(f"step {state.step + 1}: non-finite step but the update was applied")
        self.record_step(outcome, result)
        self.faults.after_step()

    def judge(self, step_sum: torch.Tensor, targets: float, tokens: float, normalizer: float) -> StepOutcome:
        """Sum the step's loss over ranks (one sync) and decide, on every rank alike, whether to skip."""
        stats = torch.stack([step_sum, (~torch.isfinite(step_sum)).double()])
        loss_sum, bad = (x / self.engine.tp_size for x in dist.all_reduce_sum_(stats).tolist())
        nonfinite = bad > 0 or not math.isfinite(loss_sum)
        spike = not nonfinite and self.guard.is_loss_spike(loss_sum / normalizer)
        skipped = nonfinite or (spike and self.s.loop.spike_skip)
        return StepOutcome(loss_sum, targets, tokens, nonfinite, spike, skipped)

    def record_step(self, out: StepOutcome, result) -> None:
        state, w = self.state, self.window
        step = state.step + 1
        w.tokens += out.tokens
        if out.nonfinite:
            state.nonfinite_skips += 1
            state.nonfinite_in_row += 1
            self.bad_steps.append(self.offending(step, state.consumed_samples))
            log.warning(
                "step %d: non-finite loss/grad norm on some rank; update skipped (%d in a row)",
                step,
                state.nonfinite_in_row,
            )
        else:
            state.nonfinite_in_row = 0
            self.guard.record_loss(out.loss_sum / max(out.targets, 1.0), out.spike)
            if out.spike:
                log.warning(
                    "step %d: loss spike (%.4g, %.1f sigma above the last %d steps)%s; samples %s",
                    step,
                    out.loss_sum / max(out.targets, 1.0),
                    self.guard.z(out.loss_sum / max(out.targets, 1.0), self.guard.losses) or 0.0,
                    self.guard.window,
                    ", update skipped" if out.skipped else "",
                    self.offending(step, state.consumed_samples)["global_samples"],
                )
            if out.skipped:
                state.spike_skips += 1
            else:
                if not result.applied:
                    state.loss_scale_skips += 1  # fp16 overflow at a finite loss: the scaler halves
                w.loss_sum += out.loss_sum
                w.targets += out.targets
                state.consumed_tokens += int(out.targets)
            if result.applied and self.guard.check_grad_norm(result.grad_norm):
                log.warning("step %d: gradient-norm spike (%.4g)", step, result.grad_norm)
        state.loss_scale = self.engine.loss_scale
        self.last_grad_norm = result.grad_norm
        state.step = step
        state.consumed_samples += self.s.batch.global_size
        self.bar.update(1)

    def offending(self, step: int, start: int) -> dict:
        """The global sample range of a skipped step and the task's samples it maps to."""
        return {
            "step": step,
            "global_samples": [int(start), int(start + self.s.batch.global_size)],
            "sample_indices": [int(i) for i in self.task.step_samples(step - 1)],
        }

    # ------------------------------------------------------------ rows, evals, checkpoints

    def log_window(self) -> None:
        """One metrics row with the mean loss per target since the last row (collective)."""
        w, state = self.window, self.state
        wait, mem = dist.max_floats([w.data_wait, peak_memory_mib()])
        dt = max(time.perf_counter() - w.t0, 1e-9)
        world = self.engine.world_size
        tok_s = w.tokens / dt
        tflops = tok_s * self.s.flops_per_token / world / 1e12  # per device
        row = {
            "step": state.step,
            "loss": w.loss_sum / w.targets if w.targets else float("nan"),
            "lr": self.engine.lr,
            "grad_norm": self.last_grad_norm,
            "loss_scale": state.loss_scale,
            "tokens": state.consumed_tokens,
            "samples": state.consumed_samples,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / world,
            "tflops_per_device": tflops,
            "mfu": telemetry.mfu(tflops, self.peak) if self.s.flops_per_token else "n/a",
            "data_wait_s": wait,
            "mem_peak_mib": mem,
            "skipped_nonfinite": state.nonfinite_skips,
            "skipped_loss_scale": state.loss_scale_skips,
            "skipped_spikes": state.spike_skips,
            "spikes_loss": self.guard.loss_spikes,
            "spikes_grad_norm": self.guard.grad_norm_spikes,
            "elapsed_s": time.perf_counter() - self.start,
            **self.task.train_metrics(),
        }
        self.metrics.write(row)
        mfu = row["mfu"] if isinstance(row["mfu"], str) else f"{row['mfu']:.1%}"
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  mfu %s",
            state.step,
            self.s.max_steps,
            row["loss"],
            row["lr"],
            tok_s,
            mfu,
        )
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
        self.window = Window()

    def evaluate(self) -> None:
        """The task's validation metrics; a new best is saved at once (and kept as the best)."""
        result = self.task.evaluate(self.engine)
        if result is None:
            return
        step = self.state.step
        self.metrics.write({"step": step, **result})
        log.info("step %d  eval %s", step, {k: round(v, 4) for k, v in result.items()})
        if self.stopper is None:
            return
        if self.stopper.update(result[self.stopper.metric], step):
            self.stopper.best_tag = checkpoint.tag_for(step)
            self.save()
        if self.stopper.should_stop:
            log.info(
                "early stop at step %d: best %s %.4f at step %d",
                step,
                self.stopper.metric,
                self.stopper.best,
                self.stopper.best_step,
            )
            self.metrics.write({"event": "early_stop", "step": step, "best_step": self.stopper.best_step})
        if dist.is_main():
            write_json(self.s.run_dir / "best.json", self.stopper.summary())

    def run_evaluator(self, ev: Evaluator) -> None:
        """One extra evaluation, logged in the step's metrics row (collective)."""
        result = ev(self.engine)
        step = self.state.step
        self.metrics.write({"step": step, **result})
        log.info("step %d  %s", step, {k: round(v, 4) for k, v in result.items()})

    def parity_batch(self) -> dict:
        """A fixed batch (row 0 of the first training batch) and the training model's fp32 logits
        on it, which export compares against."""
        if self._parity_ids is None:
            b = self.s.batch
            first = self.task.micro_batches(0, 0, b.global_size // b.micro_size)[0]["input_ids"]
            self._parity_ids = first[:1, :PARITY_TOKENS].clone()  # (1, T)
        ids = self._parity_ids
        return {"input_ids": ids, "logits": self.engine.logits(ids), "precision": self.s.precision}

    def save(self) -> str:
        """A checkpoint of this step on every rank (the best one is spared by pruning)."""
        state = self.state
        state.early_stop = self.stopper.state() if self.stopper else {}
        state.spike = self.guard.state()
        keep = self.stopper.best_tag if self.stopper else None
        t0 = time.perf_counter()
        extra = {"parity.pt": self.parity_batch()}
        tag = checkpoint.save(
            self.engine, self.s.run_dir, state, self.s.loop.keep_last, extra, self.faults, keep=keep
        )
        self.saved_at = state.step
        save_s = (
            time.perf_counter() - t0
        )  # the parity forward and every rank's files (save ends in a barrier)
        self.metrics.write({"step": state.step, "event": "checkpoint", "tag": tag, "save_s": save_s})
        log.info("saved %s in %.1f s", tag, save_s)
        return tag

    def stop_nonfinite(self) -> LoopResult:
        """max_nonfinite skipped steps in a row: checkpoint, write the offending samples, stop."""
        if self.saved_at != self.state.step:
            self.save()
        path = self.s.run_dir / "nonfinite_samples.json"
        if dist.is_main():
            write_json(path, {"steps": self.bad_steps[-self.state.nonfinite_in_row :], "all": self.bad_steps})
        log.error(
            "%d non-finite steps in a row: stopped at step %d; offending samples in %s",
            self.state.nonfinite_in_row,
            self.state.step,
            path,
        )
        return LoopResult(self.state, "stopped_nonfinite", NONFINITE_EXIT_CODE)

    def close(self) -> None:
        self.prefetch.close()
        self.metrics.close()
        self.bar.close()


def _stopper(cfg: LoopConfig, task: Task) -> EarlyStopper | None:
    """The early stopper of `early_stop_metric` (None without one); ConfigError for a metric the task lacks."""
    if not cfg.early_stop_metric:
        return None
    mode = task.metric_modes.get(cfg.early_stop_metric)
    if mode is None:
        raise ConfigError(
            "train.early_stop_metric",
            f"{cfg.early_stop_metric!r} is not a metric of task {task.name} (it has {sorted(task.metric_modes)})",
        )
    return EarlyStopper(cfg.early_stop_metric, mode == "min", cfg.patience, cfg.min_delta)


def seed_rank(seed: int) -> None:
    """Distinct RNG streams per rank (dropout etc.); restored from checkpoints on resume."""
    import random

    s = seed + dist.rank()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
