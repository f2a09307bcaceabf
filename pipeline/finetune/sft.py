"""Supervised fine-tuning data: Alpaca-style records to masked, padded token batches.

A record is a JSON object with `instruction`, optional `input`, and `output`, read from a
JSON array file or a JSONL file. Each kept record becomes `BOS + prompt + response + EOS`,
where the prompt is `PROMPT_TEMPLATE` filled in (the Input block is left out when the input
is empty). Labels copy the input ids on the response and its EOS and are -100 (ignored by
the loss) on BOS, every prompt token and padding, so the model learns to answer, not to
repeat the question. Bad records and truncations are counted by reason and logged with the
file and line; only an unreadable file is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value cross-entropy skips (torch's and transformers' default)
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_MAX_LOGGED = 20  # per file: enough to find the problem without flooding the log


@dataclass(frozen=True)
class Example:
    """One instruction record; `where` is `file:line` (JSONL) or `file:[index]` (JSON array)."""

    instruction: str
    input: str
    output: str
    where: str = ""


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt the model sees before its answer; shared by training and generation."""
    if input.strip():
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------- loading


def load_examples(path: Path) -> tuple[list[Example], Counter]:
    """Read a JSON array or JSONL file of records; returns the good ones and bad-record counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: instruction data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    records = _json_array_records(path, text)
    if records is None:
        records = _jsonl_records(path, text)
    examples, counts, logged = [], Counter(), 0
    for where, rec in records:
        ex_or_reason = _to_example(rec, where)
        if isinstance(ex_or_reason, str):
            counts[ex_or_reason] += 1
            if logged < _MAX_LOGGED:
                log.warning("%s: skipped record (%s)", where, ex_or_reason)
                logged += 1
        else:
            examples.append(ex_or_reason)
    if not examples:
        raise DataError(f"{path}: no usable instruction records (skipped: {dict(counts) or 'file is empty'})")
    if counts:
        log.warning("%s: kept %d records, skipped %s", path, len(examples), dict(counts))
    return examples, counts


def _json_array_records(path: Path, text: str) -> list[tuple[str, object]] | None:
    """Records of a file whose content is one JSON array; None when it is not one."""
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    return [(f"{path}:[{i}]", rec) for i, rec in enumerate(data)]


def _jsonl_records(path: Path, text: str) -> list[tuple[str, object]]:
    """Records of a JSONL file; an unparsable line becomes a `bad_json` marker, not an error."""
    out, parsed = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
            parsed += 1
        except json.JSONDecodeError:
            out.append((f"{path}:{lineno}", _BadJson))
    if out and parsed == 0:
        raise DataError(f"{path}: not JSON or JSONL (no line parses as JSON)")
    return out


class _BadJson:
    """Marker for a JSONL line that did not parse."""


def _to_example(rec: object, where: str) -> Example | str:
    """An Example, or the snake_case reason the record is skipped."""
    if rec is _BadJson:
        return "bad_json"
    if not isinstance(rec, dict):
        return "not_an_object"
    fields = {}
    for name in ("instruction", "input", "output"):
        value = rec.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return f"non_string_{name}"
        fields[name] = value
    if not fields["instruction"].strip():
        return "missing_instruction"
    if not fields["output"].strip():
        return "missing_output"
    return Example(fields["instruction"], fields["input"], fields["output"], where)


def split_examples(
    examples: list[Example], valid_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/valid split by a hash of each record's text (stable under reordering)."""
    train, valid = [], []
    for ex in examples:
        key = f"{seed}\x00{ex.instruction}\x00{ex.input}\x00{ex.output}".encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64  # uniform in [0, 1)
        (valid if u < valid_fraction else train).append(ex)
    return train, valid


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example (unpadded) and its labels, both of the same length."""

    input_ids: list[int]
    labels: list[int]


def check_tokenizer(tokenizer, where: Path) -> None:
    """DataError unless the tokenizer has the BOS and EOS ids every example is framed with."""
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise DataError(
                f"{where}: the tokenizer has no {name.removesuffix('_id')} token; SFT needs BOS and EOS"
            )


def encode_example(tokenizer, ex: Example, seq_len: int) -> tuple[Encoded | None, str | None]:
    """Tokenize one example; returns (encoded or None, reason: None | 'truncated' | 'prompt_too_long').

    Prompt and response are tokenized separately so the mask boundary is exact. Too-long
    examples lose the end of their response (and EOS); an example whose BOS + prompt leaves no
    room for a single response token is dropped.
    """
    prompt = tokenizer.encode(format_prompt(ex.instruction, ex.input), add_special_tokens=False)
    response = tokenizer.encode(ex.output, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id] + prompt
    if len(prompt) >= seq_len:
        return None, "prompt_too_long"
    reason = "truncated" if len(prompt) + len(response) > seq_len else None
    response = response[: seq_len - len(prompt)]
    return Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response), reason


def encode_examples(tokenizer, examples: list[Example], seq_len: int) -> tuple[list[Encoded], Counter]:
    """Encode every example; counts `truncated` (kept) and `prompt_too_long` (dropped)."""
    out, counts = [], Counter()
    for ex in examples:
        enc, reason = encode_example(tokenizer, ex, seq_len)
        if reason:
            counts[reason] += 1
        if enc is not None:
            out.append(enc)
    if counts:
        log.info("encoded %d examples at seq_len %d: %s", len(out), seq_len, dict(counts))
    return out, counts


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's own, else EOS (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(items: list[Encoded], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to a fixed (B, seq_len) batch: input_ids, labels (-100 on padding), attention_mask.

    An empty list gives one row with no targets (a rank with nothing left to evaluate still
    has to join ZeRO-3's collective forward); it attends to itself so no row is fully masked.
    """
    if not items:
        batch = collate([Encoded([pad_id] * seq_len, [IGNORE_INDEX] * seq_len)], seq_len, pad_id)
        return batch
    B = len(items)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, seq_len), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on: labels not ignored, after the causal shift (position 0 never is)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, global_size: int) -> int:
    """Optimizer steps in one pass; the last partial global batch is dropped."""
    return num_examples // global_size


def train_micro_batches(
    data: list[Encoded],
    *,
    step: int,
    global_size: int,
    micro_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
) -> list[list[Encoded]]:
    """This rank's micro batches for optimizer step `step` (0-based), over epochs as needed.

    Each epoch is a seeded permutation; global sample g of the step is taken by rank
    `g // micro_size % dp_size`, so the data seen per step does not depend on the world size.
    """
    per_epoch = steps_per_epoch(len(data), global_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    ids = order[offset * global_size : (offset + 1) * global_size]
    chunks = [ids[i : i + micro_size] for i in range(0, global_size, micro_size)]
    return [[data[j] for j in chunk] for k, chunk in enumerate(chunks) if k % dp_size == dp_rank]


def eval_micro_batches(
    data: list[Encoded], *, micro_size: int, dp_rank: int, dp_size: int
) -> Iterator[list[Encoded]]:
    """This rank's share of the valid split; every rank yields the same number of batches.

    Under ZeRO-3 every forward is a collective, so a rank that runs out yields empty batches
    (the caller turns them into fully padded ones, which add zero loss and zero tokens).
    """
    chunks = [data[i : i + micro_size] for i in range(0, len(data), micro_size)]
    rounds = -(-len(chunks) // dp_size)
    for r in range(rounds):
        k = r * dp_size + dp_rank
        yield chunks[k] if k < len(chunks) else []
