"""Train a fastText quality classifier (DCLM's recipe) from positives and negatives named in config;
writes <output_root>/<name>/ (model.bin + quality_model.json with metrics and data fingerprints).

    python launch/train_quality_model.py --config configs/quality/sample.yaml
    python launch/train_quality_model.py --config configs/quality/sample.yaml epoch=20 name=q20

Prints the folder and the held-out accuracy/F1. Apply it in data prep with
`filters.quality_model: {enabled: true, model: quality_models/<name>, keep: top_fraction, top_fraction: 0.1}`
and `steps: [clean, dedup, select, tokenize]` (README: your own quality model).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import add_config_args, load_config
from pipeline.errors import GristmillError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    args = parser.parse_args(argv)

    from pipeline.data.quality_train import QualityTrainConfig, train_quality_model
    from pipeline.log import setup_logging

    setup_logging("INFO")
    try:
        folder = train_quality_model(load_config(QualityTrainConfig, args.config, args.overrides))
    except GristmillError as exc:  # a user error: one line, no traceback
        sys.exit(f"error: {exc}")
    metrics = json.loads((folder / "quality_model.json").read_text(encoding="utf-8"))["metrics"]
    print(folder)
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "precision", "recall", "f1", "roc_auc")}))


if __name__ == "__main__":
    main()
