"""Deduplication across the whole job: exact (normalized-text hash) and MinHash LSH near-duplicates.

Three phases, each split so that no single task sees the whole corpus's work (runner.py schedules
them on Ray; everything here is plain Python and numpy):

1. While a shard is cleaned, `signatures` gives each kept document one row of uint64s: the hash
   of its normalized text, then one hash per LSH band of its MinHash signature (word n-grams,
   bands x rows permutations; FineWeb: 5-grams, 14 x 8). Rows go to `<stem>.sig.npy`.
2. `find_duplicates(paths, p, P)`: partition task p of P reads only the keys that hash to p,
   groups equal keys and marks every document but the keeper as a duplicate. The keeper is the
   document that comes first in (shard order, position): a deterministic rule that does not
   depend on the number of workers. Exact matches win over near ones.
3. `apply_dedup` rewrites one cleaned shard without its duplicates (one task per shard).

Clusters for the report (`cluster_stats`) are the connected components of the duplicate ->
keeper edges, computed from the edges only (their number is bounded by the duplicates found).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import xxhash

from pipeline.data.config import DedupConfig
from pipeline.data.document import Counts
from pipeline.io import atomic_write, read_jsonl_zst, write_json

_WORDS = re.compile(r"\w+")
_CHUNK = 8192  # shingles per permute-and-min step: bounds the (shingles, hashes) temporary
_BAND_SALT = np.uint64(0x9E3779B97F4A7C15)


def normalized_words(text: str) -> list[str]:
    """Lower-cased word characters only: punctuation, case and spacing do not make a text new."""
    return _WORDS.findall(text.lower())


class MinHasher:
    """Document -> [exact hash, band hash x bands] as uint64 (see the module docstring)."""

    def __init__(self, cfg: DedupConfig):
        self.ngram, self.bands, self.rows = cfg.ngram, cfg.bands, cfg.rows
        rng = np.random.default_rng(cfg.seed)
        n = cfg.bands * cfg.rows
        # h -> a*h + b mod 2^64 with odd a: a permutation of uint64 (numpy wraps on overflow)
        self.a = rng.integers(1, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=n, dtype=np.uint64)

    def row(self, text: str) -> np.ndarray:
        words = normalized_words(text)
        out = np.zeros(1 + self.bands, dtype=np.uint64)
        out[0] = xxhash.xxh3_64_intdigest(" ".join(words).encode("utf-8"))
        if words:
            out[1:] = self._bands(self._minhash(words))
        return out

    def _minhash(self, words: list[str]) -> np.ndarray:
        n = self.ngram
        grams = [" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))]
        hashes = np.fromiter(
            (xxhash.xxh3_64_intdigest(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams)
        )
        sig = np.full(self.a.shape, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(hashes), _CHUNK):
                block = hashes[i : i + _CHUNK, None] * self.a + self.b  # (shingles, bands*rows)
                np.minimum(sig, block.min(axis=0), out=sig)
        return sig

    def _bands(self, sig: np.ndarray) -> np.ndarray:
        rows = sig.reshape(self.bands, self.rows)
        return np.fromiter(
            (xxhash.xxh3_64_intdigest(r.tobytes()) for r in rows), dtype=np.uint64, count=self.bands
        )


def write_signatures(path: Path, rows: list[np.ndarray], bands: int) -> None:
    """Write the shard's signature rows (n_docs, 1 + bands) atomically."""
    arr = np.stack(rows) if rows else np.zeros((0, 1 + bands), dtype=np.uint64)
    with atomic_write(path, "wb") as fh:
        np.save(fh, arr)


def _keys(sig: np.ndarray, exact: bool, near: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, row numbers, is_exact) of one shard: the exact hash and every band hash, salted by band."""
    n = len(sig)
    keys, rows, kinds = [], [], []
    if exact:
        keys.append(sig[:, 0])
        rows.append(np.arange(n))
        kinds.append(np.ones(n, dtype=bool))
    if near:
        with np.errstate(over="ignore"):
            for b in range(1, sig.shape[1]):
                has_words = sig[:, b] != 0
                keys.append(sig[has_words, b] ^ (_BAND_SALT * np.uint64(b)))
                rows.append(np.nonzero(has_words)[0])
                kinds.append(np.zeros(int(has_words.sum()), dtype=bool))
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(keys), np.concatenate(rows), np.concatenate(kinds)


def find_duplicates(sig_paths: list[Path], part: int, parts: int, exact: bool, near: bool) -> dict:
    """Partition `part` of `parts`: duplicates among the keys that fall in it.

    Returns {"exact": gids, "near": gids, "edges": (dup gid, keeper gid) pairs}; a gid is
    shard index << 32 | row. Exact and near keys never meet (exact keys are only compared with
    exact keys because the kinds are grouped separately).
    """
    all_keys, all_gids, all_kinds = [], [], []
    for shard, path in enumerate(sig_paths):
        keys, rows, kinds = _keys(np.load(path), exact, near)
        mine = (keys % np.uint64(parts)) == np.uint64(part)
        all_keys.append(keys[mine])
        all_gids.append((np.int64(shard) << np.int64(32)) | rows[mine].astype(np.int64))
        all_kinds.append(kinds[mine])
    if not all_keys:
        return {"exact": [], "near": [], "edges": []}
    keys, gids, kinds = np.concatenate(all_keys), np.concatenate(all_gids), np.concatenate(all_kinds)
    order = np.lexsort((gids, keys, kinds))  # group by (kind, key); first gid of a group keeps
    keys, gids, kinds = keys[order], gids[order], kinds[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (kinds[1:] != kinds[:-1])
    keeper = gids[np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))]
    dup = ~first & (gids != keeper)
    return {
        "exact": sorted(set(gids[dup & kinds].tolist())),
        "near": sorted(set(gids[dup & ~kinds].tolist())),
        "edges": sorted(set(zip(gids[dup].tolist(), keeper[dup].tolist()))),
    }


def merge_partitions(results: list[dict], n_shards: int) -> dict[int, dict[int, str]]:
    """Per shard: {row: "dup_exact" | "dup_near"}; exact wins when a row is both."""
    drops: dict[int, dict[int, str]] = {i: {} for i in range(n_shards)}
    for res in results:
        for gid in res["near"]:
            drops[gid >> 32].setdefault(gid & 0xFFFFFFFF, "dup_near")
    for res in results:
        for gid in res["exact"]:
            drops[gid >> 32][gid & 0xFFFFFFFF] = "dup_exact"
    return drops


def cluster_stats(results: list[dict]) -> dict:
    """Connected components of the duplicate -> keeper edges: count, documents, size histogram."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for res in results:
        for a, b in res["edges"]:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    sizes = Counter(find(x) for x in parent).values()
    hist = Counter(sizes)
    return {
        "clusters": len(sizes),
        "documents_in_clusters": sum(sizes),
        "largest": max(sizes, default=0),
        "size_histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def apply_dedup(src: Path, dst: Path, stats_path: Path, drops: dict[int, str], dedup_hash: str) -> dict:
    """Copy cleaned shard `src` to `dst` without the rows in `drops`; stats.json written last."""
    import zstandard

    counts = Counts()
    with atomic_write(dst, "wb") as fh:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False)
        for row, rec in enumerate(read_jsonl_zst(src)):
            reason = drops.get(row)
            if reason:
                counts.drop(reason)
                continue
            counts.kept += 1
            writer.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        writer.flush(zstandard.FLUSH_FRAME)
    stats = {"input": src.name, "config_hash": dedup_hash, "counts": counts.to_dict()}
    stats["bytes_out"] = dst.stat().st_size
    write_json(stats_path, stats)
    return stats
