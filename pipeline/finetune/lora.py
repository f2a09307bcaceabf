"""LoRA through peft: wrap a model so only the low-rank adapters train, and merge them back.

`apply_lora` freezes every base weight and adds `B @ A` (rank r, scaled by alpha / r) beside each
target Linear layer; for classification the new `score` head trains too (peft's SEQ_CLS task adds
it to `modules_to_save`). The wrapped model goes into the same DeepSpeed engine as full fine-tuning
(only trainable parameters reach the optimizer); its ZeRO checkpoint holds the frozen weights as
well, so `merged_from_state` rebuilds the peft model from a consolidated state dict and
`merge_and_unload` folds the adapters into plain weights: a standard transformers model whose
logits equal the adapter model's (up to float rounding).
"""

from __future__ import annotations

import logging
import warnings

import torch

from pipeline.errors import CheckpointError
from pipeline.finetune.config import LoraSection

log = logging.getLogger(__name__)


def lora_config(section: LoraSection, task: str):
    """The peft LoraConfig for a config section and task ('sft' or 'classify')."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        task_type=TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM,
        bias="none",
    )


def apply_lora(model: torch.nn.Module, section: LoraSection, task: str) -> torch.nn.Module:
    """The peft-wrapped model: adapters (and a classification head) trainable, all else frozen."""
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in section.target_modules if t not in names]
    if missing:
        from pipeline.errors import ConfigError

        raise ConfigError("lora.target_modules", f"{missing} are not modules of this model")
    dtype = next(p.dtype for p in model.parameters())
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora_config(section, task))
    for p in peft_model.parameters():
        if p.requires_grad and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)  # adapters are born fp32; ZeRO wants one dtype (bf16 runs)
    trainable, total = count_params(peft_model)
    log.info("LoRA r=%d alpha=%g: %d of %d parameters train", section.rank, section.alpha, trainable, total)
    return peft_model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; full shapes even for ZeRO-3 placeholders."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_lora_state(base: torch.nn.Module, section: LoraSection, task: str, state: dict):
    """The peft model with a consolidated checkpoint's `state` loaded (`base` is a freshly built base
    model; peft injects the adapters into it). Tied lm_head weights may be absent from `state`."""
    peft_model = apply_lora(base, section, task)
    result = peft_model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"LoRA checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return peft_model


@torch.no_grad()
def merge_checked(peft_model, probe: torch.Tensor, atol: float = 1e-4) -> torch.nn.Module:
    """Merge the adapters into the base weights; CheckpointError unless the merged model's logits on
    `probe` (B, T) token ids match the adapter model's within `atol`."""
    peft_model.eval()
    before = peft_model(input_ids=probe).logits.float()
    merged = peft_model.merge_and_unload()
    after = merged(input_ids=probe).logits.float()
    diff = float((before - after).abs().max())
    if diff > atol:
        raise CheckpointError(
            f"merged LoRA model differs from the adapter model: max |logit diff| {diff:.2e}"
        )
    log.info("merged LoRA adapters (max |logit diff| vs adapter model %.1e)", diff)
    return merged
