"""Supervised fine-tuning (SFT) of a pretrained model on instruction data, then HF export.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune/sft_tiny.yaml
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune/<x>.yaml train.max_steps=100

Writes runs/<run.name>/{config.yaml,metrics.jsonl,checkpoints/} and the fine-tuned model to `out`
(default runs/<run.name>/hf), loadable with AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import argparse

from pipeline.config import add_config_args, load_config


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
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    finetune_worker(cfg)


if __name__ == "__main__":
    main()
