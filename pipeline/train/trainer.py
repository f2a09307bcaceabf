"""The pretraining loop: `train(cfg)`, readable top to bottom.

Per optimizer step: fetch this rank's grad-accumulation micro batches of the global batch,
count the target tokens of the whole step over all ranks, forward/backward each micro batch
normalized by that count, step. Every `log_every` steps a metrics row, every `eval_every` a
validation pass, every `save_every` (and at the end) a checkpoint. A run whose folder already
has a checkpoint resumes from `checkpoints/latest`. No DeepSpeed in here: see engine.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch

from pipeline import dist
from pipeline.config import save_config
from pipeline.errors import DataError
from pipeline.io import sha256_file
from pipeline.model.build import build_model
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainerState
from pipeline.train.config import PretrainConfig, ResolvedPretrainConfig, resolve
from pipeline.train.engine import IGNORE_INDEX, Engine, ds_config
from pipeline.train.loader import TokenLoader, open_split
from pipeline.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


def plan(cfg: PretrainConfig, world_size: int) -> str:
    """The resolved plan as text (for `launch/pretrain.py --check`); starts no process group."""
    r = resolve(cfg, world_size)
    d = r.derived
    return "\n".join(
        [
            f"run dir        {r.run_dir}",
            f"world size     {d.world_size} (data parallel {d.dp_size} x tensor parallel {r.parallel.tp_size})",
            f"batch          global {r.batch.global_size} = micro {r.batch.micro_size} x dp {d.dp_size} "
            f"x grad accum {d.grad_accum}; {d.tokens_per_step} tokens/step",
            f"model          {d.num_params:,} params, vocab {r.model.vocab_size}, {d.flops_per_token:.3g} FLOPs/token",
            f"parallel       ZeRO-{r.parallel.zero_stage}, {r.parallel.precision}; weights+grads+Adam "
            f"~{_state_bytes(d.num_params, r.parallel.zero_stage, r.parallel.precision, d.dp_size) / 2**20:,.0f} "
            "MiB per device (activations extra)",
            f"steps          {r.train.max_steps} ({r.train.max_steps * d.tokens_per_step:,} tokens)",
        ]
    )


def _state_bytes(params: int, zero_stage: int, precision: str, dp: int) -> float:
    """Per-device bytes of parameters, gradients and AdamW state under a ZeRO stage."""
    half = precision != "fp32"
    weights, grads = (2 if half else 4) * params, (2 if half else 4) * params
    optim = (12 if half else 8) * params  # fp32 master copy (mixed precision) + exp_avg + exp_avg_sq
    optim /= dp if zero_stage >= 1 else 1
    grads /= dp if zero_stage >= 2 else 1
    weights /= dp if zero_stage >= 3 else 1
    return weights + grads + optim


def train(cfg: PretrainConfig) -> ResolvedPretrainConfig:
    """Train (or resume) the run described by cfg; collective: call on every rank."""
    rcfg = resolve(cfg, dist.world_size())
    run_dir, d = rcfg.run_dir, rcfg.derived
    if not dist.is_main():
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # one copy of each info line
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
        ),
    )
    _seed_rank(rcfg.run.seed)
    if dist.is_main():
        save_config(rcfg, run_dir / "config.yaml")
    train_data, valid_data = _loaders(rcfg)
    fingerprint = sha256_file(rcfg.data.tokens / "manifest.json")
    state = TrainerState(manifest_fingerprint=fingerprint)
    tag = checkpoint.latest_tag(run_dir)
    if tag is not None:
        state = checkpoint.load(engine, run_dir, tag, fingerprint)
        log.info("resumed from %s (step %d, %d samples)", tag, state.step, state.consumed_samples)
    metrics = MetricsWriter(run_dir)
    try:
        _loop(rcfg, engine, train_data, valid_data, state, metrics)
    finally:
        metrics.close()
    return rcfg


def _seed_rank(seed: int) -> None:
    """Distinct RNG streams per rank (dropout etc.); restored from checkpoints on resume."""
    s = seed + dist.rank()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _loaders(rcfg: ResolvedPretrainConfig) -> tuple[TokenLoader, TokenLoader | None]:
    """Verified train loader and, when the valid split has a sample, a valid loader (unshuffled)."""
    data = rcfg.data
    # Checksums are read once (rank 0); other ranks check the manifest's structure and fingerprint.
    prefixes = open_split(
        data.tokens,
        "train",
        checksums=data.verify_checksums and dist.is_main(),
        fingerprint=rcfg.derived.tokenizer_fingerprint,
    )
    dist.barrier()
    train_data = TokenLoader(prefixes, data.seq_len, data.seed, name=f"{data.tokens} (train)")
    valid_prefixes = open_split(data.tokens, "valid", checksums=False)
    try:
        valid_data = TokenLoader(valid_prefixes, data.seq_len, data.seed, shuffle=False)
    except DataError as exc:  # an empty/tiny valid split only disables eval
        log.warning("no validation: %s", exc)
        valid_data = None
    return train_data, valid_data


def _count_targets(batches: list[dict]) -> torch.Tensor:
    """Target tokens in these micro batches, summed over all ranks (float64 so sums stay exact)."""
    n = sum(int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in batches)
    return dist.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64))


def _loop(rcfg, engine: Engine, train_data, valid_data, state: TrainerState, metrics: MetricsWriter) -> None:
    t, b = rcfg.train, rcfg.batch
    window = {"loss_sum": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter()}
    start = time.perf_counter()
    while state.step < t.max_steps:
        micro = train_data.micro_batches(
            state.consumed_samples, b.global_size, b.micro_size, engine.dp_rank, engine.dp_size
        )
        normalizer = float(_count_targets(micro))
        window["loss_sum"] += sum(engine.forward_backward(mb, normalizer) for mb in micro)
        engine.step()
        state.step += 1
        state.consumed_samples += b.global_size
        state.consumed_tokens += int(normalizer)
        window["tokens"] += normalizer
        window["steps"] += 1
        last = state.step == t.max_steps
        if state.step % t.log_every == 0 or last:
            _log_window(rcfg, engine, state, window, metrics, time.perf_counter() - start)
        if (t.eval_every and state.step % t.eval_every == 0) or last:
            _evaluate(rcfg, engine, valid_data, state, metrics)
        if (t.save_every and state.step % t.save_every == 0) or last:
            tag = checkpoint.save(engine, rcfg.run_dir, state, t.keep_last)
            log.info("saved %s", tag)


def _log_window(
    rcfg, engine: Engine, state: TrainerState, window: dict, metrics: MetricsWriter, elapsed: float
) -> None:
    """One metrics row with the mean token loss since the last row (collective: all ranks call it)."""
    loss_sum = float(dist.all_reduce_sum(torch.tensor([window["loss_sum"]], dtype=torch.float64)))
    dt = max(time.perf_counter() - window["t0"], 1e-9)
    tok_s = window["tokens"] / dt
    row = {
        "step": state.step,
        "loss": loss_sum / window["tokens"],
        "lr": engine.lr,
        "tokens": state.consumed_tokens,
        "samples": state.consumed_samples,
        "tokens_per_s": tok_s,
        "tflops_per_s": tok_s * rcfg.derived.flops_per_token / 1e12,
        "elapsed_s": elapsed,
    }
    metrics.write(row)
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
        state.step,
        rcfg.train.max_steps,
        row["loss"],
        row["lr"],
        tok_s,
    )
    window.update(loss_sum=0.0, tokens=0.0, steps=0, t0=time.perf_counter())


def _evaluate(
    rcfg, engine: Engine, valid_data: TokenLoader | None, state: TrainerState, metrics: MetricsWriter
) -> None:
    """Mean token loss and perplexity over the first eval_batches x global_size valid samples."""
    if valid_data is None:
        return
    size = rcfg.train.eval_batches * rcfg.batch.global_size  # the same samples whatever the world size
    sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, target tokens)
    for mb in valid_data.micro_batches(0, size, rcfg.batch.micro_size, engine.dp_rank, engine.dp_size):
        loss_sum, n = engine.eval_loss_sum(mb)
        sums += torch.tensor([loss_sum, n], dtype=torch.float64)
    loss_sum, n = dist.all_reduce_sum(sums).tolist()
    loss = loss_sum / max(n, 1.0)
    metrics.write({"step": state.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
    log.info("step %d  eval loss %.4f  ppl %.1f", state.step, loss, math.exp(min(loss, 50.0)))


def exit_worker(code: int = 0) -> None:
    """End a launcher worker without torch 2.13's flaky gloo abort at exit (notes: 0 in ~40 runs)."""
    try:
        dist.barrier()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def pretrain_worker(cfg: PretrainConfig) -> None:
    """What `launch/pretrain.py` runs on each rank: train, then exit cleanly (never returns)."""
    train(cfg)
    exit_worker(0)
