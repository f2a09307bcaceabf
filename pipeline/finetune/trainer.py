"""The supervised fine-tuning loop: `finetune(cfg)` from starting weights to an exported HF folder.

Runs in every rank under the DeepSpeed launcher and reads top to bottom: start the process group,
get the starting weights as a Hugging Face folder (exporting a pretraining run's latest checkpoint
when `init_from` is a run dir), tokenize the instruction data, build the model inside `Engine` (so
ZeRO-3 partitions it while loading), then per optimizer step: this rank's micro batches, the loss
normalised by the target tokens of the whole step on all ranks, one optimizer step; log and eval
every so often; save a DeepSpeed checkpoint at the end and export it on rank 0.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline import dist
from pipeline.config import save_config
from pipeline.errors import CheckpointError, DataError
from pipeline.finetune import sft
from pipeline.finetune.config import FinetuneConfig, is_hf_folder
from pipeline.io import atomic_dir, sha256_file
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainerState
from pipeline.train.engine import Engine, _init_distributed, consolidated_state_dict, ds_config
from pipeline.train.export import check_reload, export_hf
from pipeline.train.metrics import MetricsWriter
from pipeline.train.trainer import exit_worker

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class SFTData:
    """Encoded splits (the same on every rank: each rank picks its own micro batches per step)."""

    train: list[sft.Encoded]
    valid: list[sft.Encoded]
    pad_id: int
    counts: dict[str, int]


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune, checkpoint and export; returns the exported folder (the same path on every rank)."""
    _init_distributed()  # before anything collective: rank 0 may export the init weights first
    run_dir = cfg.run_dir
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    init_dir = prepare_init(cfg)
    data = build_data(cfg, init_dir)
    dp = cfg.parallel.dp_size(dist.world_size())
    steps = total_steps(cfg, len(data.train), dp)
    ds_cfg = ds_config(
        batch=cfg.batch,
        optim=cfg.optim,
        parallel=cfg.parallel,
        total_steps=steps,
        world_size=dist.world_size(),
    )
    engine = Engine(partial(load_model, init_dir, cfg.parallel.precision), ds_cfg)
    log.info(
        "fine-tuning %s for %d steps: %d train / %d valid examples, %d ranks (dp %d)",
        init_dir,
        steps,
        len(data.train),
        len(data.valid),
        engine.world_size,
        engine.dp_size,
    )
    if dist.is_main():
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a re-run starts over from init_from
    metrics = MetricsWriter(run_dir)
    try:
        state = train_loop(engine, cfg, data, steps, metrics)
    finally:
        metrics.close()
    state.manifest_fingerprint = sha256_file(cfg.data.path)  # the data this model was tuned on
    tag = checkpoint.save(engine, run_dir, state, keep_last=1)
    del engine  # export must not see the live ZeRO-3 context (see export_finetuned)
    out = cfg.out_dir
    if dist.is_main():
        export_finetuned(run_dir, tag, init_dir, out)
    dist.barrier()
    return out


def finetune_worker(cfg: FinetuneConfig) -> None:
    """What `launch/finetune.py` runs on each rank: fine-tune, then exit cleanly (never returns)."""
    finetune(cfg)
    exit_worker(0)


def prepare_init(cfg: FinetuneConfig) -> Path:
    """The starting weights as an HF folder: `init_from` itself, or its latest checkpoint exported once.

    The export is named after the checkpoint tag (`<run dir>/init_step_<N>`), so a pretraining run
    that has moved on since is exported again rather than silently reused.
    """
    if is_hf_folder(cfg.init_from):
        return Path(cfg.init_from)
    tag = checkpoint.latest_tag(Path(cfg.init_from))
    if tag is None:
        raise CheckpointError(f"{cfg.init_from}/checkpoints/latest: not found; the run has no checkpoint")
    target = cfg.run_dir / f"init_{tag}"
    if dist.is_main() and not is_hf_folder(target):
        log.info("exporting %s/checkpoints/%s to %s", cfg.init_from, tag, target)
        export_hf(Path(cfg.init_from), target, tag=tag)
    dist.barrier()
    return target


def build_data(cfg: FinetuneConfig, init_dir: Path) -> SFTData:
    """Load, split and tokenize the instruction records with the tokenizer saved beside the weights."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init_dir, local_files_only=True)
    sft.check_tokenizer(tokenizer, init_dir)
    vocab = AutoConfig.from_pretrained(init_dir, local_files_only=True).vocab_size
    if len(tokenizer) > vocab:
        raise DataError(
            f"{init_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}"
        )
    examples, bad = sft.load_examples(cfg.data.path)
    train_ex, valid_ex = sft.split_examples(examples, cfg.data.valid_fraction, cfg.data.seed)
    train, train_counts = sft.encode_examples(tokenizer, train_ex, cfg.data.seq_len)
    valid, valid_counts = sft.encode_examples(tokenizer, valid_ex, cfg.data.seq_len)
    counts = dict(bad + train_counts + valid_counts)
    if sft.steps_per_epoch(len(train), cfg.batch.global_size) < 1:
        raise DataError(
            f"{cfg.data.path}: {len(train)} usable train examples, fewer than one global batch "
            f"(batch.global_size={cfg.batch.global_size})"
        )
    return SFTData(train, valid, sft.pad_id_of(tokenizer), counts)


def total_steps(cfg: FinetuneConfig, num_train: int, dp_size: int) -> int:
    """Optimizer steps of the run: `train.max_steps`, else epochs x steps per epoch."""
    cfg.batch.grad_accum(dp_size)  # ConfigError now rather than inside DeepSpeed
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return cfg.train.epochs * sft.steps_per_epoch(num_train, cfg.batch.global_size)


def load_model(init_dir: Path, precision: str) -> torch.nn.Module:
    """The causal LM to fine-tune; called inside Engine so ZeRO-3 partitions it as it loads."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        init_dir, dtype=_DTYPES[precision], attn_implementation="sdpa", local_files_only=True
    )
    model.config.use_cache = False  # no KV cache while training
    return model


# ---------------------------------------------------------------- the loop


def train_loop(
    engine: Engine, cfg: FinetuneConfig, data: SFTData, steps: int, metrics: MetricsWriter
) -> TrainerState:
    """Run `steps` optimizer steps, logging and evaluating as configured; returns the final state."""
    metrics.write(
        {"event": "data", "train_examples": len(data.train), "valid_examples": len(data.valid), **data.counts}
    )
    state, t0 = TrainerState(), time.perf_counter()
    for step in range(steps):
        loss, n_tokens = train_step(engine, cfg, data, step)
        state.step, state.consumed_samples = step + 1, (step + 1) * cfg.batch.global_size
        state.consumed_tokens += n_tokens
        done = state.step
        if cfg.train.log_every and (done % cfg.train.log_every == 0 or done in (1, steps)):
            metrics.write(
                {
                    "step": done,
                    "loss": loss,
                    "lr": engine.lr,
                    "target_tokens": state.consumed_tokens,
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                }
            )
            log.info("step %d/%d  loss %.4f  lr %.2e", done, steps, loss, engine.lr)
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == steps:
            eval_loss = evaluate(engine, cfg, data)
            if eval_loss is not None:
                metrics.write(
                    {"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
                )
                log.info("step %d  eval loss %.4f", done, eval_loss)
    return state


def _tp(engine: Engine) -> int:
    """Ranks sharing one batch (tensor parallel): sums over all ranks count their batch this often."""
    return engine.world_size // engine.dp_size


def train_step(engine: Engine, cfg: FinetuneConfig, data: SFTData, step: int) -> tuple[float, int]:
    """One optimizer step; returns (mean loss per target token over all ranks, target tokens)."""
    micro = sft.train_micro_batches(
        data.train,
        step=step,
        global_size=cfg.batch.global_size,
        micro_size=cfg.batch.micro_size,
        dp_rank=engine.dp_rank,
        dp_size=engine.dp_size,
        seed=cfg.data.seed,
    )
    batches = [sft.collate(mb, cfg.data.seq_len, data.pad_id) for mb in micro]
    local = torch.tensor([sum(sft.target_tokens(b) for b in batches), 0.0], dtype=torch.float64)
    n_targets = float(dist.all_reduce_sum(local)[0]) / _tp(engine)
    normalizer = max(n_targets, 1.0)  # a step of only-truncated prompts has no targets: no update
    loss_sum = sum(engine.forward_backward(b, normalizer) for b in batches)
    engine.step()
    total = dist.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64))
    return float(total[0]) / _tp(engine) / normalizer, int(n_targets)


def evaluate(engine: Engine, cfg: FinetuneConfig, data: SFTData) -> float | None:
    """Mean loss per target token on the valid split (all ranks take part); None when it is empty."""
    if not data.valid:
        return None
    sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, target tokens)
    batches = sft.eval_micro_batches(
        data.valid, micro_size=cfg.batch.micro_size, dp_rank=engine.dp_rank, dp_size=engine.dp_size
    )
    for i, mb in enumerate(batches):
        if cfg.train.eval_max_batches is not None and i >= cfg.train.eval_max_batches:
            break
        loss_sum, n = engine.eval_loss_sum(sft.collate(mb, cfg.data.seq_len, data.pad_id))
        sums += torch.tensor([loss_sum, n], dtype=torch.float64)
    dist.all_reduce_sum(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else None


# ---------------------------------------------------------------- the end


def export_finetuned(run_dir: Path, tag: str, init_dir: Path, out_dir: Path) -> Path:
    """Consolidate checkpoints/<tag> into a save_pretrained folder with the init folder's tokenizer.

    The architecture comes from `init_dir/config.json` (a fine-tune run has no model section
    for `export_hf` to read). One process, no collectives: transformers' ZeRO-3 hook is unset
    first, or building and reloading the model here would wait for ranks that never join.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    state = consolidated_state_dict(checkpoint.ckpt_root(run_dir), tag)
    config = AutoConfig.from_pretrained(init_dir, local_files_only=True)
    config.use_cache = True  # for generation; training turned it off
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{run_dir}/checkpoints/{tag} does not match {init_dir}/config.json: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for f in sorted(Path(init_dir).iterdir()):
            if f.name in TOKENIZER_FILES:
                shutil.copy2(f, tmp / f.name)
        check_reload(tmp, config.vocab_size)
    log.info("exported %s/checkpoints/%s to %s", run_dir, tag, out_dir)
    return out_dir
