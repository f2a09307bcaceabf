"""Set-up and ending of every training run: `run_training(run_dir, prepare)`, readable top to bottom.

Pretraining (`pipeline/train/trainer.py`) and fine-tuning (`pipeline/finetune/trainer.py`) each
describe their run as a `Job` (settings, the task, how to build the model); this module does the
rest the same way for both: start the process group, build the job (data is opened and verified
there, before any engine or model exists), find the checkpoint to resume from (converting it to
DeepSpeed's universal format when the data-parallel size changed), build the engine, let the task
derive what it needs from the starting weights (`Task.setup`), restore the trainer state and every
rank's RNG, run the Loop and record how it ended in `status.json`:
running, then completed / preempted / stopped_nonfinite, or failed with the error message when
anything raised (a checksum mismatch, a checkpoint made on other data, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.config import save_config, to_dict
from pipeline.io import write_json
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import TrainerState
from pipeline.runtime.config import BatchConfig, LoopConfig, OptimConfig, ParallelConfig
from pipeline.runtime.engine import Engine, ds_config, init_distributed
from pipeline.runtime.faults import Faults, StopRequest
from pipeline.runtime.loop import Evaluator, Loop, LoopResult, LoopSettings, seed_rank
from pipeline.runtime.metrics import MetricsWriter
from pipeline.runtime.task import Task

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One run as the runtime sees it, built by the pretraining or fine-tuning entry point."""

    run_dir: Path
    config: Any
    """The run's (resolved) config: saved as config.yaml and sent to W&B."""
    seed: int
    batch: BatchConfig
    optim: OptimConfig
    parallel: ParallelConfig
    loop: LoopConfig
    max_steps: int
    task: Task
    model_fn: Callable[[], torch.nn.Module]
    """Builds the model; called inside Engine, so ZeRO-3 partitions it as it is created."""
    flops_per_token: float = 0.0
    name: str = ""
    evaluators: list[Evaluator] = field(default_factory=list)
    """Evaluations besides the task's own, each on its own cadence (e.g. lm-eval tasks in pretraining)."""

    def settings(self) -> LoopSettings:
        return LoopSettings(
            self.run_dir,
            self.batch,
            self.loop,
            self.max_steps,
            self.parallel.precision,
            self.flops_per_token,
            self.evaluators,
        )


@dataclass
class RunResult(LoopResult):
    """A LoopResult plus the job it ran."""

    job: Job | None = None

    @property
    def best_tag(self) -> str | None:
        """The best checkpoint by `early_stop_metric` (None without a metric or an eval)."""
        return self.state.early_stop.get("best_tag")


def run_training(run_dir: Path, prepare: Callable[[], Job], timeout_min: float | None = None) -> RunResult:
    """Build the job with `prepare` and train (or resume) it; collective: call on every rank.
    `timeout_min` bounds every collective (`parallel.collective_timeout_min`; None: the backend's)."""
    stop = StopRequest()  # from the start: a signal during set-up must not kill the rank outright
    if not dist.is_main():
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one copy of each info line
    try:
        init_distributed(timeout_min)
        job = prepare()
        result = _train(job, stop)
    except Exception as exc:
        write_status(run_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        stop.restore()
    write_status(run_dir, _status_row(result))
    return result


def main_only(sync_dir: Path, what: str, work: Callable[[], Any]) -> Any:
    """`work()` on rank 0 while the other ranks poll `sync_dir` (dist.run_on_main: long work cannot
    hit the collective timeout); its JSON-able result on every rank. Collective: every rank calls it."""
    faults = Faults.from_env()

    def slowed() -> Any:
        faults.slow_main(what)
        return work()

    return dist.run_on_main(slowed, sync_dir, what)


def write_status(run_dir: Path, row: dict) -> None:
    """run_dir/status.json (rank 0)."""
    if dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / "status.json", row)


def _train(job: Job, stop: StopRequest) -> RunResult:
    tag, saved = resume_point(job)
    dp = job.parallel.dp_size(dist.world_size())
    universal = saved is not None and saved.dp_size not in (0, dp)
    if universal:
        log.info(
            "the data-parallel size changed (%d -> %d): resuming through a universal checkpoint",
            saved.dp_size,
            dp,
        )
        tag = main_only(
            job.run_dir, "universal_conversion", partial(checkpoint.convert_universal, job.run_dir, tag)
        )
    torch.manual_seed(job.seed)  # the same init on every rank
    engine = Engine(
        job.model_fn,
        ds_config(
            batch=job.batch,
            optim=job.optim,
            parallel=job.parallel,
            total_steps=job.max_steps,
            world_size=dist.world_size(),
            load_universal=universal,
        ),
        lr_scales=job.task.lr_scales,
    )
    seed_rank(job.seed)
    job.task.setup(engine)  # still the starting weights: a checkpoint is loaded below
    if dist.is_main():
        save_config(job.config, job.run_dir / "config.yaml")
        write_layout(job.run_dir, engine)
        write_status(job.run_dir, {"status": "running"})
    state = initial_state(job, engine) if saved is None else resume(job, engine, tag, saved)
    metrics = MetricsWriter(job.run_dir, wandb=_wandb_settings(job))
    if job.task.info:
        metrics.write({"event": "data", **job.task.info})
    loop = Loop(
        job.settings(), job.task, engine, state, metrics, stop, Faults.from_env(), resumed=bool(saved)
    )
    try:
        result = loop.run()
    finally:
        loop.close()
    return RunResult(result.state, result.status, result.exit_code, result.signal, job)


def resume_point(job: Job) -> tuple[str | None, TrainerState | None]:
    """The latest complete checkpoint's tag and state, checked against this job (or None, None)."""
    main_only(
        job.run_dir, "clean_stale", partial(checkpoint.clean_stale, job.run_dir)
    )  # may delete a big folder
    tag = checkpoint.latest_tag(job.run_dir)
    if tag is None:
        return None, None
    saved = checkpoint.read_state(job.run_dir, tag)
    checkpoint.check_compatible(
        saved,
        fingerprint=job.task.fingerprint,
        global_batch=job.batch.global_size,
        seq_len=job.task.seq_len,
        tp_size=job.parallel.tp_size,
        where=checkpoint.ckpt_root(job.run_dir) / tag,
    )
    return tag, saved


def initial_state(job: Job, engine: Engine) -> TrainerState:
    return TrainerState(
        manifest_fingerprint=job.task.fingerprint,
        world_size=engine.world_size,
        dp_size=engine.dp_size,
        tp_size=engine.tp_size,
        global_batch=job.batch.global_size,
        seq_len=job.task.seq_len,
        lr_schedule=dict(engine.lr_schedule or {}),
    )


def resume(job: Job, engine: Engine, tag: str, saved: TrainerState) -> TrainerState:
    """Load the checkpoint; the checkpoint's LR schedule wins over a changed config (logged)."""
    state = checkpoint.load(engine, job.run_dir, tag, saved)
    if state.lr_schedule and state.lr_schedule != engine.lr_schedule:
        log.warning(
            "keeping the checkpoint's LR schedule %s (the config says %s)",
            state.lr_schedule,
            engine.lr_schedule,
        )
        engine.set_lr_schedule(state.lr_schedule)
    if (state.world_size, state.dp_size) != (engine.world_size, engine.dp_size):
        log.info(
            "resuming %s saved on %d ranks (dp %d) on %d ranks (dp %d)",
            tag,
            state.world_size,
            state.dp_size,
            engine.world_size,
            engine.dp_size,
        )
    state.world_size, state.dp_size = engine.world_size, engine.dp_size
    log.info("resumed from %s (step %d, %d samples)", tag, state.step, state.consumed_samples)
    return state


def write_layout(run_dir: Path, engine: Engine) -> None:
    """run_dir/layout.json: how the model is split (AutoTP shard shapes seen on rank 0) and how it was
    built before DeepSpeed wrapped it (parameter dtypes, devices)."""
    write_json(
        run_dir / "layout.json",
        {
            "world_size": engine.world_size,
            "dp_size": engine.dp_size,
            "tp_size": engine.tp_size,
            "zero_stage": engine.zero_stage,
            "born_partitioned": engine.born_partitioned,
            "built": engine.built,
            "activation_checkpointing": engine.activation_checkpointing,
            "params": engine.layout(),
        },
    )


def _wandb_settings(job: Job) -> dict | None:
    if not job.loop.wandb_project:
        return None
    return {
        "project": job.loop.wandb_project,
        "mode": job.loop.wandb_mode,
        "name": job.name or job.run_dir.name,
        "config": to_dict(job.config),
    }


def _status_row(result: RunResult) -> dict:
    row = {
        "status": result.status,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "step": result.state.step,
        "checkpoint": checkpoint.tag_for(result.state.step),
        "nonfinite_skips": result.state.nonfinite_skips,
    }
    if result.best_tag:
        row["best_checkpoint"] = result.best_tag
    return row
