"""Instruction records from JSON array or JSONL files: Alpaca, self-instruct and chat shapes.

One file may hold any of these record shapes (each record is judged on its own):
- Alpaca: `{"instruction", "input"?, "output"}` becomes one `Example`;
- self-instruct seed tasks: `{"instruction", "instances": [{"input", "output"}, ...]}` becomes one
  `Example` per instance;
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` becomes one
  `Chat` (it needs at least one non-empty assistant turn).
Bad records are skipped, counted by a snake_case reason and logged with `file:line` (JSONL) or
`file:[index]` (JSON array); only an unreadable file, or one without a single usable record, is
an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
_MAX_LOGGED = 20  # per file: enough to find the problem without flooding the log


@dataclass(frozen=True)
class Example:
    """One instruction record; `where` is `file:line` (JSONL) or `file:[index]` (JSON array)."""

    instruction: str
    input: str
    output: str
    where: str = ""


@dataclass(frozen=True)
class Chat:
    """One conversation: (role, content) turns; the loss is taken on the assistant turns only."""

    messages: tuple[tuple[str, str], ...]
    where: str = ""

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


Record = Example | Chat


def load_examples(path: Path) -> tuple[list[Record], Counter]:
    """Read a JSON array or JSONL file of records; returns the good ones and bad-record counts."""
    path = Path(path)
    text = read_text(path, "instruction data")
    records = _json_array_records(path, text)
    if records is None:
        records = _jsonl_records(path, text)
    examples, counts, logged = [], Counter(), 0
    for where, rec in records:
        out = to_records(rec, where)
        if isinstance(out, str):
            counts[out] += 1
            if logged < _MAX_LOGGED:
                log.warning("%s: skipped record (%s)", where, out)
                logged += 1
        else:
            examples.extend(out)
    if not examples:
        raise DataError(f"{path}: no usable instruction records (skipped: {dict(counts) or 'file is empty'})")
    if counts:
        log.warning("%s: kept %d records, skipped %s", path, len(examples), dict(counts))
    return examples, counts


def read_text(path: Path, what: str) -> str:
    """The whole file as UTF-8 text (a BOM is dropped); DataError naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {exc}") from None


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


def to_records(rec: object, where: str) -> list[Record] | str:
    """The records one JSON value holds, or the snake_case reason it is skipped."""
    if rec is _BadJson:
        return "bad_json"
    if not isinstance(rec, dict):
        return "not_an_object"
    if "messages" in rec:
        chat = to_chat(rec["messages"], where)
        return chat if isinstance(chat, str) else [chat]
    if "instances" in rec:
        return _self_instruct(rec, where)
    ex = to_example(rec, where)
    return ex if isinstance(ex, str) else [ex]


def to_example(rec: dict, where: str) -> Example | str:
    """An Alpaca Example, or the reason the record is skipped."""
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


def _self_instruct(rec: dict, where: str) -> list[Record] | str:
    """One Example per instance of a self-instruct task (the task's instruction, the instance's I/O)."""
    instances = rec["instances"]
    if not isinstance(instances, list) or not instances:
        return "bad_instances"
    out = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            return "bad_instances"
        ex = to_example({**inst, "instruction": rec.get("instruction")}, f"{where}#{k}")
        if isinstance(ex, str):
            return ex
        out.append(ex)
    return out


def to_chat(messages: object, where: str) -> Chat | str:
    """A Chat from a `messages` list, or the reason it is skipped."""
    if not isinstance(messages, list) or not messages:
        return "bad_messages"
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "bad_messages"
        if m.get("role") not in CHAT_ROLES:
            return "unknown_role"
        turns.append((m["role"], m["content"]))
    if not any(r == "assistant" and c.strip() for r, c in turns):
        return "no_assistant_turn"
    return Chat(tuple(turns), where)


def as_chat(ex: Record) -> Chat:
    """An Alpaca Example as a one-turn conversation (the input follows the instruction)."""
    if isinstance(ex, Chat):
        return ex
    user = f"{ex.instruction}\n\n{ex.input}" if ex.input.strip() else ex.instruction
    return Chat((("user", user), ("assistant", ex.output)), ex.where)


def record_key(ex: Record) -> str:
    """The record's content as one string (what the train/valid split hashes)."""
    if isinstance(ex, Chat):
        return "\x00".join(f"{r}\x01{c}" for r, c in ex.messages)
    return f"{ex.instruction}\x00{ex.input}\x00{ex.output}"


def split_examples(
    examples: list, valid_fraction: float, seed: int, key: Callable[[object], str] = record_key
) -> tuple[list, list]:
    """Deterministic train/valid split by a hash of each record's content (stable under reordering)."""
    train, valid = [], []
    for ex in examples:
        key_bytes = f"{seed}\x00{key(ex)}".encode()
        u = int.from_bytes(hashlib.sha256(key_bytes).digest()[:8], "big") / 2**64  # uniform in [0, 1)
        (valid if u < valid_fraction else train).append(ex)
    return train, valid
