"""The pretraining loop: `train(cfg)`, readable top to bottom.

Per optimizer step: fetch this rank's grad-accumulation micro batches of the global batch,
count the target tokens of the whole step over all ranks, forward/backward each micro batch
normalized by that count, step. A step whose loss or gradient norm is not finite on any rank is
skipped by every rank and counted; `train.max_nonfinite` of them in a row stop the run with a
checkpoint and the offending sample indices. Every `log_every` steps a metrics row, every
`eval_every` a validation pass, every `save_every` (and at the end) a checkpoint. SIGTERM/SIGUSR1
stop every rank at the next step boundary with a checkpoint and REQUEUE_EXIT_CODE (faults.py).
A run whose folder already has a checkpoint resumes from `checkpoints/latest`, also at another
data-parallel size (through DeepSpeed's universal checkpoint). No DeepSpeed in here: see engine.py.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from pipeline import dist
from pipeline.config import save_config, to_dict
from pipeline.errors import CheckpointError, DataError
from pipeline.io import sha256_file, write_json
from pipeline.log import progress
from pipeline.model.build import build_model
from pipeline.runtime import checkpoint, telemetry
from pipeline.runtime.checkpoint import TrainerState
from pipeline.runtime.engine import (
    IGNORE_INDEX,
    Engine,
    device_name,
    ds_config,
    init_distributed,
    peak_memory_mib,
)
from pipeline.runtime.faults import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, Faults, StopRequest
from pipeline.runtime.metrics import MetricsWriter
from pipeline.runtime.worker import exit_worker
from pipeline.train.config import PretrainConfig, ResolvedPretrainConfig, resolve
from pipeline.train.loader import BlendedLoader, TokenLoader, open_blend, open_split

log = logging.getLogger(__name__)
PARITY_TOKENS = 32  # length of the fixed batch whose logits every checkpoint records for export


@dataclass
class RunResult:
    """How a run ended: status is completed, preempted or stopped_nonfinite."""

    rcfg: ResolvedPretrainConfig
    state: TrainerState
    status: str = "completed"
    exit_code: int = 0
    signal: int = 0


def train(cfg: PretrainConfig) -> RunResult:
    """Train (or resume) the run described by cfg; collective: call on every rank."""
    rcfg = resolve(cfg, dist.world_size())
    run_dir, d = rcfg.run_dir, rcfg.derived
    stop = StopRequest()  # from the start: a signal during set-up must not kill the rank outright
    if not dist.is_main():
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one copy of each info line
    init_distributed()
    fingerprint = sha256_file(rcfg.data.tokens / "manifest.json")
    tag, saved = _resume_point(rcfg, fingerprint)
    universal = saved is not None and saved.dp_size not in (0, d.dp_size)
    if universal:
        tag = checkpoint.prepare_universal(run_dir, tag)
    torch.manual_seed(rcfg.run.seed)  # the same init on every rank
    model_fn = partial(build_model, rcfg.model, bos_id=d.bos_id, eos_id=d.eos_id, pad_id=d.pad_id)
    engine = Engine(
        model_fn,
        ds_config(
            batch=rcfg.batch,
            optim=rcfg.optim,
            parallel=rcfg.parallel,
            total_steps=rcfg.train.max_steps,
            world_size=d.world_size,
            load_universal=universal,
        ),
    )
    _seed_rank(rcfg.run.seed)
    if dist.is_main():
        save_config(rcfg, run_dir / "config.yaml")
        _write_layout(rcfg, engine)
        write_json(run_dir / "status.json", {"status": "running"})
    train_data, valid_data = _loaders(rcfg)
    state = _initial_state(rcfg, engine, fingerprint)
    if saved is not None:
        state = _resume(rcfg, engine, tag, saved)
    loop = Loop(
        rcfg,
        engine,
        train_data,
        valid_data,
        state,
        MetricsWriter(run_dir, wandb=_wandb_settings(rcfg)),
        stop,
        Faults.from_env(),
    )
    try:
        result = loop.run()
    finally:
        loop.close()
    if dist.is_main():
        write_json(run_dir / "status.json", _status_row(result))
    return result


def _resume_point(rcfg: ResolvedPretrainConfig, fingerprint: str) -> tuple[str | None, TrainerState | None]:
    """The latest complete checkpoint's tag and state, checked against this config (or None, None)."""
    if dist.is_main():
        checkpoint.clean_stale(rcfg.run_dir)
    dist.barrier()
    tag = checkpoint.latest_tag(rcfg.run_dir)
    if tag is None:
        return None, None
    saved = checkpoint.read_state(rcfg.run_dir, tag)
    checkpoint.check_compatible(
        saved,
        fingerprint=fingerprint,
        global_batch=rcfg.batch.global_size,
        seq_len=rcfg.data.seq_len,
        tp_size=rcfg.parallel.tp_size,
        where=checkpoint.ckpt_root(rcfg.run_dir) / tag,
    )
    return tag, saved


def _initial_state(rcfg: ResolvedPretrainConfig, engine: Engine, fingerprint: str) -> TrainerState:
    d = rcfg.derived
    return TrainerState(
        manifest_fingerprint=fingerprint,
        world_size=d.world_size,
        dp_size=d.dp_size,
        tp_size=rcfg.parallel.tp_size,
        global_batch=rcfg.batch.global_size,
        seq_len=rcfg.data.seq_len,
        lr_schedule=dict(engine.lr_schedule or {}),
    )


def _resume(rcfg: ResolvedPretrainConfig, engine: Engine, tag: str, saved: TrainerState) -> TrainerState:
    """Load the checkpoint; the checkpoint's LR schedule wins over a changed config (logged)."""
    state = checkpoint.load(engine, rcfg.run_dir, tag, saved)
    if state.lr_schedule and state.lr_schedule != engine.lr_schedule:
        log.warning(
            "keeping the checkpoint's LR schedule %s (the config says %s)",
            state.lr_schedule,
            engine.lr_schedule,
        )
        engine.set_lr_schedule(state.lr_schedule)
    d = rcfg.derived
    if (state.world_size, state.dp_size) != (d.world_size, d.dp_size):
        log.info(
            "resuming %s saved on %d ranks (dp %d) on %d ranks (dp %d)",
            tag,
            state.world_size,
            state.dp_size,
            d.world_size,
            d.dp_size,
        )
    state.world_size, state.dp_size = d.world_size, d.dp_size
    log.info("resumed from %s (step %d, %d samples)", tag, state.step, state.consumed_samples)
    return state


def _seed_rank(seed: int) -> None:
    """Distinct RNG streams per rank (dropout etc.); restored from checkpoints on resume."""
    s = seed + dist.rank()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _write_layout(rcfg: ResolvedPretrainConfig, engine: Engine) -> None:
    """run_dir/layout.json: how the model is split (AutoTP shard shapes seen on rank 0)."""
    write_json(
        rcfg.run_dir / "layout.json",
        {
            "world_size": engine.world_size,
            "dp_size": engine.dp_size,
            "tp_size": engine.tp_size,
            "zero_stage": engine.zero_stage,
            "born_partitioned": engine.born_partitioned,
            "activation_checkpointing": engine.activation_checkpointing,
            "params": engine.layout(),
        },
    )


def _wandb_settings(rcfg: ResolvedPretrainConfig) -> dict | None:
    t = rcfg.train
    if not t.wandb_project:
        return None
    return {"project": t.wandb_project, "mode": t.wandb_mode, "name": rcfg.run.name, "config": to_dict(rcfg)}


def _loaders(rcfg: ResolvedPretrainConfig) -> tuple[TokenLoader | BlendedLoader, TokenLoader | None]:
    """Verified train loader and, when the valid split has a sample, a valid loader (unshuffled)."""
    data = rcfg.data
    # Checksums are read once (rank 0); other ranks check the manifest's structure and fingerprint.
    prefixes = open_split(
        data.tokens,
        "train",
        checksums=data.verify_checksums and dist.is_main(),
        fingerprint=rcfg.derived.tokenizer_fingerprint,
    )
    if data.blend:  # every folder verified against the same tokenizer fingerprint
        train_data = open_blend(
            [(b.tokens, b.weight) for b in data.blend],
            "train",
            data.seq_len,
            data.seed,
            checksums=data.verify_checksums and dist.is_main(),
            fingerprint=rcfg.derived.tokenizer_fingerprint,
        )
    else:
        train_data = TokenLoader(prefixes, data.seq_len, data.seed, name=f"{data.tokens} (train)")
    dist.barrier()
    valid_prefixes = open_split(data.tokens, "valid", checksums=False)
    try:
        valid_data = TokenLoader(valid_prefixes, data.seq_len, data.seed, shuffle=False)
    except DataError as exc:  # an empty/tiny valid split only disables eval
        log.warning("no validation: %s", exc)
        valid_data = None
    return train_data, valid_data


def _count_targets(batches: list[dict], tp_size: int) -> torch.Tensor:
    """Target tokens in the global batch (float64 so sums stay exact); the tp_size ranks of a
    tensor-parallel group hold the same batch, so the sum over all ranks counts it tp_size times."""
    n = sum(int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in batches)
    return dist.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)) / tp_size


@dataclass
class Window:
    """Sums since the last metrics row."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    data_wait: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Loop:
    rcfg: ResolvedPretrainConfig
    engine: Engine
    train_data: TokenLoader | BlendedLoader
    valid_data: TokenLoader | None
    state: TrainerState
    metrics: MetricsWriter
    stop: StopRequest
    faults: Faults
    bad_steps: list[dict] = field(default_factory=list)

    def __post_init__(self):
        t = self.rcfg.train
        self.window = Window()
        self.last_grad_norm: float | None = None
        self.start = time.perf_counter()
        self.bar = progress(
            total=t.max_steps, initial=self.state.step, desc="train", unit="step", enabled=t.progress
        )
        self.peak = telemetry.peak_tflops(device_name(), self.rcfg.parallel.precision, t.peak_tflops)

    def run(self) -> RunResult:
        t, state = self.rcfg.train, self.state
        saved_at = -1
        while state.step < t.max_steps:
            self.train_step()
            last = state.step == t.max_steps
            if state.step % t.log_every == 0 or last:
                self.log_window()
            t_aside = time.perf_counter()
            if (t.eval_every and state.step % t.eval_every == 0) or last:
                self.evaluate()
            if (t.save_every and state.step % t.save_every == 0) or last:
                self.save()
                saved_at = state.step
            self.window.t0 += time.perf_counter() - t_aside  # throughput counts training time only
            if state.nonfinite_in_row >= t.max_nonfinite:
                return self.stop_nonfinite(saved_at)
            signum = self.stop.agreed()  # after eval and save too: a signal during them still counts
            if signum and not last:
                if saved_at != state.step:
                    self.save()
                log.warning(
                    "signal %d: stopped at step %d with a checkpoint; exit %d",
                    signum,
                    state.step,
                    REQUEUE_EXIT_CODE,
                )
                return RunResult(self.rcfg, state, "preempted", REQUEUE_EXIT_CODE, signum)
        return RunResult(self.rcfg, state)

    def train_step(self) -> None:
        """One optimizer step (or one agreed skip) over the next global batch."""
        b, state, engine = self.rcfg.batch, self.state, self.engine
        t0 = time.perf_counter()
        micro = self.train_data.micro_batches(
            state.consumed_samples, b.global_size, b.micro_size, engine.dp_rank, engine.dp_size
        )
        self.window.data_wait += time.perf_counter() - t0
        normalizer = float(_count_targets(micro, engine.tp_size))
        poison = self.faults.poison(state.step + 1)
        loss_sum = sum(engine.forward_backward(mb, normalizer, poison=poison) for mb in micro)
        result = engine.step()
        bad_loss = int(dist.all_reduce_max(torch.tensor([0 if math.isfinite(loss_sum) else 1]))[0])
        if self.rcfg.parallel.precision == "fp16":
            nonfinite = bool(bad_loss)  # an overflow at a finite loss is the loss scaler's business
        else:
            finite_norm = result.grad_norm is None or math.isfinite(result.grad_norm)
            nonfinite = bool(bad_loss) or not finite_norm or not result.applied
        if nonfinite and result.applied:
            raise CheckpointError(
                f"step {state.step + 1}: non-finite loss but DeepSpeed applied the update (ZeRO stage "
                f"{engine.zero_stage} does not check gradients); resume from the last checkpoint with ZeRO >= 1"
            )
        self.record_step(micro, normalizer, loss_sum, result, nonfinite)
        self.faults.after_step()

    def record_step(self, micro, normalizer: float, loss_sum: float, result, nonfinite: bool) -> None:
        state, b = self.state, self.rcfg.batch
        if nonfinite:
            state.nonfinite_skips += 1
            state.nonfinite_in_row += 1
            self.bad_steps.append(self.offending(state.step + 1, state.consumed_samples))
            log.warning(
                "step %d: non-finite loss/grad norm on some rank; update skipped (%d in a row)",
                state.step + 1,
                state.nonfinite_in_row,
            )
        else:
            state.nonfinite_in_row = 0
            if not result.applied:
                state.loss_scale_skips += 1  # fp16 overflow at a finite loss: the scaler halves
            self.window.loss_sum += loss_sum
            self.window.tokens += normalizer
            state.consumed_tokens += int(normalizer)
        state.loss_scale = self.engine.loss_scale
        self.last_grad_norm = result.grad_norm
        state.step += 1
        state.consumed_samples += b.global_size
        self.bar.update(1)

    def offending(self, step: int, start: int) -> dict:
        """The global sample range of a skipped step and the packed samples it maps to."""
        gs = np.arange(start, start + self.rcfg.batch.global_size)
        return {
            "step": step,
            "global_samples": [int(start), int(start + len(gs))],
            "sample_indices": [int(i) for i in self.train_data.sample_indices(gs)],
        }

    def log_window(self) -> None:
        """One metrics row with the mean token loss since the last row (collective: all ranks call it)."""
        w, state, d = self.window, self.state, self.rcfg.derived
        loss_sum = (
            float(dist.all_reduce_sum(torch.tensor([w.loss_sum], dtype=torch.float64))) / self.engine.tp_size
        )
        wait = float(dist.all_reduce_max(torch.tensor([w.data_wait], dtype=torch.float64)))
        mem = float(dist.all_reduce_max(torch.tensor([peak_memory_mib()], dtype=torch.float64)))
        dt = max(time.perf_counter() - w.t0, 1e-9)
        tok_s = w.tokens / dt
        tflops = tok_s * d.flops_per_token / d.world_size / 1e12  # per device
        row = {
            "step": state.step,
            "loss": loss_sum / w.tokens if w.tokens else float("nan"),
            "lr": self.engine.lr,
            "grad_norm": self.last_grad_norm,
            "loss_scale": state.loss_scale,
            "tokens": state.consumed_tokens,
            "samples": state.consumed_samples,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / d.world_size,
            "tflops_per_device": tflops,
            "mfu": telemetry.mfu(tflops, self.peak),
            "data_wait_s": wait,
            "mem_peak_mib": mem,
            "skipped_nonfinite": state.nonfinite_skips,
            "skipped_loss_scale": state.loss_scale_skips,
            "elapsed_s": time.perf_counter() - self.start,
        }
        self.metrics.write(row)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  mfu %s",
            state.step,
            self.rcfg.train.max_steps,
            row["loss"],
            row["lr"],
            tok_s,
            row["mfu"] if isinstance(row["mfu"], str) else f"{row['mfu']:.1%}",
        )
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
        self.window = Window()

    def evaluate(self) -> None:
        """Mean token loss and perplexity over the first eval_batches x global_size valid samples."""
        if self.valid_data is None:
            return
        size = self.rcfg.train.eval_batches * self.rcfg.batch.global_size  # the same whatever the world size
        sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, target tokens)
        e = self.engine
        for mb in self.valid_data.micro_batches(0, size, self.rcfg.batch.micro_size, e.dp_rank, e.dp_size):
            loss_sum, n = e.eval_loss_sum(mb)
            sums += torch.tensor([loss_sum, n], dtype=torch.float64)
        loss_sum, n = (dist.all_reduce_sum(sums) / e.tp_size).tolist()  # TP ranks share each batch
        loss = loss_sum / max(n, 1.0)
        ppl = math.exp(min(loss, 50.0))
        self.metrics.write({"step": self.state.step, "eval_loss": loss, "eval_ppl": ppl})
        log.info("step %d  eval loss %.4f  ppl %.1f", self.state.step, loss, ppl)

    def parity_batch(self) -> dict:
        """A fixed batch and the training model's fp32 logits on it (export compares against them)."""
        source = self.valid_data or self.train_data
        ids = torch.from_numpy(
            source.sample(0)[: min(PARITY_TOKENS, self.rcfg.data.seq_len)].astype(np.int64)
        )
        ids = ids.unsqueeze(0)  # (1, T)
        return {
            "input_ids": ids,
            "logits": self.engine.logits(ids),
            "precision": self.rcfg.parallel.precision,
        }

    def save(self) -> str:
        extra = {"parity.pt": self.parity_batch()}
        tag = checkpoint.save(
            self.engine, self.rcfg.run_dir, self.state, self.rcfg.train.keep_last, extra, self.faults
        )
        log.info("saved %s", tag)
        return tag

    def stop_nonfinite(self, saved_at: int) -> RunResult:
        """max_nonfinite skipped steps in a row: checkpoint, write the offending samples, stop."""
        if saved_at != self.state.step:
            self.save()
        path = self.rcfg.run_dir / "nonfinite_samples.json"
        if dist.is_main():
            write_json(path, {"steps": self.bad_steps[-self.state.nonfinite_in_row :], "all": self.bad_steps})
        log.error(
            "%d non-finite steps in a row: stopped at step %d; offending samples in %s",
            self.state.nonfinite_in_row,
            self.state.step,
            path,
        )
        return RunResult(self.rcfg, self.state, "stopped_nonfinite", NONFINITE_EXIT_CODE)

    def close(self) -> None:
        self.metrics.close()
        self.bar.close()
        self.stop.restore()


def _status_row(result: RunResult) -> dict:
    return {
        "status": result.status,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "step": result.state.step,
        "checkpoint": checkpoint.tag_for(result.state.step),
        "nonfinite_skips": result.state.nonfinite_skips,
    }


def pretrain_worker(cfg: PretrainConfig) -> None:
    """What `launch/pretrain.py` runs on each rank: train, then exit with the run's status code
    (0 done, REQUEUE_EXIT_CODE after a signal, NONFINITE_EXIT_CODE after non-finite steps); never returns."""
    exit_worker(train(cfg).exit_code)
