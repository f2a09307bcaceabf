"""Pretraining as a task of the shared training loop: `train(cfg)`.

What is pretraining's own: the resolved config (model from a configs/model file, vocab and
special ids from the token manifest), the token-shard loader (packed samples in a rank-independent
global order; optimizer step s consumes global samples [s*G, (s+1)*G)), the next-token loss on
every token, and the validation loss over the first `eval_batches` global batches of the valid
split. Everything else (resume, also at another data-parallel size; checkpoints; signals; the
non-finite and spike guards; metrics) is the runtime's: pipeline/runtime/trainer.py and loop.py.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np

from pipeline import dist
from pipeline.data.manifest import ChecksumRecord, verify_manifest
from pipeline.errors import DataError
from pipeline.io import sha256_file
from pipeline.model.build import build_model
from pipeline.runtime.engine import Engine
from pipeline.runtime.task import Batch, Task, count_lm_targets, evaluate_lm, lm_loss_sum
from pipeline.runtime.trainer import Job, RunResult, main_only, run_training
from pipeline.runtime.worker import exit_worker
from pipeline.train.config import PretrainConfig, ResolvedPretrainConfig, resolve
from pipeline.train.export import DTYPES
from pipeline.train.loader import BlendedLoader, TokenLoader, open_blend, open_split

log = logging.getLogger(__name__)


class PretrainTask(Task):
    """Next-token prediction on packed token shards."""

    name = "pretrain"

    def __init__(
        self, rcfg: ResolvedPretrainConfig, train: TokenLoader | BlendedLoader, valid: TokenLoader | None
    ):
        self.rcfg, self.train, self.valid = rcfg, train, valid
        self.fingerprint = sha256_file(rcfg.data.tokens / "manifest.json")
        self.seq_len = rcfg.data.seq_len
        self.info = {}

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[Batch]:
        b = self.rcfg.batch
        return self.train.micro_batches(step * b.global_size, b.global_size, b.micro_size, dp_rank, dp_size)

    def count_targets(self, batch: Batch) -> int:
        return count_lm_targets(batch)

    def loss_sum(self, engine: Engine, batch: Batch):
        return lm_loss_sum(engine, batch)

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """Mean token loss and perplexity over the first eval_batches x global_size valid samples."""
        if self.valid is None:
            return None
        b = self.rcfg.batch
        size = self.rcfg.train.eval_batches * b.global_size  # the same whatever the world size
        return evaluate_lm(
            engine, self.valid.micro_batches(0, size, b.micro_size, engine.dp_rank, engine.dp_size)
        )

    def step_samples(self, step: int) -> list:
        """Packed sample indices of the step (for a blend: [folder, sample] pairs)."""
        gs = np.arange(step * self.rcfg.batch.global_size, (step + 1) * self.rcfg.batch.global_size)
        if isinstance(self.train, BlendedLoader):
            d, j = self.train.sources(gs)
            return [[int(k), self.train.loaders[k].sample_index(int(i))] for k, i in zip(d, j)]
        return [int(i) for i in self.train.sample_indices(gs)]


def train(cfg: PretrainConfig) -> RunResult:
    """Train (or resume) the run described by cfg; collective: call on every rank."""
    return run_training(
        cfg.run.dir / cfg.run.name, partial(prepare, cfg), cfg.parallel.collective_timeout_min
    )


def prepare(cfg: PretrainConfig) -> Job:
    """The pretraining job: resolved config, verified data, and the model to build."""
    rcfg = resolve(cfg, dist.world_size())
    d = rcfg.derived
    if rcfg.data.verify_checksums:  # rank 0 hashes; the others wait outside any collective
        main_only(rcfg.run_dir, "shard_checksums", partial(verify_checksums, rcfg))
    train_data, valid_data = open_loaders(rcfg)
    return Job(
        run_dir=rcfg.run_dir,
        config=rcfg,
        seed=rcfg.run.seed,
        batch=rcfg.batch,
        optim=rcfg.optim,
        parallel=rcfg.parallel,
        loop=rcfg.train,
        max_steps=rcfg.train.max_steps,
        task=PretrainTask(rcfg, train_data, valid_data),
        model_fn=partial(
            build_model,
            rcfg.model,
            bos_id=d.bos_id,
            eos_id=d.eos_id,
            pad_id=d.pad_id,
            dtype=DTYPES[rcfg.parallel.precision],  # built in the training precision
        ),
        flops_per_token=d.flops_per_token,
        name=rcfg.run.name,
        evaluators=task_evaluators(rcfg),
    )


CHECKSUM_RECORD = "verified_shards.json"
"""In the run directory: the shard files whose sha256 matched (ChecksumRecord), so a requeue or a resume
hashes only files that changed."""


def verify_checksums(rcfg: ResolvedPretrainConfig) -> None:
    """The sha256 of every shard file of every token folder the run reads (unchanged ones once only)."""
    record = ChecksumRecord(rcfg.run_dir / CHECKSUM_RECORD)
    t0 = time.perf_counter()
    for tokens in [rcfg.data.tokens, *(b.tokens for b in rcfg.data.blend)]:
        verify_manifest(tokens, checksums=True, fingerprint=rcfg.derived.tokenizer_fingerprint, record=record)
    log.info(
        "shard checksums: %d files hashed, %d unchanged since verified (%s), %.1f s",
        record.hashed,
        record.skipped,
        record.path,
        time.perf_counter() - t0,
    )


def task_evaluators(rcfg: ResolvedPretrainConfig) -> list:
    """The in-loop lm-eval evaluator of `train.eval_tasks` (none when the list is empty)."""
    t = rcfg.train
    if not t.eval_tasks:
        return []
    from pipeline.deploy.harness import TaskEvaluator
    from pipeline.train.export import run_tokenizer_dir

    return [
        TaskEvaluator(list(t.eval_tasks), run_tokenizer_dir(rcfg), t.eval_tasks_every, t.eval_tasks_limit)
    ]


def open_loaders(rcfg: ResolvedPretrainConfig) -> tuple[TokenLoader | BlendedLoader, TokenLoader | None]:
    """Train loader and, when the valid split has a sample, a valid loader (unshuffled), after checking
    the manifests' structure and tokenizer fingerprint (the checksums are verify_checksums')."""
    data = rcfg.data
    fingerprint = rcfg.derived.tokenizer_fingerprint
    prefixes = open_split(data.tokens, "train", checksums=False, fingerprint=fingerprint)
    if data.blend:  # every folder verified against the same tokenizer fingerprint
        train_data = open_blend(
            [(b.tokens, b.weight) for b in data.blend],
            "train",
            data.seq_len,
            data.seed,
            checksums=False,
            fingerprint=fingerprint,
        )
    else:
        train_data = TokenLoader(prefixes, data.seq_len, data.seed, name=f"{data.tokens} (train)")
    valid_prefixes = open_split(data.tokens, "valid", checksums=False)
    try:
        valid_data = TokenLoader(valid_prefixes, data.seq_len, data.seed, shuffle=False)
    except DataError as exc:  # an empty/tiny valid split only disables eval
        log.warning("no validation: %s", exc)
        valid_data = None
    return train_data, valid_data


def pretrain_worker(cfg: PretrainConfig) -> None:
    """What `launch/pretrain.py` runs on each rank: train, then exit with the run's status code
    (0 done, REQUEUE_EXIT_CODE after a signal, NONFINITE_EXIT_CODE after non-finite steps); never returns."""
    exit_worker(train(cfg).exit_code)
