"""SFT data: record loading and bad-record accounting (Alpaca, self-instruct, chat), the prompt and
chat templates, masking token by token, truncation counting, collation, packing (same loss as
unpacked), the real SFT samples, and the deterministic split/batching (no processes, a real
tokenizer and a tiny real model)."""

from __future__ import annotations

import json
from pathlib import Path

import dist_helpers
import pytest
import torch
from finetune_helpers import ft_init  # noqa: F401, F811  (a fixture)

from pipeline.errors import DataError
from pipeline.finetune import sft
from pipeline.finetune.records import Chat
from pipeline.finetune.sft import IGNORE_INDEX, Example

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"


def make_tokenizer_dir(folder: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """A tiny byte-fallback SentencePiece tokenizer folder that AutoTokenizer loads offline."""
    return dist_helpers.make_tokenizer_dir(folder, texts, vocab_size, character_coverage=0.99)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    texts = [sft.format_prompt("Explain this.", "x") + "Returns the answer to the question."] * 3
    texts += [f"module number {i} does thing {i * 7} with lists and dicts" for i in range(200)]
    return AutoTokenizer.from_pretrained(make_tokenizer_dir(tmp_path_factory.mktemp("tok"), texts))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- template


def test_template_with_and_without_input():
    assert (
        sft.format_prompt("Do X.", "data") == "### Instruction:\nDo X.\n\n### Input:\ndata\n\n### Response:\n"
    )
    assert sft.format_prompt("Do X.", "") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert sft.format_prompt("Do X.", "  \n") == sft.format_prompt("Do X.")


# ---------------------------------------------------------------- loading


def test_bad_records_are_counted_not_fatal(tmp_path, caplog):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    lines = [
        good,
        "[1, 2]",  # not an object
        json.dumps({"instruction": "a", "output": ""}),  # empty output
        json.dumps({"instruction": "a"}),  # missing output
        json.dumps({"instruction": "a", "input": 3, "output": "b"}),  # non-string input
        json.dumps({"instruction": "", "output": "b"}),  # empty instruction
        "{not json",
        "",
        json.dumps({"instruction": "c", "output": "d"}),  # input may be absent
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    examples, counts = sft.load_examples(path)
    assert [(e.instruction, e.output) for e in examples] == [("a", "b"), ("c", "d")]
    assert examples[0].where == f"{path}:1" and examples[1].where == f"{path}:9"
    assert counts == {
        "not_an_object": 1,
        "missing_output": 2,
        "non_string_input": 1,
        "missing_instruction": 1,
        "bad_json": 1,
    }
    assert len(examples) + sum(counts.values()) == 8  # every non-blank line accounted for
    assert f"{path}:7: skipped record (bad_json)" in caplog.text


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "i", "output": "b"}, "oops"]))
    examples, counts = sft.load_examples(path)
    assert examples == [Example("a", "i", "b", f"{path}:[0]")] and counts == {"not_an_object": 1}


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        ("this is not json\nnor this\n", "not JSON or JSONL"),
        ('[{"instruction": "a",', "not valid JSON"),
        (json.dumps({"instruction": "a", "output": ""}) + "\n", "no usable instruction records"),
    ],
)
def test_unreadable_files_raise_data_error_naming_them(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        sft.load_examples(path)
    assert str(path) in str(info.value)


def test_split_is_deterministic_and_order_independent():
    exs = [Example(f"i{k}", "", f"o{k}") for k in range(400)]
    train, valid = sft.split_examples(exs, 0.1, seed=1)
    assert len(train) + len(valid) == 400 and 20 < len(valid) < 60
    train2, valid2 = sft.split_examples(list(reversed(exs)), 0.1, seed=1)
    assert set(valid2) == set(valid)
    assert set(sft.split_examples(exs, 0.1, seed=2)[1]) != set(valid)
    assert sft.split_examples(exs, 0.0, seed=1)[1] == []


# ---------------------------------------------------------------- masking


def test_masking_token_by_token(tokenizer):
    ex = Example("Explain this.", "x", "Returns the answer.")
    enc, reason = sft.encode_example(tokenizer, ex, seq_len=512)
    assert reason is None
    prompt = tokenizer.encode(sft.format_prompt(ex.instruction, ex.input), add_special_tokens=False)
    response = tokenizer.encode(ex.output, add_special_tokens=False)
    n_prompt = 1 + len(prompt)
    assert enc.input_ids == [tokenizer.bos_token_id] + prompt + response + [tokenizer.eos_token_id]
    assert len(enc.labels) == len(enc.input_ids)
    for i, (tok, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        if i < n_prompt:
            assert lab == IGNORE_INDEX, f"prompt token {i} is trained on"
        else:
            assert lab == tok, f"response token {i} not trained on"
    assert enc.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[n_prompt:-1]).strip() == ex.output


def test_truncation_is_counted(tokenizer):
    short = Example("Explain this.", "", "ok")
    long = Example("Explain this.", "", "word " * 200)
    huge_prompt = Example("Explain this. " * 100, "", "ok")
    enc, counts = sft.encode_examples(tokenizer, [short, long, huge_prompt], seq_len=64)
    assert counts == {"truncated": 1, "prompt_too_long": 1} and len(enc) == 2
    cut = enc[1]
    assert len(cut.input_ids) == 64 and cut.labels[-1] != tokenizer.eos_token_id
    assert cut.labels[-1] == cut.input_ids[-1] != IGNORE_INDEX


def test_collate_pads_and_masks(tokenizer):
    items = [sft.Encoded([2, 10, 11, 12], [-100, -100, 11, 12]), sft.Encoded([2, 20], [-100, 20])]
    b = sft.collate(items, seq_len=6, pad_id=0)
    assert b["input_ids"].tolist() == [[2, 10, 11, 12, 0, 0], [2, 20, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 11, 12, -100, -100], [-100, 20, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert sft.target_tokens(b) == 3
    empty = sft.collate([], seq_len=6, pad_id=0)
    assert empty["input_ids"].shape == (1, 6) and sft.target_tokens(empty) == 0
    assert sft.pad_id_of(tokenizer) in (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_sample_file_encodes(tokenizer):
    examples, counts = sft.load_examples(SAMPLE)
    assert len(examples) > 1000 and not counts
    enc, _ = sft.encode_examples(tokenizer, examples[:50], seq_len=256)
    b = sft.collate(enc[:4], 256, sft.pad_id_of(tokenizer))
    assert b["input_ids"].dtype == torch.long and sft.target_tokens(b) > 0


# ---------------------------------------------------------------- batching


def test_step_batches_do_not_depend_on_world_size():
    data = [sft.Encoded([k], [k]) for k in range(37)]

    def step_samples(step, dp):
        got = []
        for r in range(dp):
            got += [
                e.input_ids[0]
                for mb in sft.train_micro_batches(
                    data, step=step, global_size=8, micro_size=2, dp_rank=r, dp_size=dp, seed=3
                )
                for e in mb
            ]
        return sorted(got)

    assert sft.steps_per_epoch(37, 8) == 4
    for step in (0, 3, 4, 9):
        assert step_samples(step, 1) == step_samples(step, 2) == step_samples(step, 4)
    epoch0 = sum((step_samples(s, 2) for s in range(4)), [])
    assert len(set(epoch0)) == 32  # no repeats within an epoch
    assert step_samples(4, 2) != step_samples(0, 2)  # next epoch reshuffles


def test_eval_batches_equal_count_per_rank():
    data = [sft.Encoded([k], [k]) for k in range(5)]
    per_rank = [list(sft.eval_micro_batches(data, micro_size=2, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    seen = sorted(e.input_ids[0] for batches in per_rank for mb in batches for e in mb)
    assert seen == list(range(5))


# ---------------------------------------------------------------- chat, self-instruct, packing


@pytest.fixture(scope="module")
def ft_tok(ft_init):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ft_init)


def test_chat_masks_everything_but_assistant_turns_token_by_token(ft_tok):
    tok = ft_tok
    chat = Chat(
        (
            ("system", "Be brief."),
            ("user", "Hi there"),
            ("assistant", "Hello! How are you?"),
            ("user", "Fine."),
            ("assistant", "Good."),
        )
    )
    enc, reason = sft.encode_chat(tok, chat, seq_len=512)
    assert reason is None

    def ids(text):
        return tok.encode(text, add_special_tokens=False)

    # the template, piece by piece: (ids, trained?)
    parts = [([tok.bos_token_id], False)]
    for role, content in chat.messages:
        parts.append((ids(f"<|{role}|>\n"), False))
        if role == "assistant":
            parts += [(ids(content) + [tok.eos_token_id], True), (ids("\n"), False)]
        else:
            parts.append((ids(content + "\n"), False))
    want_ids = [i for p, _ in parts for i in p]
    want_labels = [i if trained else IGNORE_INDEX for p, trained in parts for i in p]
    assert enc.input_ids == want_ids
    for k, (got, want) in enumerate(zip(enc.labels, want_labels)):
        assert got == want, f"token {k} ({tok.decode([enc.input_ids[k]])!r}): label {got}, want {want}"
    trained = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert trained.replace("<|eos|>", "|") == "Hello! How are you?|Good.|"


def test_alpaca_records_under_the_chat_template(ft_tok):
    ex = Example("Name a colour.", "", "Blue.")
    enc, _ = sft.encode_record(ft_tok, ex, 256, template="chat")
    text = ft_tok.decode(enc.input_ids)
    assert text.startswith("<|bos|><|user|>\nName a colour.\n<|assistant|>\nBlue.<|eos|>")
    assert (
        ft_tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
        == "Blue.<|eos|>"
    )
    cut, reason = sft.encode_record(ft_tok, Example("word " * 100, "", "Blue."), 16, template="chat")
    assert cut is None and reason == "prompt_too_long"
    cut, reason = sft.encode_record(ft_tok, Example("Hi", "", "word " * 100), 24, template="chat")
    assert reason == "truncated" and len(cut.input_ids) == 24 and cut.labels[-1] != IGNORE_INDEX


def test_chat_and_self_instruct_records_are_checked(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [
        json.dumps({"messages": msgs}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # nothing to learn
        json.dumps({"messages": [{"role": "robot", "content": "x"}, *msgs]}),
        json.dumps({"messages": "hi"}),
        json.dumps(
            {
                "instruction": "Add.",
                "instances": [{"input": "1+1", "output": "2"}, {"input": "", "output": "0"}],
            }
        ),
        json.dumps({"instruction": "Add.", "instances": []}),
    ]
    records, counts = sft.load_examples(write_jsonl(tmp_path / "c.jsonl", lines))
    assert counts == {"no_assistant_turn": 1, "unknown_role": 1, "bad_messages": 1, "bad_instances": 1}
    assert records[0] == Chat((("user", "hi"), ("assistant", "hello")), f"{tmp_path / 'c.jsonl'}:1")
    assert [(r.input, r.output) for r in records[1:]] == [("1+1", "2"), ("", "0")]


def test_chat_needs_a_template(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no chat_template"):
        sft.check_chat_template(tokenizer, tmp_path)


def test_real_sft_samples_load_and_encode(raw_samples, ft_tok):
    """The real files in ../shared/data/raw/sft: every record loads, and encoding counts truncation."""
    expect = {"alpaca_en_demo.json": 999, "alpaca_zh_demo.json": 1000, "self-instruct-seed_tasks.jsonl": 175}
    for name, n in expect.items():
        records, bad = sft.load_examples(raw_samples / "sft" / name)
        assert len(records) + sum(bad.values()) == n, (name, bad)
        assert len(records) >= 0.98 * n
        some = records[:200]
        enc, counts = sft.encode_examples(ft_tok, some, seq_len=128, template="chat")
        assert len(enc) + counts["prompt_too_long"] == len(some) and counts["truncated"] > 0
        assert all(len(e.input_ids) <= 128 and any(lab != IGNORE_INDEX for lab in e.labels) for e in enc)


def test_pack_resets_positions_and_fills_rows():
    items = [sft.Encoded([2, k, k], [-100, k, k]) for k in range(5)]  # 3 tokens each
    rows = sft.pack(items, seq_len=7)
    assert [r.input_ids for r in rows] == [[2, 0, 0, 2, 1, 1], [2, 2, 2, 2, 3, 3], [2, 4, 4]]
    assert rows[0].position_ids == [0, 1, 2, 0, 1, 2]
    b = sft.collate(rows, seq_len=7, pad_id=0)
    assert "attention_mask" not in b  # transformers derives the block-diagonal mask from the resets
    assert b["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert sft.target_tokens(b) == 10


def test_packed_loss_equals_unpacked_loss(ft_init, ft_tok):  # noqa: F811
    """Same per-token logits and the same summed loss, packed into one row or one example per row."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ft_init, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    records = [Example(f"Say {w}.", "", f"{w} {w} {w}") for w in ("one", "two", "three")]
    records.append(Chat((("user", "Hi"), ("assistant", "Hello there."))))
    enc = [sft.encode_record(ft_tok, r, 64)[0] for r in records]
    T = sum(len(e.input_ids) for e in enc) + 5  # room for padding at the end of the packed row

    def loss_and_logits(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.no_grad():
            logits = model(**inputs).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
        )
        return float(loss), logits

    packed_rows = sft.pack(enc, T)
    assert len(packed_rows) == 1
    packed_loss, packed_logits = loss_and_logits(sft.collate(packed_rows, T, 0))
    plain_loss, plain_logits = loss_and_logits(sft.collate(enc, T, 0))
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    start = 0
    for i, e in enumerate(enc):
        n = len(e.input_ids)
        torch.testing.assert_close(
            packed_logits[0, start : start + n], plain_logits[i, :n], atol=1e-5, rtol=1e-5
        )
        start += n
    # and attention really is blocked: without the position resets the later examples' logits change
    leaky = sft.collate([sft.Encoded(packed_rows[0].input_ids, packed_rows[0].labels)], T, 0)
    assert not torch.allclose(
        loss_and_logits(leaky)[1][0, len(enc[0].input_ids) : start],
        packed_logits[0, len(enc[0].input_ids) : start],
        atol=1e-3,
    )
