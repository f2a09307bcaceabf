"""tokenize_file: cleaned shard -> .bin/.idx with SentencePiece ids + EOS, hash split, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokens_helpers import read_by_spec, shared_small_tokenizer, write_by_spec

from pipeline.data.config import TokenizeConfig
from pipeline.data.indexed import IndexedDataset, bin_path, idx_path
from pipeline.data.tokenize import is_valid, shard_stem, tokenize_file
from pipeline.errors import ConfigError, DataError
from pipeline.io import sha256_file, write_jsonl_zst

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"


def sample_docs(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:n]
    return [
        {
            "id": f"instr/{i}",
            "text": f"{r['instruction']}\n{r['input']}\n{r['output']}",
            "source": "t",
            "meta": {},
        }
        for i, r in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 500-piece tokenizer trained on the shipped instruction sample (once per session)."""
    return shared_small_tokenizer(tmp_path_factory)


def shard(tmp: Path, docs: list[dict], name: str = "part-0") -> Path:
    path = tmp / "cleaned" / f"{name}.jsonl.zst"
    write_jsonl_zst(path, docs)
    return path


def read_split(out: Path, stem: str, split: str) -> list[list[int]]:
    ds = IndexedDataset(out / f"{stem}.{split}")
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_ids_are_sentencepiece_plus_eos(tmp_path, tok_dir):
    docs = sample_docs(300)
    cfg = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.1, batch_size=64)
    entries = tokenize_file(shard(tmp_path, docs), tmp_path / "tokens", cfg)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    want = {"train": [], "valid": []}
    for d in docs:
        want["valid" if is_valid(d["id"], 0.1) else "train"].append(sp.encode(d["text"]) + [sp.eos_id()])
    assert 0 < len(want["valid"]) < 60
    for split in ("train", "valid"):
        assert read_split(tmp_path / "tokens", "part-0", split) == want[split]
    assert [e["split"] for e in entries] == ["train", "valid"]
    assert entries[0]["prefix"] == "part-0.train" and entries[0]["documents"] == len(want["train"])
    assert entries[0]["tokens"] == sum(map(len, want["train"]))
    assert IndexedDataset(tmp_path / "tokens" / "part-0.train").dtype.name == "uint16"
    for split in ("train", "valid"):  # the files are byte for byte the layout, built independently
        prefix = tmp_path / "tokens" / f"part-0.{split}"
        assert (idx_path(prefix).read_bytes(), bin_path(prefix).read_bytes()) == write_by_spec(
            [np.array(ids) for ids in want[split]], np.uint16
        )
        assert [s.tolist() for s in read_by_spec(prefix)[1]] == want[split]


@pytest.mark.parametrize("shard_tokens", [0, 1500])
def test_output_bytes_are_deterministic(tmp_path, tok_dir, shard_tokens):
    src = shard(tmp_path, sample_docs(200))
    outs = []
    for k, batch in enumerate([512, 1, 7]):  # the batch size must not change the bytes
        out = tmp_path / f"tokens{k}"
        cfg = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.2, batch_size=batch)
        tokenize_file(src, out, cfg, shard_tokens=shard_tokens)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2]


def test_valid_split_is_stable_when_the_corpus_grows(tmp_path, tok_dir):
    cfg = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.1)
    small, big = sample_docs(200), sample_docs(600)
    tokenize_file(shard(tmp_path, small, "small"), tmp_path / "tokens", cfg)
    tokenize_file(shard(tmp_path, big, "big"), tmp_path / "tokens", cfg)
    valid_small = read_split(tmp_path / "tokens", "small", "valid")
    valid_big = read_split(tmp_path / "tokens", "big", "valid")
    assert valid_small == valid_big[: len(valid_small)]  # same documents, same order, more after
    assert len(valid_big) > len(valid_small)
    assert is_valid("enwiki/1", 0.5) == is_valid("enwiki/1", 0.5) and not is_valid("x", 0.0)


def test_rerun_skips_a_finished_shard_and_redoes_a_changed_one(tmp_path, tok_dir):
    src, out = shard(tmp_path, sample_docs(100)), tmp_path / "tokens"
    cfg = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.1)
    first = tokenize_file(src, out, cfg)
    stamp = bin_path(out / "part-0.train").stat().st_mtime_ns
    assert tokenize_file(src, out, cfg) == first
    assert bin_path(out / "part-0.train").stat().st_mtime_ns == stamp  # skipped: not rewritten
    bin_path(out / "part-0.train").unlink()  # a kill between the shard and its marker
    assert tokenize_file(src, out, cfg) == first
    none_valid = tokenize_file(src, out, TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.0))
    assert [e["split"] for e in none_valid] == ["train"]
    assert not idx_path(out / "part-0.valid").exists()  # no stale valid shard left behind


def test_bad_records_are_counted_not_fatal(tmp_path, tok_dir):
    docs = sample_docs(20) + [
        {"id": "a"},
        {"id": "b", "text": ["list"]},
        {"id": "c", "text": ""},
        {"text": "a document without an id"},
    ]
    entries = tokenize_file(
        shard(tmp_path, docs), tmp_path / "tokens", TokenizeConfig(tokenizer=tok_dir, valid_fraction=0)
    )
    assert entries[0]["documents"] == 21
    marker = json.loads((tmp_path / "tokens" / "part-0.tokens.json").read_text())
    assert marker["problems"] == {"no_text": 3, "no_id": 1}


def test_user_errors(tmp_path, tok_dir):
    with pytest.raises(DataError, match="not found"):
        tokenize_file(tmp_path / "missing.jsonl.zst", tmp_path, TokenizeConfig(tokenizer=tok_dir))
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd")
    with pytest.raises(DataError, match="garbage.jsonl.zst: unreadable"):
        tokenize_file(garbage, tmp_path / "tokens", TokenizeConfig(tokenizer=tok_dir))
    with pytest.raises(ConfigError, match="tokenizer.model not found"):
        tokenize_file(shard(tmp_path, sample_docs(2)), tmp_path, TokenizeConfig(tokenizer=tmp_path))
    assert shard_stem(Path("a/enwiki-1.jsonl.zst")) == "enwiki-1"


def test_shard_tokens_cuts_splits_into_sized_shards(tmp_path, tok_dir):
    src, cfg = shard(tmp_path, sample_docs(400)), TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.1)
    whole = tokenize_file(src, tmp_path / "whole", cfg)
    cut = tokenize_file(src, tmp_path / "cut", cfg, shard_tokens=2000)
    train = [e for e in cut if e["split"] == "train"]
    assert [e["prefix"] for e in train] == [f"part-0.train.{k:04d}" for k in range(len(train))]
    assert len(train) > 3 and all(e["tokens"] >= 2000 for e in train[:-1])
    for e in train[:-1]:  # a shard ends with the document that reaches the limit
        last = IndexedDataset(tmp_path / "cut" / e["prefix"])
        assert e["tokens"] - len(last[len(last) - 1]) < 2000
    for split in ("train", "valid"):  # the same documents, in the same order
        docs = [
            d.tolist()
            for e in cut
            if e["split"] == split
            for ds in [IndexedDataset(tmp_path / "cut" / e["prefix"])]
            for d in (ds[i] for i in range(len(ds)))
        ]
        assert docs == read_split(tmp_path / "whole", "part-0", split)
    assert sum(e["tokens"] for e in cut) == sum(e["tokens"] for e in whole)
    for e in cut:  # checksums computed while streaming are those of the files
        assert e["sha256"]["bin"] == sha256_file(bin_path(tmp_path / "cut" / e["prefix"]))
    tokenize_file(src, tmp_path / "cut", cfg)  # other settings: the numbered shards are removed
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "part-0.tokens.json",
        "part-0.train.bin",
        "part-0.train.idx",
        "part-0.valid.bin",
        "part-0.valid.idx",
    ]


def test_truncated_or_corrupt_input_leaves_no_output(tmp_path, tok_dir):
    import zstandard

    cfg, out = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.1, batch_size=16), tmp_path / "tokens"
    src = shard(tmp_path, sample_docs(400))
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # zstd reads this as 0 rows, no error
    with pytest.raises(DataError, match="part-0.jsonl.zst: unreadable: truncated zstd"):
        tokenize_file(src, out, cfg)
    lines = [json.dumps(d) for d in sample_docs(400)]
    lines[300] = '{"id": "broken", "text": "cut'  # fails after 300 documents were streamed out
    src.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    with pytest.raises(DataError, match="unreadable after record 300"):
        tokenize_file(src, out, cfg, shard_tokens=1000)
    assert list(out.iterdir()) == []  # finished pieces of the bad shard and temp files are gone
