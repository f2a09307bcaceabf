"""Prepare training data on Ray: raw dumps -> cleaned shards -> dedup -> token shards + manifest.

    python launch/prepare_data.py --config configs/data/wiki_sample.yaml
    python launch/prepare_data.py --config configs/data/all_samples.yaml ray.num_cpus=4
    python launch/prepare_data.py --config configs/data/all_samples.yaml ray.address=auto

Writes <output_dir>/{config.yaml, cleaned/*.jsonl.zst + *.stats.json, deduped/, tokens/,
report.json, report.md, report.png}. Reads Wikipedia XML, WARC/WET, JSONL, Parquet and saved
`datasets` (format: auto picks by file name). Runs on a local Ray instance by default
(ray.address=auto joins a running cluster). Running it again skips the shards that are already
done, so an interrupted job just needs a re-run.
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
    args = parser.parse_args(argv)

    from pipeline.data.config import DataConfig
    from pipeline.data.runner import prepare_data
    from pipeline.log import setup_logging

    setup_logging("INFO")
    with user_errors():
        cfg = load_config(DataConfig, args.config, args.overrides)
        with located(cfg):
            prepare_data(cfg)


if __name__ == "__main__":
    main()
