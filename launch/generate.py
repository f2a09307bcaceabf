"""Generate text from an exported (fine-tuned) model folder.

    python launch/generate.py --model runs/sft_tiny/hf --prompt "Explain what this Python function does." \
        --input "os.path.join"
    python launch/generate.py --model runs/tiny_cpu/hf --raw --prompt "Python is" --temperature 0

By default the prompt is wrapped in the instruction template the SFT step trained on;
`--raw` feeds it as plain text (for a pretrained-only model).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="Hugging Face folder (save_pretrained layout)"
    )
    parser.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw)")
    parser.add_argument("--input", default="", help="optional input block for the instruction")
    parser.add_argument("--raw", action="store_true", help="no instruction template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.finetune.generate import generate, load_model
    from pipeline.log import setup_logging

    setup_logging("WARNING")
    model, tokenizer = load_model(args.model)
    print(
        generate(
            model,
            tokenizer,
            args.prompt,
            instruction=not args.raw,
            input=args.input,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    )


if __name__ == "__main__":
    main()
