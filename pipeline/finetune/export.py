"""Fine-tuned checkpoint to a Hugging Face folder: full weights, merged LoRA, or a classifier.

One process, no collectives (rank 0 after training, or by hand). DeepSpeed's zero_to_fp32 (via
pipeline/runtime/engine.py) gathers the checkpoint's fp32 weights (for LoRA runs: the frozen base
weights and the adapters), a model built from the init folder's config.json loads them, and
`save_pretrained` writes `out` atomically with the init folder's tokenizer files, after the
folder reloads with plain transformers and gives finite logits. LoRA runs also write the
adapter alone (`<run dir>/adapter`, loadable with peft) and merge the adapters into the weights
only after checking that the merged model's logits equal the adapter model's.
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
from pipeline.train.export import TOKENIZER_FILES

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
