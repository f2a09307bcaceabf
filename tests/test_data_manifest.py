"""manifest.json: written from tokenize_file's entries, verified against the shards, and its errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokens_helpers import shared_small_tokenizer

from pipeline.data.config import TokenizeConfig
from pipeline.data.indexed import bin_path, idx_path
from pipeline.data.manifest import (
    ChecksumRecord,
    load_manifest,
    split_prefixes,
    verify_manifest,
    write_manifest,
)
from pipeline.data.tokenize import tokenize_file
from pipeline.errors import DataError
from pipeline.io import sha256_file, write_jsonl_zst

SAMPLE = Path(__file__).resolve().parent / "data" / "sample" / "instructions.jsonl"
REPO = Path(__file__).resolve().parents[1]


def sample_docs() -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    return [
        {"id": f"instr/{i}", "text": f"{r['instruction']}\n{r['input']}\n{r['output']}"}
        for i, r in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 500-piece tokenizer trained on the shipped instruction sample (once per session)."""
    return shared_small_tokenizer(tmp_path_factory)


def make_tokens(tmp: Path, tok_dir: Path) -> tuple[Path, list[dict]]:
    """Three cleaned shards tokenized into tmp/tokens, plus the manifest; returns (tokens dir, entries)."""
    docs, out = sample_docs(), tmp / "tokens"
    cfg = TokenizeConfig(tokenizer=tok_dir, valid_fraction=0.05)
    entries = []
    for k in range(3):
        write_jsonl_zst(tmp / "cleaned" / f"part-{k}.jsonl.zst", docs[k * 150 : (k + 1) * 150])
        entries += tokenize_file(tmp / "cleaned" / f"part-{k}.jsonl.zst", out, cfg)
    write_manifest(out, entries, tokenizer_dir=tok_dir, config={"name": "t"}, lineage={"inputs": []})
    return out, entries


def test_manifest_schema_and_totals(tmp_path, tok_dir):
    out, entries = make_tokens(tmp_path, tok_dir)
    m = verify_manifest(out)
    assert m["format"] == "megatron-indexed-v1" and m["dtype"] == "uint16"
    assert m["tokenizer"] == {
        "path": str(tok_dir),
        "fingerprint": sha256_file(tok_dir / "tokenizer.model"),
        "vocab_size": 500,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
    }
    assert [e["prefix"] for e in m["splits"]["train"]] == ["part-0.train", "part-1.train", "part-2.train"]
    assert m["config"] == {"name": "t"} and m["lineage"] == {"inputs": []}
    for e in m["splits"]["train"] + m["splits"]["valid"]:  # checksums of both files of every shard
        assert e["sha256"] == {k: sha256_file(out / f"{e['prefix']}.{k}") for k in ("bin", "idx")}
    assert m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"] == 450
    assert m["totals"]["valid"]["tokens"] == sum(e["tokens"] for e in entries if e["split"] == "valid")
    assert split_prefixes(out, m, "valid") == [out / e["prefix"] for e in m["splits"]["valid"]]
    with pytest.raises(DataError, match="no split 'test'"):
        split_prefixes(out, m, "test")


def test_manifest_is_deterministic(tmp_path, tok_dir):
    out, entries = make_tokens(tmp_path, tok_dir)
    first = (out / "manifest.json").read_bytes()
    random.Random(0).shuffle(entries)  # Ray returns shards in completion order
    write_manifest(out, entries, tokenizer_dir=tok_dir, config={"name": "t"}, lineage={"inputs": []})
    assert (out / "manifest.json").read_bytes() == first


def test_flipped_byte_in_bin_is_detected(tmp_path, tok_dir):
    out, _ = make_tokens(tmp_path, tok_dir)
    path = bin_path(out / "part-1.train")
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard part-1.train: sha256 mismatch in .*part-1.train.bin"):
        verify_manifest(out)
    verify_manifest(out, checksums=False)  # same size and counts: only the checksum can tell


def test_checksum_record_hashes_only_changed_files(tmp_path, tok_dir):
    """Verified once, a file is not hashed again until it changes: even a same-size rewrite with its
    modification time set back (its change time moves) is hashed, and its damage found."""
    import os

    out, _ = make_tokens(tmp_path, tok_dir)
    files = 2 * sum(len(es) for es in load_manifest(out)["splits"].values())  # .bin + .idx per shard
    path = tmp_path / "run" / "verified_shards.json"
    first = ChecksumRecord(path)
    verify_manifest(out, record=first)
    assert (first.hashed, first.skipped) == (files, 0) and path.is_file()
    again = ChecksumRecord(path)
    verify_manifest(out, record=again)
    assert (again.hashed, again.skipped) == (0, files)  # a requeue pays nothing
    shard = bin_path(out / "part-1.train")
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime
    damaged = ChecksumRecord(path)
    with pytest.raises(DataError, match="part-1.train: sha256 mismatch"):
        verify_manifest(out, record=damaged)
    path.write_text("{not json")  # an unreadable record only costs a full pass
    verify_manifest(out, checksums=False, record=ChecksumRecord(path))


def test_missing_idx_is_detected(tmp_path, tok_dir):
    out, _ = make_tokens(tmp_path, tok_dir)
    idx_path(out / "part-2.train").unlink()
    with pytest.raises(DataError, match=r"shard part-2.train: missing file .*part-2.train.idx"):
        verify_manifest(out, checksums=False)


def test_truncated_bin_is_detected_without_checksums(tmp_path, tok_dir):
    out, _ = make_tokens(tmp_path, tok_dir)
    path = bin_path(out / "part-0.train")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="part-0.train.bin: holds"):
        verify_manifest(out, checksums=False)


def test_counts_must_match_the_idx(tmp_path, tok_dir):
    out, _ = make_tokens(tmp_path, tok_dir)
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"][0]["documents"] += 1
    m["totals"]["train"]["documents"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="shard part-0.train: .* holds .* manifest says"):
        verify_manifest(out, checksums=False)


def test_foreign_tokenizer_fingerprint(tmp_path, tok_dir):
    out, _ = make_tokens(tmp_path, tok_dir)
    with pytest.raises(DataError, match="tokenizer fingerprint mismatch"):
        verify_manifest(out, fingerprint="0" * 64)
    verify_manifest(out, fingerprint=sha256_file(tok_dir / "tokenizer.model"))


def test_tokenizer_changed_on_disk(tmp_path, tok_dir):
    out, entries = make_tokens(tmp_path, tok_dir)
    moved = tmp_path / "tok_copy"
    moved.mkdir()
    (moved / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    write_manifest(out, entries, tokenizer_dir=moved, config={}, lineage={})
    (moved / "tokenizer.model").write_bytes(b"retrained")
    with pytest.raises(DataError, match="tok_copy/tokenizer.model changed since the shards were made"):
        verify_manifest(out, checksums=False)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="token manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="format is 'other'"):
        load_manifest(tmp_path)


def test_verify_tokens_launcher(tmp_path, tok_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_tokens", REPO / "launch" / "verify_tokens.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    out, _ = make_tokens(tmp_path, tok_dir)
    launcher.main([str(out), "--tokenizer", str(tok_dir)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] and printed["totals"] == load_manifest(out)["totals"]
    idx_path(out / "part-0.valid").unlink()
    with pytest.raises(SystemExit, match="missing file"):
        launcher.main([str(out), "--no-checksums"])
