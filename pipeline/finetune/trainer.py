"""Fine-tuning on the shared training loop: `finetune(cfg)`, from starting weights to an exported HF folder.

What is fine-tuning's own: the starting weights as a Hugging Face folder (`init_from` itself, or a
pretraining run's latest checkpoint exported once), the task built from `task:` (tasks.py: SFT,
classification or DPO, its data encoded with the tokenizer beside those weights), the model loaded
from that folder inside the engine (ZeRO-3 partitions it as it loads; a peft `method:` wraps it
first, adapters.py), the number of steps (`max_steps`, or epochs over the train split), and, once
the run has completed, the export of its best checkpoint (early stopping on `early_stop_metric`)
on rank 0
(the other ranks wait by polling the run folder, outside any collective: see dist.run_on_main).
Everything else is the runtime's (pipeline/runtime/trainer.py and loop.py): a run whose folder has a
checkpoint resumes from it (also when a Slurm job is requeued), SIGTERM/SIGUSR1 save and exit 75,
the non-finite and spike guards, metrics, the report.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from pipeline import dist
from pipeline.errors import CheckpointError, DataError
from pipeline.finetune import adapters, sft
from pipeline.finetune.config import FinetuneConfig, is_hf_folder
from pipeline.finetune.export import export_finetuned, model_config
from pipeline.finetune.heads import init_new_weights
from pipeline.finetune.tasks import FinetuneTask, build_task
from pipeline.model.config import ModelConfig
from pipeline.model.flops import flops_per_token
from pipeline.runtime import checkpoint
from pipeline.runtime.trainer import Job, RunResult, main_only, run_training, write_status
from pipeline.runtime.worker import exit_worker
from pipeline.train.export import DTYPES, export_hf

log = logging.getLogger(__name__)


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Fine-tune (or resume), then export the best checkpoint to `cfg.out_dir` once the run completed."""
    result = run_training(cfg.run_dir, partial(prepare, cfg), cfg.parallel.collective_timeout_min)
    if result.status != "completed":
        return result  # preempted or stopped: the requeued / resumed run exports
    task: FinetuneTask = result.job.task
    tag = result.best_tag or checkpoint.latest_tag(cfg.run_dir)
    labels = getattr(task, "labels", None)

    def export() -> None:
        export_finetuned(cfg, tag, task.init_dir, labels, task.pad_id)
        task.finish(tag)  # the task's closing report (classify: from the exported step's predictions)

    try:  # on rank 0, with the other ranks polling: an export may outlast the collective timeout
        main_only(cfg.run_dir, "export", export)
    except Exception as exc:
        write_status(
            cfg.run_dir, {"status": "failed", "error": f"export of {tag}: {type(exc).__name__}: {exc}"}
        )
        raise
    return result


def finetune_worker(cfg: FinetuneConfig) -> None:
    """What `launch/finetune.py` runs on each rank: fine-tune, then exit with the run's status code
    (0 done and exported, 75 stopped by a signal with a checkpoint, 3 non-finite steps); never returns."""
    exit_worker(finetune(cfg).exit_code)


def prepare(cfg: FinetuneConfig) -> Job:
    """The fine-tuning job: starting weights, the task's encoded data, and the model to load."""
    if cfg.method == "qlora":
        adapters.require_qlora()  # before the data is read: a clear refusal where bitsandbytes cannot run
    init_dir = prepare_init(cfg)
    task = build_task(cfg, init_dir, load_tokenizer(init_dir))
    dp = cfg.parallel.dp_size(dist.world_size())
    steps = total_steps(cfg, len(task.train), dp)
    log.info(
        "fine-tuning (%s, %s) %s for %d steps: %d train / %d valid, %d ranks (dp %d)",
        cfg.task,
        cfg.method,
        init_dir,
        steps,
        len(task.train),
        len(task.valid),
        dist.world_size(),
        dp,
    )
    return Job(
        run_dir=cfg.run_dir,
        config=cfg,
        seed=cfg.run.seed,
        batch=cfg.batch,
        optim=cfg.optim,
        parallel=cfg.parallel,
        loop=cfg.train,
        max_steps=steps,
        task=task,
        model_fn=partial(load_model, cfg, init_dir, getattr(task, "labels", None), task.pad_id),
        flops_per_token=_flops_per_token(init_dir, cfg.data.seq_len),
        name=cfg.run.name,
    )


def prepare_init(cfg: FinetuneConfig) -> Path:
    """The starting weights as an HF folder: `init_from` itself, or its latest checkpoint exported once.

    The export is named after the checkpoint tag (`<run dir>/init_step_<N>`), so a pretraining run
    that has moved on since is exported again rather than silently reused. Collective: every rank
    calls it; rank 0 exports while the others wait outside any collective.
    """
    if is_hf_folder(cfg.init_from):
        return Path(cfg.init_from)
    tag = checkpoint.latest_tag(Path(cfg.init_from))
    if tag is None:
        raise CheckpointError(f"{cfg.init_from}/checkpoints/latest: not found; the run has no checkpoint")
    target = cfg.run_dir / f"init_{tag}"

    def export() -> None:  # one process, no collectives (an AutoTP run converts its checkpoint first)
        if not is_hf_folder(target):
            log.info("exporting %s/checkpoints/%s to %s", cfg.init_from, tag, target)
            export_hf(Path(cfg.init_from), target, tag=tag)

    main_only(cfg.run_dir, "init_export", export)  # rank 0 exports, the others poll: no timeout
    return target


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


def total_steps(cfg: FinetuneConfig, num_train: int, dp_size: int) -> int:
    """Optimizer steps of the run: `train.max_steps`, else epochs x steps per epoch."""
    cfg.batch.grad_accum(dp_size)  # ConfigError now rather than inside DeepSpeed
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return cfg.train.epochs * sft.steps_per_epoch(num_train, cfg.batch.global_size)


def load_model(cfg: FinetuneConfig, init_dir: Path, labels: list[str] | None, pad_id: int) -> torch.nn.Module:
    """The model to fine-tune; called inside Engine so ZeRO-3 partitions it as it loads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=DTYPES[cfg.parallel.precision], attn_implementation="sdpa", local_files_only=True)
    if cfg.method == "qlora":
        kwargs["quantization_config"] = adapters.quantization_config(cfg.peft)  # ConfigError without CUDA
    if cfg.task == "classify":
        config = model_config(init_dir, "classify", labels, pad_id)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            init_dir, config=config, output_loading_info=True, **kwargs
        )
        # the new head from the run's seed, the same on every rank and in every run of this config
        new = init_new_weights(model, loading["missing_keys"], cfg.run.seed)
        log.info("initialised new parameters %s from seed %d", new, cfg.run.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(init_dir, **kwargs)
    model.config.use_cache = False  # no KV cache while training
    if cfg.method != "full":
        model = adapters.apply_peft(model, cfg.method, cfg.peft, cfg.task)
    return model


def _flops_per_token(init_dir: Path, seq_len: int) -> float:
    """Training FLOPs per token of a Llama-shaped init model (0 when its config is of another shape)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(init_dir, local_files_only=True)
    try:
        mcfg = ModelConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            max_seq_len=seq_len,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
    except AttributeError:
        return 0.0
    return flops_per_token(mcfg, seq_len)
