"""SFT record shapes users bring: Alpaca (with system prompt and history), ShareGPT, OpenAI messages
(with content parts and system prompts); bad records counted by reason; and, on the real Alpaca
files (English and Chinese), the same conversation written in all three shapes encodes to the
same tokens with the loss on the assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_helpers import ft_init, ft_tok  # noqa: F401  (fixtures)

from pipeline.finetune import sft
from pipeline.finetune.records import Chat, Example, load_examples, record_key
from pipeline.finetune.sft import IGNORE_INDEX


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_sharegpt_and_openai_shapes_give_the_same_chat(tmp_path):
    sharegpt = {
        "system": "Answer in one word.",
        "conversations": [
            {"from": "human", "value": "Colour of the sky?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "Human", "value": "And grass?"},  # role names are matched case-insensitively
            {"from": "gpt", "value": "Green."},
        ],
    }
    openai = {
        "messages": [
            {"role": "developer", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Colour of "}, {"type": "text", "text": "the sky?"}],
            },
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
            {"role": "assistant", "content": "Green."},
            {"role": "user", "content": "Thanks!"},  # after the last answer: nothing to learn, dropped
        ]
    }
    user_assistant = {  # ShareGPT exports that use OpenAI's role names under from/value
        "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "user", "value": "Colour of the sky?"},
            {"from": "assistant", "value": "Blue."},
            {"from": "user", "value": "And grass?"},
            {"from": "assistant", "value": "Green."},
        ],
        "system": "ignored: the conversation has its own system turn",
    }
    path = write_jsonl(tmp_path / "chats.jsonl", [sharegpt, openai, user_assistant])
    records, counts = load_examples(path)
    want = (
        ("system", "Answer in one word."),
        ("user", "Colour of the sky?"),
        ("assistant", "Blue."),
        ("user", "And grass?"),
        ("assistant", "Green."),
    )
    assert not counts and [r.messages for r in records] == [want] * 3
    assert [r.where for r in records] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_alpaca_system_prompt_and_history(tmp_path):
    plain = {
        "instruction": "Translate: cat",
        "input": "",
        "output": "猫",
        "system": "You translate to Chinese.",
    }
    with_history = {
        "instruction": "And dog?",
        "input": "",
        "output": "狗",
        "system": "You translate to Chinese.",
        "history": [["Translate: cat", "猫"]],
    }
    path = write_jsonl(tmp_path / "a.jsonl", [plain, with_history])
    (ex, chat), counts = load_examples(path)
    assert not counts
    assert ex == Example("Translate: cat", "", "猫", f"{path}:1", "You translate to Chinese.")
    assert sft.format_prompt(ex.instruction, ex.input, ex.system) == (
        "You translate to Chinese.\n\n### Instruction:\nTranslate: cat\n\n### Response:\n"
    )
    assert sft.as_chat(ex).messages[0] == ("system", "You translate to Chinese.")
    assert chat == Chat(
        (
            ("system", "You translate to Chinese."),
            ("user", "Translate: cat"),
            ("assistant", "猫"),
            ("user", "And dog?"),
            ("assistant", "狗"),
        ),
        f"{path}:2",
    )
    assert record_key(ex) != record_key(Example("Translate: cat", "", "猫"))  # the system prompt counts
    assert record_key(Example("a", "", "b")) == "a\x00\x00b"  # records without one keep their split


def test_bad_chat_records_are_counted_by_reason(tmp_path):
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]},
        {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": []},
        {"system": 3, "conversations": ok["conversations"]},
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # preference data belongs to task dpo
        {"instruction": "i", "output": "o", "history": [["only one half"]]},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", [ok, *bad])
    records, counts = load_examples(path)
    assert len(records) == 1 and len(records) + sum(counts.values()) == 1 + len(bad)
    assert counts == {
        "unknown_role": 2,
        "bad_messages": 3,
        "no_assistant_turn": 1,
        "non_string_system": 1,
        "preference_record": 1,
        "bad_history": 1,
    }


def _three_shapes(records: list[dict], system: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The same two-turn conversations as Alpaca (+history), ShareGPT and OpenAI records."""
    alpaca, sharegpt, openai = [], [], []
    for first, second in zip(records[0::2], records[1::2]):
        q1 = f"{first['instruction']}\n\n{first['input']}" if first["input"].strip() else first["instruction"]
        alpaca.append({**second, "system": system, "history": [[q1, first["output"]]]})
        q2 = (
            f"{second['instruction']}\n\n{second['input']}"
            if second["input"].strip()
            else second["instruction"]
        )
        turns = [("user", q1), ("assistant", first["output"]), ("user", q2), ("assistant", second["output"])]
        names = {"user": "human", "assistant": "gpt"}
        sharegpt.append(
            {"system": system, "conversations": [{"from": names[r], "value": c} for r, c in turns]}
        )
        msgs = [{"role": "system", "content": system}] + [{"role": r, "content": c} for r, c in turns]
        openai.append({"messages": msgs})
    return alpaca, sharegpt, openai


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_real_alpaca_as_three_shapes_encodes_identically(raw_samples, ft_tok, tmp_path, name):  # noqa: F811
    """Real records (English / Chinese) paired into two-turn chats with a system prompt, written as
    Alpaca+history, ShareGPT and OpenAI files: the same records, the same tokens, and the trained
    tokens are exactly the assistant answers with their EOS."""
    real = json.loads((raw_samples / "sft" / name).read_text(encoding="utf-8"))[:40]
    system = "你是一个乐于助人的助手。" if "zh" in name else "You are a helpful assistant."
    loaded = []
    for k, shape in enumerate(_three_shapes(real, system)):
        records, counts = load_examples(write_jsonl(tmp_path / f"{k}.jsonl", shape))
        assert not counts and len(records) == 20
        loaded.append(records)
    assert (
        [r.messages for r in loaded[0]] == [r.messages for r in loaded[1]] == [r.messages for r in loaded[2]]
    )
    encoded = [sft.encode_examples(ft_tok, recs, seq_len=2048, template="alpaca")[0] for recs in loaded]
    assert encoded[0] == encoded[1] == encoded[2] and len(encoded[0]) == 20
    eos = ft_tok.eos_token
    for chat, enc in zip(loaded[0], encoded[0]):
        trained = ft_tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
        answers = [c for r, c in chat.messages if r == "assistant"]
        assert trained == "".join(f"{a}{eos}" for a in answers)
        assert ft_tok.decode(enc.input_ids).count(system) == 1
