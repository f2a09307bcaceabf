"""SFT data: record loading and bad-record accounting, the prompt template, masking token by token,
truncation counting, collation and the deterministic split/batching (no processes, a real tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import DataError
from pipeline.finetune import sft
from pipeline.finetune.sft import IGNORE_INDEX, Example

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"


def make_tokenizer_dir(folder: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """Train a tiny byte-fallback SentencePiece model and write a folder AutoTokenizer loads offline."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(folder / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        character_coverage=0.99,
        minloglevel=2,
    )
    shutil.move(folder / "sp.model", folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # adds tokenizer.json
    return folder


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
