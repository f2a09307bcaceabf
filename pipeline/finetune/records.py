"""Instruction records from JSON array or JSONL files: Alpaca, self-instruct, ShareGPT and OpenAI chat.

One file may hold any of these record shapes (each record is judged on its own):
- Alpaca: `{"instruction", "input"?, "output", "system"?, "history"?}` becomes one `Example`; with
  a non-empty `history` (`[[query, answer], ...]`, earlier turns, LLaMA-Factory's layout) it becomes
  a multi-turn `Chat` ending with the instruction and its output;
- self-instruct seed tasks: `{"instruction", "instances": [{"input", "output"}, ...]}` becomes one
  `Example` per instance;
- OpenAI chat: `{"messages": [{"role": "system"|"developer"|"user"|"assistant", "content"}, ...]}`,
  where `content` is a string or a list of `{"type": "text", "text"}` parts;
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...], "system"?}`
  (`user`/`assistant` are accepted as `from` values too).
Both chat shapes become one `Chat` (it needs at least one non-empty assistant turn; turns after the
last assistant turn teach nothing and are dropped); a top-level `system` string becomes the first
turn unless the conversation starts with its own. Role names are matched case-insensitively.
Bad records are skipped, counted by a snake_case reason and logged with `file:line` (JSONL) or
`file:[index]` (JSON array); only an unreadable file, or one without a single usable record, is
an error. `read_json_records` and `convert_records` are shared with the preference data of DPO.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import DataError

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "user": "user",
    "human": "user",  # ShareGPT
    "assistant": "assistant",
    "gpt": "assistant",  # ShareGPT
    "chatgpt": "assistant",
    "model": "assistant",  # Gemini-style exports
}
CONVERSATION_KEYS = ("messages", "conversations")
_MAX_LOGGED = 20  # per file: enough to find the problem without flooding the log


@dataclass(frozen=True)
class Example:
    """One instruction record; `where` is `file:line` (JSONL) or `file:[index]` (JSON array)."""

    instruction: str
    input: str
    output: str
    where: str = ""
    system: str = ""
    """System prompt (Alpaca `system` field); empty when the record has none."""


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
    return convert_records(Path(path), to_records, "instruction")


def read_json_records(path: Path, what: str) -> list[tuple[str, object]]:
    """(where, JSON value) per record of a JSON array file or a JSONL file (bad lines: a marker)."""
    text = read_text(path, what)
    records = _json_array_records(path, text)
    return records if records is not None else _jsonl_records(path, text)


def convert_records(
    path: Path, convert: Callable[[object, str], list | str], what: str
) -> tuple[list, Counter]:
    """Convert every record of `path` with `convert` (records, or a skip reason); counts and logs skips."""
    items, counts, logged = [], Counter(), 0
    for where, rec in read_json_records(path, f"{what} data"):
        out = "bad_json" if rec is _BadJson else convert(rec, where)
        if isinstance(out, str):
            counts[out] += 1
            if logged < _MAX_LOGGED:
                log.warning("%s: skipped record (%s)", where, out)
                logged += 1
        else:
            items.extend(out)
    if not items:
        raise DataError(f"{path}: no usable {what} records (skipped: {dict(counts) or 'file is empty'})")
    if counts:
        log.warning("%s: kept %d records, skipped %s", path, len(items), dict(counts))
    return items, counts


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
    if not isinstance(rec, dict):
        return "not_an_object"
    if "chosen" in rec and "rejected" in rec:
        return "preference_record"  # DPO data (task dpo), not instruction data
    system = rec.get("system") or ""
    if not isinstance(system, str):
        return "non_string_system"
    for key in CONVERSATION_KEYS:
        if key in rec:
            chat = to_chat(rec[key], where, system)
            return chat if isinstance(chat, str) else [chat]
    if "instances" in rec:
        return _self_instruct(rec, where)
    ex = to_example(rec, where)
    if isinstance(ex, str):
        return ex
    if rec.get("history"):
        chat = _with_history(ex, rec["history"])
        return chat if isinstance(chat, str) else [chat]
    return [ex]


def to_example(rec: dict, where: str) -> Example | str:
    """An Alpaca Example, or the reason the record is skipped."""
    fields = {}
    for name in ("instruction", "input", "output", "system"):
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
    return Example(fields["instruction"], fields["input"], fields["output"], where, fields["system"])


def _with_history(ex: Example, history: object) -> Chat | str:
    """An Alpaca record with earlier `[query, answer]` turns as one multi-turn Chat."""
    if not isinstance(history, list):
        return "bad_history"
    turns = [("system", ex.system)] if ex.system.strip() else []
    for pair in history:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            return "bad_history"
        turns += [("user", pair[0]), ("assistant", pair[1])]
    return Chat((*turns, *as_chat(replace(ex, system="")).messages), ex.where)


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


def _field(m: dict, names: tuple[str, str]) -> object:
    """The value of the first of two alternative keys present in a message (OpenAI's, then ShareGPT's)."""
    return m[names[0]] if names[0] in m else m.get(names[1])


def message_text(content: object) -> str | None:
    """A message's text: a string, or OpenAI content parts `[{"type": "text", "text"}]` joined;
    None when it is neither (or holds a non-text part, e.g. an image)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return None
    parts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            return None
        parts.append(part["text"])
    return "".join(parts)


def to_turn(m: object) -> tuple[str, str] | str:
    """One message (`role`/`content` or ShareGPT's `from`/`value`) as (role, text), or a skip reason."""
    if not isinstance(m, dict):
        return "bad_messages"
    role, text = _field(m, ("role", "from")), message_text(_field(m, ("content", "value")))
    if text is None:
        return "bad_messages"
    if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
        return "unknown_role"
    return ROLE_ALIASES[role.strip().lower()], text


def to_turns(messages: object, system: str = "") -> tuple[tuple[str, str], ...] | str:
    """A message list as (role, text) turns, led by `system` unless it starts with its own; or a reason."""
    if not isinstance(messages, list) or not messages:
        return "bad_messages"
    turns = []
    for m in messages:
        turn = to_turn(m)
        if isinstance(turn, str):
            return turn
        turns.append(turn)
    if system.strip() and turns[0][0] != "system":
        turns.insert(0, ("system", system))
    return tuple(turns)


def to_chat(messages: object, where: str, system: str = "") -> Chat | str:
    """A Chat from a `messages`/`conversations` list, or the reason it is skipped."""
    turns = to_turns(messages, system)
    if isinstance(turns, str):
        return turns
    last = max((i for i, (r, c) in enumerate(turns) if r == "assistant" and c.strip()), default=None)
    if last is None:
        return "no_assistant_turn"
    return Chat(turns[: last + 1], where)


def as_chat(ex: Record) -> Chat:
    """An Alpaca Example as a one-turn conversation (the input follows the instruction)."""
    if isinstance(ex, Chat):
        return ex
    user = f"{ex.instruction}\n\n{ex.input}" if ex.input.strip() else ex.instruction
    system = (("system", ex.system),) if ex.system.strip() else ()
    return Chat((*system, ("user", user), ("assistant", ex.output)), ex.where)


def record_key(ex: Record) -> str:
    """The record's content as one string (what the train/valid split hashes)."""
    if isinstance(ex, Chat):
        return "\x00".join(f"{r}\x01{c}" for r, c in ex.messages)
    key = f"{ex.instruction}\x00{ex.input}\x00{ex.output}"
    return f"{key}\x00{ex.system}" if ex.system else key  # unchanged for records without one


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
