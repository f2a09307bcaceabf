"""The fine-tuning loop: `finetune(cfg)` from starting weights to an exported HF folder.

Runs in every rank under the DeepSpeed launcher (or as one plain `python` process) and reads top
to bottom: start the process group, get the starting weights as a Hugging Face folder (exporting a
pretraining run's latest checkpoint when `init_from` is a run dir), build the task's data (SFT:
masked, optionally packed token sequences; classify: labelled texts), build the model inside
`Engine` (so ZeRO-3 partitions it while loading; LoRA wraps it in peft adapters first), then per
optimizer step: this rank's micro batches, the loss normalised by the targets of the whole step
on all ranks (tokens for SFT, examples for classify), one optimizer step; log every so often;
every `eval_every` steps (and at the end) evaluate, save a checkpoint when the validation metric
improved, and stop once it has not for `patience` evals. The best checkpoint is the one kept
(`checkpoints/latest`, `best.json`) and exported on rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline import dist
from pipeline.config import save_config
from pipeline.errors import CheckpointError, DataError
from pipeline.finetune import classify, sft
from pipeline.finetune.adapters import apply_lora
from pipeline.finetune.config import FinetuneConfig, is_hf_folder
from pipeline.finetune.early_stop import EarlyStopper
from pipeline.finetune.export import export_finetuned, model_config
from pipeline.io import sha256_file, write_json
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import TrainerState
from pipeline.runtime.engine import Engine, ds_config, init_distributed
from pipeline.runtime.metrics import MetricsWriter
from pipeline.runtime.worker import exit_worker
from pipeline.train.export import export_hf

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class FtData:
    """Encoded splits (the same on every rank: each rank picks its own micro batches per step)."""

    train: list
    valid: list
    pad_id: int
    counts: dict[str, int]
    labels: list[str] | None = None
    """classify: class names in id order."""


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune, keep the best checkpoint and export it; returns the exported folder (on every rank)."""
    init_distributed()  # before anything collective: rank 0 may export the init weights first
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
    engine_cls = classify.ClassifyEngine if cfg.task == "classify" else Engine
    engine = engine_cls(partial(load_model, cfg, init_dir, data.labels, data.pad_id), ds_cfg)
    log.info(
        "fine-tuning (%s, %s) %s for %d steps: %d train / %d valid, %d ranks (dp %d)",
        cfg.task,
        cfg.method,
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
        tag = train_loop(engine, cfg, data, steps, metrics)
    finally:
        metrics.close()
    del engine  # export must not see the live ZeRO-3 context
    if dist.is_main():
        export_finetuned(cfg, tag, init_dir, data.labels, data.pad_id)
    dist.barrier()
    return cfg.out_dir


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


# ---------------------------------------------------------------- data and model


def load_tokenizer(init_dir: Path):
    """The tokenizer saved beside the weights; DataError when it has more tokens than the model."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init_dir, local_files_only=True)
    sft.check_tokenizer(tokenizer, init_dir)
    vocab = AutoConfig.from_pretrained(init_dir, local_files_only=True).vocab_size
    if len(tokenizer) > vocab:
        raise DataError(
            f"{init_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}"
        )
    return tokenizer


def build_data(cfg: FinetuneConfig, init_dir: Path) -> FtData:
    """Load, split and tokenize the task's data with the tokenizer saved beside the weights."""
    tokenizer = load_tokenizer(init_dir)
    data = build_classify_data(cfg, tokenizer) if cfg.task == "classify" else build_sft_data(cfg, tokenizer)
    if sft.steps_per_epoch(len(data.train), cfg.batch.global_size) < 1:
        raise DataError(
            f"{cfg.data.path}: {len(data.train)} usable train sequences, fewer than one global batch "
            f"(batch.global_size={cfg.batch.global_size})"
        )
    log.info("data %s: %s", cfg.data.path, data.counts)
    return data


def build_sft_data(cfg: FinetuneConfig, tokenizer) -> FtData:
    """Instruction/chat records -> encoded (and, with data.pack, packed) train and valid sequences."""
    examples, bad = sft.load_examples(cfg.data.path)
    if cfg.data.template == "chat" or any(isinstance(e, sft.Chat) for e in examples):
        sft.check_chat_template(tokenizer, cfg.data.path)
    train_ex, valid_ex = sft.split_examples(examples, cfg.data.valid_fraction, cfg.data.seed)
    train, train_counts = sft.encode_examples(tokenizer, train_ex, cfg.data.seq_len, cfg.data.template)
    valid, valid_counts = sft.encode_examples(tokenizer, valid_ex, cfg.data.seq_len, cfg.data.template)
    counts = {"records": len(examples), **dict(bad + train_counts + valid_counts)}
    if cfg.data.pack:
        counts["train_examples_packed"] = len(train)
        train = sft.pack(train, cfg.data.seq_len)  # valid stays unpacked: the same loss, simpler
    return FtData(train, valid, sft.pad_id_of(tokenizer), counts)


def build_classify_data(cfg: FinetuneConfig, tokenizer) -> FtData:
    """Labelled rows -> class names and encoded train/valid examples."""
    rows, bad = classify.load_rows(cfg.data.path, cfg.classify)
    train_rows, valid_rows = sft.split_examples(
        rows,
        cfg.data.valid_fraction,
        cfg.data.seed,
        key=lambda r: r.text,  # same text, same split
    )
    labels = classify.label_names(cfg.classify, train_rows, cfg.data.path)
    train, train_counts = classify.encode_rows(tokenizer, train_rows, labels, cfg.data.seq_len)
    valid, valid_counts = classify.encode_rows(tokenizer, valid_rows, labels, cfg.data.seq_len)
    counts = {"records": len(rows), **dict(bad + train_counts + valid_counts)}
    counts["valid_majority_accuracy"] = classify.majority_accuracy(valid)
    return FtData(train, valid, sft.pad_id_of(tokenizer), counts, labels)


def total_steps(cfg: FinetuneConfig, num_train: int, dp_size: int) -> int:
    """Optimizer steps of the run: `train.max_steps`, else epochs x steps per epoch."""
    cfg.batch.grad_accum(dp_size)  # ConfigError now rather than inside DeepSpeed
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return cfg.train.epochs * sft.steps_per_epoch(num_train, cfg.batch.global_size)


def load_model(cfg: FinetuneConfig, init_dir: Path, labels: list[str] | None, pad_id: int) -> torch.nn.Module:
    """The model to fine-tune; called inside Engine so ZeRO-3 partitions it as it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=_DTYPES[cfg.parallel.precision], attn_implementation="sdpa", local_files_only=True)
    if cfg.task == "classify":
        config = model_config(init_dir, "classify", labels, pad_id)
        model = AutoModelForSequenceClassification.from_pretrained(init_dir, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(init_dir, **kwargs)
    model.config.use_cache = False  # no KV cache while training
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora, cfg.task)
    return model


# ---------------------------------------------------------------- the loop


def train_loop(engine: Engine, cfg: FinetuneConfig, data: FtData, steps: int, metrics: MetricsWriter) -> str:
    """Run up to `steps` optimizer steps with evals and early stopping; returns the kept checkpoint's tag."""
    metrics.write(
        {"event": "data", "train_examples": len(data.train), "valid_examples": len(data.valid), **data.counts}
    )
    state = TrainerState(manifest_fingerprint=sha256_file(cfg.data.path))  # the data this model was tuned on
    stopper = EarlyStopper(cfg.train.early_stop_metric, cfg.train.patience, cfg.train.min_delta)
    tag, t0 = None, time.perf_counter()
    for step in range(steps):
        loss, n_targets = train_step(engine, cfg, data, step)
        state.step, state.consumed_samples = step + 1, (step + 1) * cfg.batch.global_size
        state.consumed_tokens += n_targets
        done = state.step
        if cfg.train.log_every and (done % cfg.train.log_every == 0 or done in (1, steps)):
            row = {"step": done, "loss": loss, "lr": engine.lr, "targets": state.consumed_tokens}
            metrics.write({**row, "elapsed_s": round(time.perf_counter() - t0, 3)})
            log.info("step %d/%d  loss %.4f  lr %.2e", done, steps, loss, engine.lr)
        if not ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == steps):
            continue
        result = evaluate(engine, cfg, data)
        if result is None:
            continue
        metrics.write({"step": done, **result})
        log.info("step %d  eval %s", done, {k: round(v, 4) for k, v in result.items()})
        if stopper.update(result[stopper.metric], done):
            tag = checkpoint.save(engine, cfg.run_dir, state, keep_last=1)
        if stopper.should_stop:
            log.info(
                "early stop at step %d: best %s %.4f at step %d",
                done,
                stopper.metric,
                stopper.best,
                stopper.best_step,
            )
            metrics.write({"event": "early_stop", "step": done, "best_step": stopper.best_step})
            break
    if tag is None:  # no valid split (or never a finite metric): keep the final weights
        tag = checkpoint.save(engine, cfg.run_dir, state, keep_last=1)
    if dist.is_main():
        write_json(cfg.run_dir / "best.json", stopper.summary(tag, stopped_early=stopper.should_stop))
    return tag


def _tp(engine: Engine) -> int:
    """Ranks sharing one batch (tensor parallel): sums over all ranks count their batch this often."""
    return engine.world_size // engine.dp_size


def collate(cfg: FinetuneConfig, data: FtData, items: list) -> dict[str, torch.Tensor]:
    if cfg.task == "classify":
        return classify.collate(items, cfg.data.seq_len, data.pad_id)
    return sft.collate(items, cfg.data.seq_len, data.pad_id)


def count_targets(cfg: FinetuneConfig, batch: dict[str, torch.Tensor]) -> int:
    """Loss terms in a batch: examples (classify) or target tokens (sft)."""
    return classify.target_count(batch) if cfg.task == "classify" else sft.target_tokens(batch)


def train_step(engine: Engine, cfg: FinetuneConfig, data: FtData, step: int) -> tuple[float, int]:
    """One optimizer step; returns (mean loss per target over all ranks, targets in the step)."""
    micro = sft.train_micro_batches(
        data.train,
        step=step,
        global_size=cfg.batch.global_size,
        micro_size=cfg.batch.micro_size,
        dp_rank=engine.dp_rank,
        dp_size=engine.dp_size,
        seed=cfg.data.seed,
    )
    batches = [collate(cfg, data, mb) for mb in micro]
    local = torch.tensor([sum(count_targets(cfg, b) for b in batches), 0.0], dtype=torch.float64)
    n_targets = float(dist.all_reduce_sum(local)[0]) / _tp(engine)
    normalizer = max(n_targets, 1.0)  # a step of only-truncated prompts has no targets: no update
    loss_sum = sum(engine.forward_backward(b, normalizer) for b in batches)
    engine.step()
    total = dist.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64))
    return float(total[0]) / _tp(engine) / normalizer, int(n_targets)


def _eval_batches(engine: Engine, cfg: FinetuneConfig, data: FtData):
    batches = sft.eval_micro_batches(
        data.valid, micro_size=cfg.batch.micro_size, dp_rank=engine.dp_rank, dp_size=engine.dp_size
    )
    for i, mb in enumerate(batches):
        if cfg.train.eval_max_batches is not None and i >= cfg.train.eval_max_batches:
            break
        yield collate(cfg, data, mb)


def evaluate(engine: Engine, cfg: FinetuneConfig, data: FtData) -> dict[str, float] | None:
    """Validation metrics (all ranks take part); None when the valid split is empty."""
    if not data.valid:
        return None
    if cfg.task == "classify":
        return evaluate_classifier(engine, cfg, data)
    sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, target tokens)
    for batch in _eval_batches(engine, cfg, data):
        loss_sum, n = engine.eval_loss_sum(batch)
        sums += torch.tensor([loss_sum, n], dtype=torch.float64)
    dist.all_reduce_sum(sums)
    if sums[1] == 0:
        return None
    loss = float(sums[0] / sums[1])
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def evaluate_classifier(
    engine: classify.ClassifyEngine, cfg: FinetuneConfig, data: FtData
) -> dict[str, float]:
    """eval_loss (per example), accuracy and macro F1 over the valid split, summed over ranks."""
    C = len(data.labels)
    conf = torch.zeros((C, C), dtype=torch.float64)
    loss = torch.zeros(1, dtype=torch.float64)
    for batch in _eval_batches(engine, cfg, data):
        loss_sum, preds = engine.eval_batch(batch)
        conf += classify.confusion(preds, batch["labels"], C)
        loss += loss_sum
    dist.all_reduce_sum(conf)
    dist.all_reduce_sum(loss)
    conf, loss = conf / _tp(engine), loss / _tp(engine)
    return {"eval_loss": float(loss[0] / conf.sum().clamp(min=1)), **classify.scores(conf)}
