"""Evaluate a causal LM folder: perplexity, quantized vs original, and lm-evaluation-harness tasks.

    python launch/evaluate.py --model runs/sft_tiny/hf --data tests/data/sample/instructions.jsonl --field output
    python launch/evaluate.py --model runs/tiny_cpu/hf --data data/wiki_sample/tokens --split valid
    python launch/evaluate.py --model runs/sft_sample/hf --data notes.txt --quantize int8 int4
    python launch/evaluate.py --model runs/sft_sample/hf --tasks gristmill_cloze gristmill_ppl
    python launch/evaluate.py --make-tasks held_out.jsonl --task-dir configs/eval

--data prints one JSON line {"tokens_scored", "nll", "ppl"} (non-overlapping windows of --seq-len
tokens; see pipeline/finetune/perplexity.py). With --quantize it prints one line per model
(original, then each torchao scheme: perplexity, scoring and decoding tokens/s, weight MB) and a
table on stderr. --tasks runs lm-eval on task YAMLs of --task-dir (or YAML paths) with local data
only and prints {"<task>/<metric>": value}. --make-tasks writes the cloze and perplexity task
data (<task-dir>/data/) from a JSONL (--field) or text file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    from pipeline.deploy.harness import TASK_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="Hugging Face folder")
    p.add_argument("--data", type=Path, help="text/JSONL file, token folder or shard (perplexity)")
    p.add_argument("--split", default="valid", help="split of a token folder's manifest")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quantize", nargs="+", help="torchao schemes (int8, int4) to compare with the original")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decoding-speed run")
    p.add_argument("--tasks", nargs="+", help="lm-eval task names in --task-dir, or task YAML paths")
    p.add_argument("--task-dir", type=Path, default=TASK_DIR, help="folder of task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="for the tasks' stderr (0: none)")
    p.add_argument("--make-tasks", type=Path, help="texts (JSONL or text file) to make task data from")
    p.add_argument("--field", default="text", help="JSONL field holding the text (--data, --make-tasks)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from pipeline.deploy.evaluate import run_cli
    from pipeline.log import setup_logging

    setup_logging("WARNING")
    with user_errors():
        run_cli(args)


if __name__ == "__main__":
    main()
