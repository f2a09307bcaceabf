"""Generate text from an exported (fine-tuned) model folder.

    python launch/generate.py --model runs/sft_tiny/hf --prompt "Explain what this Python function does." \
        --input "os.path.join"
    python launch/generate.py --model runs/sft_chat/hf --chat --prompt "Name three rivers."
    python launch/generate.py --model runs/sft_chat/hf --chat --prompts-file prompts.jsonl --temperature 0
    python launch/generate.py --model runs/tiny_cpu/hf --raw --prompt "Python is" --temperature 0

By default the prompt is wrapped in the instruction template the SFT step trained on; `--chat`
uses the tokenizer's chat template (for chat-trained models), `--raw` feeds plain text (for a
pretrained-only model). `--prompts-file` takes one prompt per line, or JSONL objects
({"prompt", "input"} or {"messages": [...]}), generates them as batches and prints one JSON
line per prompt: {"prompt", "completion"}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="Hugging Face folder (save_pretrained layout)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the instruction, user message, or raw text with --raw")
    source.add_argument("--prompts-file", type=Path, help="one prompt per line, or JSONL prompt objects")
    parser.add_argument("--input", default="", help="optional input block for the instruction")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--raw", action="store_true", help="no template")
    style.add_argument("--chat", action="store_true", help="the tokenizer's chat template")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.finetune.generate import run_cli
    from pipeline.log import setup_logging

    setup_logging("WARNING")
    with user_errors():
        run_cli(args)


if __name__ == "__main__":
    main()
