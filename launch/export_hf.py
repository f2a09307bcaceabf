"""Export a pretraining run's latest (or a chosen) checkpoint as a Hugging Face model folder.

    python launch/export_hf.py --run runs/tiny --out out/tiny_hf
    python launch/export_hf.py --run runs/tiny --out out/tiny_hf --tag step_50

The folder loads with AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained; it is
written only if the reloaded model's logits match the training model's on the checkpoint's fixed batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_50 (default: latest)")
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="weights dtype (default: the training precision)"
    )
    args = parser.parse_args(argv)

    from pipeline.log import setup_logging
    from pipeline.train.export import export_hf

    setup_logging("INFO")
    with user_errors():
        print(export_hf(args.run, args.out, args.tag, dtype=args.dtype))


if __name__ == "__main__":
    main()
