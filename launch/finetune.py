"""Fine-tune a pretrained model (SFT on instruction/chat data, sequence classification, or DPO on
preference pairs; full weights or a peft method: LoRA, QLoRA, IA3, prefix or prompt tuning), keep the
best checkpoint by a validation metric, and export it as an HF folder.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune/sft_tiny.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune/lora_chat_tiny.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune/dpo_tiny.yaml
    DS_ACCELERATOR=cpu python launch/finetune.py --config configs/finetune/classify_vader.yaml  # one process
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune/<x>.yaml train.max_steps=100

Writes runs/<run.name>/{config.yaml,metrics.jsonl,best.json,checkpoints/} (plus adapter/ for LoRA
and IA3, dpo_reference.pt for DPO) and the fine-tuned model to `out` (default runs/<run.name>/hf),
loadable with AutoModelForCausalLM (or AutoModelForSequenceClassification for task: classify); for
prefix and prompt tuning `out` is the base model and `out/adapter` the peft adapter.
"""

from __future__ import annotations

import argparse

from pipeline.config import add_config_args, load_config, located
from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)

    from pipeline import dist
    from pipeline.finetune.config import FinetuneConfig
    from pipeline.finetune.trainer import finetune_worker
    from pipeline.log import setup_logging

    setup_logging("INFO" if dist.is_main() else "WARNING")  # one copy of each progress line
    with user_errors():
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        with located(cfg):
            finetune_worker(cfg)


if __name__ == "__main__":
    main()
