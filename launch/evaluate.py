"""Perplexity of a causal LM folder on a text file, a JSONL file or token shards.

    python launch/evaluate.py --model runs/sft_tiny/hf --data tests/data/sample/instructions.jsonl
    python launch/evaluate.py --model runs/tiny_cpu/hf --data data/wiki_sample/tokens --split valid
    python launch/evaluate.py --model runs/tiny_cpu/hf --data notes.txt --seq-len 256 --max-tokens 100000

Prints one JSON line: {"tokens_scored", "nll", "ppl"} (non-overlapping windows of --seq-len tokens;
see pipeline/finetune/perplexity.py for what each source becomes).
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
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face folder")
    parser.add_argument("--data", type=Path, required=True, help="text/JSONL file, token folder or shard")
    parser.add_argument("--split", default="valid", help="split of a token folder's manifest")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.finetune.perplexity import run_cli
    from pipeline.log import setup_logging

    setup_logging("WARNING")
    with user_errors():
        run_cli(args)


if __name__ == "__main__":
    main()
