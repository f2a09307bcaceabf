"""What launch/evaluate.py does: perplexity, the quantized-model comparison, harness tasks, task data.

Every result is one JSON line on stdout (the comparison also prints a table on stderr), so a
script can read the numbers and a person can read the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.errors import ConfigError, DataError


def run_cli(args) -> dict:
    """Run the parts the arguments ask for, in this order: make tasks, perplexity (or the
    comparison with --quantize), harness tasks. Returns {part: result}."""
    out: dict = {}
    if args.make_tasks is not None:
        out["make_tasks"] = make_tasks(args)
    if args.data is not None:
        out["perplexity"] = compare_quantized(args) if args.quantize else plain_perplexity(args)
    elif args.quantize:
        raise ConfigError("--quantize", "needs --data: the comparison scores perplexity on it")
    if args.tasks:
        out["tasks"] = run_tasks(args)
    if not out:
        raise ConfigError("", "nothing to do: give --data, --tasks and/or --make-tasks")
    return out


def plain_perplexity(args) -> dict:
    from pipeline.finetune.perplexity import run_cli as perplexity_cli

    _need_model(args)
    return perplexity_cli(args)


def compare_quantized(args) -> list[dict]:
    """Original vs each --quantize scheme on the --data tokens: one JSON line each, plus a table."""
    from pipeline.deploy.quantize import SCHEMES, compare
    from pipeline.finetune.generate import load_model
    from pipeline.finetune.perplexity import load_tokens

    _need_model(args)
    unknown = [s for s in args.quantize if s not in SCHEMES]
    if unknown:
        raise ConfigError("--quantize", f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    if args.seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {args.seq_len}")
    _, tokenizer = load_model(args.model)
    tokens = load_tokens(args.data, tokenizer, args.model, args.split, args.field)[: args.max_tokens]
    rows = compare(
        args.model,
        tokens,
        args.quantize,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        new_tokens=args.decode_tokens,
    )
    for row in rows:
        print(json.dumps({"data": str(args.data), **row}))
    print(format_table(rows), file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    """The comparison as a fixed-width table."""
    head = f"{'model':<10}{'ppl':>10}{'Δppl %':>9}{'score tok/s':>13}{'decode tok/s':>14}{'weights MB':>12}{'ratio':>7}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model']:<10}{r['ppl']:>10.3f}{r['ppl_change_pct']:>+9.2f}{r['score_tokens_per_s']:>13.0f}"
            f"{r['decode_tokens_per_s']:>14.1f}{r['weight_mb']:>12.2f}{r['weight_ratio']:>7.2f}"
        )
    return "\n".join(lines)


def run_tasks(args) -> dict[str, float]:
    from pipeline.deploy.harness import evaluate_folder

    _need_model(args)
    result = evaluate_folder(
        args.model,
        args.tasks,
        task_dir=args.task_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(json.dumps({"tasks": args.tasks, **result}))
    return result


def make_tasks(args) -> dict:
    from pipeline.deploy.harness import read_texts, write_task_data

    counts = write_task_data(read_texts(args.make_tasks, args.field), Path(args.task_dir) / "data")
    print(json.dumps({"task_data": str(Path(args.task_dir) / "data"), **counts}))
    return counts


def _need_model(args) -> None:
    if args.model is None:
        raise ConfigError("--model", "is required for --data and --tasks")
