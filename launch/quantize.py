"""Write a weight-only quantized copy (torchao int8 or int4) of a Hugging Face model folder.

    python launch/quantize.py --model runs/sft_sample/hf --out out/sft_sample-int8 --scheme int8

The folder reloads with AutoModelForCausalLM.from_pretrained (torchao installed: the `deploy`
extra) and is written only if the reload gives the quantized model's logits. To see what a scheme
costs first: python launch/evaluate.py --model <folder> --data <text> --quantize int8 int4
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    p.add_argument("--scheme", default="int8", choices=["int8", "int4"], help="weight-only scheme")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.deploy.quantize import export_quantized
    from pipeline.log import setup_logging

    setup_logging("INFO")
    with user_errors():
        print(export_quantized(args.model, args.out, args.scheme))


if __name__ == "__main__":
    main()
