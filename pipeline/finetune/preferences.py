"""Preference data for DPO: JSONL/JSON records of a prompt with a chosen and a rejected answer.

Record shapes (each judged on its own; a top-level `system` string leads every chat shape):
- text: `{"prompt": str, "chosen": str, "rejected": str}`, or LLaMA-Factory's Alpaca-style
  `{"instruction", "input"?, "chosen", "rejected"}`; rendered like SFT's Alpaca records, so the
  `alpaca` template or the chat template (data.template) applies;
- chat with an explicit prompt: `{"prompt" | "messages" | "conversations": [turns], "chosen",
  "rejected"}` where each answer is a string (one assistant turn), a message, or a list of turns;
- chat with an implicit prompt: `{"chosen": [turns], "rejected": [turns]}`, two full
  conversations sharing a prefix: the shared turns are the prompt, the rest is each answer.
Messages are OpenAI `role`/`content` or ShareGPT `from`/`value` (see records.py). The answers start
with an assistant turn; multi-turn answers are allowed and only their assistant turns are trained.
Bad records are skipped and counted by reason; `encode_preferences` makes the token pairs whose
`key` (a hash of both token sequences and their masks) indexes the reference log-probabilities.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.finetune.records import Chat, Example, Record, convert_records, record_key, to_turn, to_turns
from pipeline.finetune.sft import Encoded, Template, encode_each, encode_record

Turns = tuple[tuple[str, str], ...]
PROMPT_KEYS = ("prompt", "messages", "conversations")


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred and a rejected answer, as two SFT records that share the prompt;
    for chats, messages before index `start` are the prompt (never trained on)."""

    chosen: Record
    rejected: Record
    start: int = 0
    where: str = ""


@dataclass(frozen=True)
class Pair:
    """One encoded preference: the chosen and rejected sequences (labels only on answer tokens), the
    key the reference file is indexed by, and the reference log-prob sums once attached."""

    chosen: Encoded
    rejected: Encoded
    key: str
    ref_chosen: float | None = None
    ref_rejected: float | None = None


def load_preferences(path: Path) -> tuple[list[Preference], Counter]:
    """Read a JSON array or JSONL file of preference records; returns the good ones and skip counts."""
    return convert_records(Path(path), to_preferences, "preference")


def _answer(value: object) -> Turns | str:
    """An answer as turns: a string is one assistant turn; a message or a list of messages as given."""
    if isinstance(value, str):
        return (("assistant", value),)
    if isinstance(value, dict):
        turn = to_turn(value)
        return turn if isinstance(turn, str) else (turn,)
    return to_turns(value)


def _trim(answer: Turns) -> Turns | None:
    """The answer up to its last non-empty assistant turn; None unless it starts with an assistant turn."""
    last = max((i for i, (r, c) in enumerate(answer) if r == "assistant" and c.strip()), default=None)
    if not answer or answer[0][0] != "assistant" or last is None:
        return None
    return answer[: last + 1]


def to_preferences(rec: object, where: str) -> list[Preference] | str:
    """The preference one JSON value holds, or the snake_case reason it is skipped."""
    if not isinstance(rec, dict):
        return "not_an_object"
    if "chosen" not in rec or "rejected" not in rec:
        return "missing_chosen_or_rejected"
    system = rec.get("system") or ""
    if not isinstance(system, str):
        return "non_string_system"
    prompt = next((rec[k] for k in PROMPT_KEYS if k in rec), None)
    if prompt is None and "instruction" in rec:
        prompt = rec["instruction"]
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return _text_preference(rec, prompt, chosen, rejected, system, where)
    if prompt is None:
        return _implicit_prompt(chosen, rejected, system, where)
    if isinstance(prompt, str):  # a text prompt with chat answers: one user turn (+ an Alpaca input)
        extra = rec.get("input") if isinstance(rec.get("input"), str) else ""
        prompt = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt}]
    turns = to_turns(prompt, system)
    if isinstance(turns, str):
        return turns
    return _chat_preference(turns, _answer(chosen), _answer(rejected), where)


def _text_preference(
    rec: dict, prompt: str, chosen: str, rejected: str, system: str, where: str
) -> list[Preference] | str:
    """A text prompt (with an optional Alpaca `input`) and two text answers."""
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        return "non_string_input"
    if not prompt.strip():
        return "missing_prompt"
    if not chosen.strip() or not rejected.strip():
        return "empty_answer"
    if chosen == rejected:
        return "identical_answers"
    pair = (Example(prompt, extra, chosen, where, system), Example(prompt, extra, rejected, where, system))
    return [Preference(*pair, where=where)]


def _chat_preference(
    prompt: Turns, chosen: Turns | str, rejected: Turns | str, where: str
) -> list[Preference] | str:
    """Prompt turns and the two answers' turns as two chats sharing the prompt."""
    if isinstance(chosen, str) or isinstance(rejected, str):
        return chosen if isinstance(chosen, str) else rejected
    chosen, rejected = _trim(chosen), _trim(rejected)
    if chosen is None or rejected is None:
        return "answer_not_assistant"
    if chosen == rejected:
        return "identical_answers"
    if not any(c.strip() for _, c in prompt):
        return "missing_prompt"
    pair = (Chat(prompt + chosen, where), Chat(prompt + rejected, where))
    return [Preference(*pair, start=len(prompt), where=where)]


def _implicit_prompt(chosen: object, rejected: object, system: str, where: str) -> list[Preference] | str:
    """Two full conversations: their longest shared run of leading turns is the prompt."""
    a, b = to_turns(chosen, system), to_turns(rejected, system)
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    if shared == len(a) == len(b):
        return "identical_answers"
    if shared == 0:
        return "no_shared_prompt"
    return _chat_preference(a[:shared], a[shared:], b[shared:], where)


def prompt_key(pref: Preference) -> str:
    """The prompt's content: what the train/valid split hashes, so no prompt lands in both splits."""
    if isinstance(pref.chosen, Chat):
        return record_key(Chat(pref.chosen.messages[: pref.start]))
    ex = pref.chosen
    return f"{ex.system}\x00{ex.instruction}\x00{ex.input}"


def pair_key(chosen: Encoded, rejected: Encoded) -> str:
    """sha256 of both token sequences and their masks: equal keys mean equal reference log-probs."""
    h = hashlib.sha256()
    for enc in (chosen, rejected):
        for seq in (enc.input_ids, enc.labels):
            h.update(len(seq).to_bytes(4, "little"))
            h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in seq))
    return h.hexdigest()


def encode_preference(
    tokenizer, pref: Preference, seq_len: int, template: Template = "alpaca"
) -> tuple[Pair | None, str | None]:
    """Encode both sides with the SFT encoder (labels only on the answer); reasons as encode_record."""
    chosen, r1 = encode_record(tokenizer, pref.chosen, seq_len, template, train_from=pref.start)
    rejected, r2 = encode_record(tokenizer, pref.rejected, seq_len, template, train_from=pref.start)
    if chosen is None or rejected is None:
        return None, "prompt_too_long"
    return Pair(chosen, rejected, pair_key(chosen, rejected)), r1 or r2


def encode_preferences(
    tokenizer, prefs: list[Preference], seq_len: int, template: Template = "alpaca"
) -> tuple[list[Pair], Counter]:
    """Encode every preference; counts `truncated` (kept: an answer lost its end) and `prompt_too_long`."""
    return encode_each(prefs, lambda p: encode_preference(tokenizer, p, seq_len, template), seq_len, "pairs")
