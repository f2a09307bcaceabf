"""The task interface: what a kind of training contributes to the one training loop.

A task is its data, its loss and its metrics, and nothing else. Pretraining (token shards,
next-token loss), SFT (masked chat/instruction sequences, the same loss), classification (a
sequence-classification head) and DPO (preference pairs) all implement it; checkpoints, resume, signals,
guards, metrics rows and the report belong to the loop (`pipeline/runtime/loop.py`), so every task
has them without asking.

The contract the loop relies on:
- `micro_batches(step, dp_rank, dp_size)` is a pure function of its arguments (the same batches
  after a resume, whatever the world size: every rank of a step takes a slice of one global
  batch), so resuming needs nothing but the step;
- `loss_sum` returns the *sum* of per-target losses of a batch (fp32, on the engine's device) and
  `count_targets` how many targets that sum has; the loop divides by the count over all ranks;
- `evaluate` is collective (every rank calls it) and returns metrics already summed over ranks;
- `setup(engine)` runs once on every rank while the engine still holds the starting weights (before
  a checkpoint is loaded into it), for what a task derives from the starting model (DPO's
  reference log-probabilities); `train_metrics` adds the task's own numbers to each metrics row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.runtime.engine import IGNORE_INDEX, Engine

Batch = dict[str, torch.Tensor]


class Task:
    """Base class of a training task; subclasses fill in the data, the loss and the metrics."""

    name: str = "task"
    fingerprint: str = ""
    """Hash of the data the task trains on; a checkpoint made on other data refuses to resume."""
    seq_len: int = 0
    """Tokens per training row (a checkpoint refuses to resume with another)."""
    metric_modes: dict[str, Literal["min", "max"]] = {"eval_loss": "min"}
    """The metrics `evaluate` returns that early stopping may use, and which way is better."""
    info: dict[str, Any] = {}
    """The data's accounting (records kept, dropped by reason, ...): written to metrics.jsonl as an
    `event: data` row at every start (set it per instance)."""
    lr_scales: dict[str, float] = {}
    """LR multipliers by parameter-name component, e.g. {"score": 10.0} for a new head that should
    learn faster than the pretrained body (the engine gives those parameters their own group)."""

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[Batch]:
        """This rank's micro batches of optimizer step `step` (0-based)."""
        raise NotImplementedError

    def count_targets(self, batch: Batch) -> int:
        """Loss terms in a batch (target tokens; examples for a classifier)."""
        raise NotImplementedError

    def loss_sum(self, engine: Engine, batch: Batch) -> torch.Tensor:
        """Sum of the per-target losses of a batch, fp32, on the engine's device (keeps the graph)."""
        raise NotImplementedError

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """Validation metrics over all ranks (collective), or None without a validation split."""
        return None

    def setup(self, engine: Engine) -> None:
        """Called once on every rank with the engine at the starting weights, before a checkpoint is
        loaded into it (collective); nothing by default."""

    def train_metrics(self) -> dict[str, float]:
        """The task's metrics over the training steps since the last metrics row, summed over ranks
        (collective: every rank calls it for every row); none by default."""
        return {}

    def step_samples(self, step: int) -> list[int]:
        """Indices of the training samples step `step` (0-based) trains on, for reports of bad steps."""
        return []

    def finish(self, tag: str) -> None:
        """Rank 0, once a completed run's result is checkpoint `tag` (exported, for fine-tuning): the
        task's closing report, if it has one."""


def lm_targets(batch: Batch) -> torch.Tensor:
    """(B, T') next-token targets aligned with the logits `lm_loss_sum` uses: `shift_labels` as given
    (packed pretraining rows), else `labels` shifted by one (transformers' convention)."""
    return batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]


def count_lm_targets(batch: Batch) -> int:
    """Target tokens of a causal-LM batch (positions not IGNORE_INDEX)."""
    return int((lm_targets(batch) != IGNORE_INDEX).sum())


def lm_loss_sum(engine: Engine, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of a batch (fp32, on the device)."""
    logits = engine.forward(batch).logits  # (B, T', vocab)
    logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning puts T' - T virtual tokens first
    if "shift_labels" not in batch:
        logits = logits[:, :-1]
    targets = engine.to_device(lm_targets(batch))
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def evaluate_lm(engine: Engine, batches: Iterable[Batch]) -> dict[str, float] | None:
    """eval_loss (mean per target token) and eval_ppl over this rank's batches, summed over all
    ranks (collective; every rank passes the same number of batches); None without targets."""
    total = engine.to_device(torch.zeros((), dtype=torch.float64))
    n = 0
    with engine.evaluating():
        for batch in batches:
            total = total + lm_loss_sum(engine, batch).double()
            n += count_lm_targets(batch)
    stats = torch.stack([total, engine.to_device(torch.tensor(float(n), dtype=torch.float64))])
    loss_sum, n = (x / engine.tp_size for x in dist.all_reduce_sum_(stats).tolist())  # TP ranks share batches
    if n == 0:
        return None
    loss = loss_sum / n
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
