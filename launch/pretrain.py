"""Pretrain a Llama-family model on token shards with DeepSpeed (ZeRO-3 by default).

    DS_ACCELERATOR=cpu deepspeed -q --num_gpus 2 launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml
    python launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml --check --world-size 8  # plan only
    python launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml --check --world-size 64 --device h100 \
        --vocab 32000 model.file=configs/model/llama_7b.yaml data.seq_len=4096   # plan for a cluster

Writes runs/<run.name>/{config.yaml,metrics.jsonl,status.json,checkpoints/}; starting it again
resumes from checkpoints/latest (raise train.max_steps to train further), also on another number
of ranks. Exit status: 0 done, 75 stopped by SIGTERM/SIGUSR1 with a checkpoint (requeue), 3 stopped
after train.max_nonfinite non-finite steps in a row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import add_config_args, load_config, located
from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--check", action="store_true", help="print the resolved plan and exit")
    parser.add_argument("--world-size", type=int, default=None, help="with --check: plan for this many ranks")
    parser.add_argument(
        "--device", default=None, help="with --check: plan for this device (h100, a100-80, ...)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=8, help="with --check: for the node count")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument(
        "--vocab", type=int, default=None, help="with --check: vocabulary size (no shards needed)"
    )
    vocab.add_argument(
        "--tokenizer", type=Path, default=None, help="with --check: take the vocabulary from it"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_intermixed_args(argv)  # options and key=value in any order

    from pipeline import dist
    from pipeline.log import setup_logging
    from pipeline.train.config import PretrainConfig
    from pipeline.train.plan import plan
    from pipeline.train.trainer import pretrain_worker

    setup_logging("INFO")
    with user_errors():
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        with located(cfg):
            if args.check:
                world = args.world_size or dist.world_size()
                target = dict(device=args.device, vocab=args.vocab, tokenizer=args.tokenizer)
                print(plan(cfg, world, gpus_per_node=args.gpus_per_node, **target))
                return
            pretrain_worker(cfg)


if __name__ == "__main__":
    main()
