"""Fine-tuned checkpoint to a Hugging Face folder: full weights, merged LoRA, or a classifier.

One process, no collectives (rank 0 after training, through dist.run_on_main, or by hand).
Full-weight runs (SFT, classification) are streamed like a pretraining export
(pipeline/train/export.py): the checkpoint's tensors are read one at a time, cast to the training
dtype and written into safetensors shards beside the init folder's config (plus the classes) and
tokenizer files, so memory stays near one shard and one model in the training dtype (the reload
that checks the logits on the checkpoint's fixed batch), not several fp32 copies; the folder
appears only if those logits agree with the training model's. LoRA runs gather the fp32 weights
(the frozen base weights and the adapters) with DeepSpeed's zero_to_fp32, also write the adapter
alone (`<run dir>/adapter`, loadable with peft) and merge the adapters into the weights only after
checking that the merged model's logits equal the adapter model's.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline.errors import CheckpointError
from pipeline.finetune.adapters import load_lora_state, merge_checked
from pipeline.finetune.config import FinetuneConfig
from pipeline.io import atomic_dir
from pipeline.runtime import checkpoint
from pipeline.runtime.engine import consolidated_state_dict
from pipeline.train.export import (
    DTYPES,
    MAX_SHARD_BYTES,
    TOKENIZER_FILES,
    check_names,
    check_parity,
    checkpoint_tensors,
    write_safetensors,
)

log = logging.getLogger(__name__)


def model_config(init_dir: Path, task: str, labels: list[str] | None = None, pad_id: int | None = None):
    """The transformers config of the fine-tuned model: the init folder's, plus the classes for classify."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(init_dir, local_files_only=True)
    if task == "classify":
        if not labels:
            raise CheckpointError(f"{init_dir}: a classifier needs its label names")
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.pad_token_id = pad_id
    return config


def build_plain(config, task: str) -> torch.nn.Module:
    """A freshly initialised fp32 model of this config, outside any ZeRO-3 context."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    return cls.from_config(config, dtype=torch.float32)


def load_full_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load a consolidated state dict; only a tied lm_head may be missing."""
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where} does not match the init model's config.json: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def export_finetuned(
    cfg: FinetuneConfig,
    tag: str,
    init_dir: Path,
    labels: list[str] | None = None,
    pad_id: int | None = None,
) -> Path:
    """Consolidate `<run dir>/checkpoints/<tag>` into `cfg.out_dir`; returns that folder."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # building models here must not wait for ranks that never join
    if cfg.method == "full":
        return export_full(cfg, tag, init_dir, labels, pad_id)
    run_dir, out_dir = cfg.run_dir, cfg.out_dir
    where = f"{run_dir}/checkpoints/{tag}"
    state = consolidated_state_dict(checkpoint.ckpt_root(run_dir), tag)
    config = model_config(init_dir, cfg.task, labels, pad_id)
    model = build_plain(config, cfg.task)
    if cfg.method == "lora":
        peft_model = load_lora_state(model, cfg.lora, cfg.task, state)
        with atomic_dir(run_dir / "adapter") as tmp:
            peft_model.save_pretrained(tmp)
        model = merge_checked(peft_model, probe_ids(config.vocab_size))
    else:
        load_full_state(model, state, where)
    model.config.use_cache = True  # for generation; training turned it off
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        for f in sorted(Path(init_dir).iterdir()):
            if f.name in TOKENIZER_FILES:
                shutil.copy2(f, tmp / f.name)
        check_reload(tmp, cfg.task, config)
    log.info("exported %s to %s", where, out_dir)
    return out_dir


def export_full(
    cfg: FinetuneConfig, tag: str, init_dir: Path, labels: list[str] | None = None, pad_id: int | None = None
) -> Path:
    """Stream the weights of `<run dir>/checkpoints/<tag>` in the training dtype into `cfg.out_dir`."""
    from transformers import GenerationConfig

    where = f"{cfg.run_dir}/checkpoints/{tag}"
    classify, precision = cfg.task == "classify", cfg.parallel.precision
    config = model_config(init_dir, cfg.task, labels, pad_id)
    tensors = checkpoint_tensors(
        cfg.run_dir, tag, cfg.parallel.tp_size, bool(getattr(config, "tie_word_embeddings", False))
    )
    check_names(tensors, config, classify, where)
    config.dtype = DTYPES[precision]
    config.use_cache = True  # for generation; training turned it off
    with atomic_dir(cfg.out_dir) as tmp:
        config.save_pretrained(tmp)
        if not classify and (Path(init_dir) / "generation_config.json").is_file():
            shutil.copy2(Path(init_dir) / "generation_config.json", tmp / "generation_config.json")
        elif not classify:
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        write_safetensors(tensors, tmp, DTYPES[precision], MAX_SHARD_BYTES)
        for f in sorted(Path(init_dir).iterdir()):
            if f.name in TOKENIZER_FILES:
                shutil.copy2(f, tmp / f.name)
        parity = checkpoint.ckpt_root(cfg.run_dir) / tag / "parity.pt"
        check_parity(tmp, parity, precision, trained=precision, classify=classify)
    log.info("exported %s to %s (%s)", where, cfg.out_dir, precision)
    return cfg.out_dir


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed (1, 16) batch of token ids for export checks."""
    return (torch.arange(16) * 7 % vocab_size).unsqueeze(0)


@torch.no_grad()
def check_reload(folder: Path, task: str, config) -> None:
    """Reload `folder` with the Auto class of the task; CheckpointError unless logits are finite and shaped."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    logits = model(input_ids=probe_ids(config.vocab_size)).logits
    width = config.num_labels if task == "classify" else config.vocab_size
    if logits.shape[-1] != width or not torch.isfinite(logits).all():
        raise CheckpointError(f"{folder}: reloaded model gives bad logits (shape {tuple(logits.shape)})")
