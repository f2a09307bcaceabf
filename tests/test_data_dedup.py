"""Dedup (pipeline/data/dedup.py): MinHash rows, partitioned duplicate finding, keep rule, clusters."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.config import DedupConfig
from pipeline.data.dedup import (
    MinHasher,
    apply_dedup,
    cluster_stats,
    find_duplicates,
    merge_partitions,
    write_signatures,
)
from pipeline.io import read_jsonl_zst, write_jsonl_zst

BASE = " ".join(f"word{i} common text here" for i in range(60))


def near_copy(text: str, k: int) -> str:
    words = text.split()
    words[k * 7] = "changed"  # one word in 240: Jaccard of 5-grams about 0.96
    return " ".join(words)


def test_rows_are_deterministic_and_similar_texts_share_bands():
    h = MinHasher(DedupConfig())
    a, b = h.row(BASE), MinHasher(DedupConfig()).row(BASE)
    assert a.dtype == np.uint64 and a.shape == (15,) and (a == b).all()
    assert (
        h.row("Word0 COMMON, text here! " + BASE.split(" ", 4)[4])[0] == a[0]
    )  # case/punctuation do not matter
    near = h.row(near_copy(BASE, 3))
    assert near[0] != a[0] and (near[1:] == a[1:]).sum() >= 8  # most bands agree
    other = h.row(" ".join(f"other{i} unrelated words" for i in range(80)))
    assert (other[1:] == a[1:]).sum() == 0


@pytest.fixture
def shards(tmp_path):
    """Three shards: exact and near copies across and within shards, plus unique documents."""
    texts = [
        [BASE, "unique alpha " * 30, near_copy(BASE, 1)],  # shard 0: keeper, unique, near dup of 0/0
        ["unique beta " * 30, BASE.upper()],  # shard 1: unique, exact dup of 0/0 after normalization
        [near_copy(BASE, 1), "unique gamma " * 30],  # shard 2: exact dup of 0/2 (and near of 0/0)
    ]
    h, sigs, data = MinHasher(DedupConfig()), [], []
    for i, shard in enumerate(texts):
        sigs.append(tmp_path / f"s{i}.sig.npy")
        data.append(tmp_path / f"s{i}.jsonl.zst")
        write_signatures(sigs[-1], [h.row(t) for t in shard], 14)
        write_jsonl_zst(data[-1], [{"id": f"{i}/{j}", "text": t} for j, t in enumerate(shard)])
    return sigs, data


def test_partitions_find_the_same_duplicates_however_many(shards):
    sigs, _ = shards
    one = merge_partitions([find_duplicates(sigs, 0, 1, True, True)], 3)
    four = merge_partitions([find_duplicates(sigs, p, 4, True, True) for p in range(4)], 3)
    assert one == four == {0: {2: "dup_near"}, 1: {1: "dup_exact"}, 2: {0: "dup_exact"}}


def test_exact_only_and_near_only(shards):
    sigs, _ = shards
    exact = merge_partitions([find_duplicates(sigs, 0, 1, True, False)], 3)
    assert exact == {0: {}, 1: {1: "dup_exact"}, 2: {0: "dup_exact"}}
    near = merge_partitions([find_duplicates(sigs, 0, 1, False, True)], 3)
    assert near == {0: {2: "dup_near"}, 1: {1: "dup_near"}, 2: {0: "dup_near"}}


def test_clusters_and_apply(shards, tmp_path):
    sigs, data = shards
    found = [find_duplicates(sigs, p, 2, True, True) for p in range(2)]
    stats = cluster_stats(found)
    assert stats == {"clusters": 1, "documents_in_clusters": 4, "largest": 4, "size_histogram": {"4": 1}}
    drops = merge_partitions(found, 3)
    out = apply_dedup(data[2], tmp_path / "d2.jsonl.zst", tmp_path / "d2.stats.json", drops[2], "h")
    assert [r["id"] for r in read_jsonl_zst(tmp_path / "d2.jsonl.zst")] == ["2/1"]
    assert out["counts"] == {"in": 2, "kept": 1, "dropped": {"dup_exact": 1}, "errors": {}}
    assert (tmp_path / "d2.stats.json").is_file()


def test_empty_shard_and_texts_without_words(tmp_path):
    h = MinHasher(DedupConfig())
    write_signatures(tmp_path / "e.sig.npy", [], 14)
    write_signatures(tmp_path / "p.sig.npy", [h.row("!!! ..."), h.row("??")], 14)
    res = find_duplicates([tmp_path / "e.sig.npy", tmp_path / "p.sig.npy"], 0, 1, True, True)
    assert res["exact"] == [(1 << 32) | 1] and res["near"] == []  # same (empty) normal form: exact only
