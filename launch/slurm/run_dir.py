"""Print the output folder of a job's config: the run directory of a pretraining or fine-tuning
config, the output_dir of a data config (the sbatch scripts put their logs there).

    python launch/slurm/run_dir.py pretrain --config configs/pretrain/tiny_cpu.yaml train.max_steps=8
    python launch/slurm/run_dir.py data --config configs/data/wiki_sample.yaml

Loading the config also validates it, so a bad key fails the job before any rank starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo is the import root

from pipeline.config import add_config_args, load_config  # noqa: E402
from pipeline.errors import GristmillError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["pretrain", "finetune", "data"])
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)  # the kind, then --config, then overrides
    if args.kind == "pretrain":
        from pipeline.train.config import PretrainConfig as cls
    elif args.kind == "finetune":
        from pipeline.finetune.config import FinetuneConfig as cls
    else:
        from pipeline.data.config import DataConfig as cls
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except GristmillError as exc:
        sys.exit(f"error: {exc}")
    print(cfg.output_dir if args.kind == "data" else Path(cfg.run.dir) / cfg.run.name)


if __name__ == "__main__":
    main()
