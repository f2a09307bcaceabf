"""Deduplication across the whole job: exact (normalized-text hash) and MinHash LSH near-duplicates.

No step sees the whole corpus; the memory of every task is stated in the README (data prep).

1. While a shard is cleaned, `MinHasher.row` gives each kept document its exact hash and one
   hash per LSH band, and `write_signatures` stores them as *index keys* sorted by key
   (`<stem>.sig.npy`). MinHash is the textbook one: shingles are word n-grams (FineWeb: 5-grams,
   14 bands x 8 rows), each hashed to 32 bits, and permutation i is the universal hash
   h_i(x) = (a_i x + b_i) mod (2^61 - 1), computed exactly in uint64 (no overflow).
2. `find_partition(p of P)` reads only its slice of the key space from every signature file
   (a binary search on a memory map), groups equal keys, and hands the edges to
   `clusters.seed_partition`; `clusters.label_components` then finds the connected components
   in rounds of tasks. A component keeps its smallest gid, the document that comes first in
   (shard order, position): deterministic, whatever P or the number of workers.
3. `finish_bucket` writes each shard's decisions (`drops-<shard>.npy`: rows dropped, and the
   cluster size of each keeper) and `apply_dedup` rewrites one cleaned shard from its own file,
   putting `meta["dedup_cluster_size"]` on every kept document (1 when it has no duplicate).

Scripts without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Myanmar) are split
into single characters, so their shingles are character n-grams.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from pipeline.data import clusters
from pipeline.data.config import DedupConfig
from pipeline.data.document import Counts
from pipeline.io import atomic_write, read_jsonl_zst, write_json

NOSPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002fa1f"
)
_TOKENS = re.compile(rf"[{NOSPACE_SCRIPTS}]|[^\W{NOSPACE_SCRIPTS}]+")
MERSENNE_61 = (1 << 61) - 1
_P = np.uint64(MERSENNE_61)
_CHUNK = 256  # shingles per permute-and-min step: the (256, bands*rows) temporaries stay in cache
_BAND_SALT = np.uint64(0x9E3779B97F4A7C15)  # key of band b = band hash ^ (salt * b): bands never meet
_TAG_BITS = 16  # a key's tag: row << 16 | column (0: exact hash, b: band b)
log = logging.getLogger(__name__)
REASONS = ("", "dup_exact", "dup_near")  # codes in the drops files (0: kept)


def normalized_words(text: str) -> list[str]:
    """Lower-cased word tokens (a character each in scripts written without spaces); punctuation dropped."""
    return _TOKENS.findall(text.lower())


class MinHasher:
    """Document -> [exact hash, band hash x bands] as uint64 (see the module docstring)."""

    def __init__(self, cfg: DedupConfig):
        self.ngram, self.bands, self.rows = cfg.ngram, cfg.bands, cfg.rows
        rng = np.random.default_rng(cfg.seed)
        n = cfg.bands * cfg.rows
        self.a = rng.integers(1, MERSENNE_61, size=n, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_61, size=n, dtype=np.uint64)
        odd = rng.integers(0, 1 << 63, size=cfg.ngram, dtype=np.uint64)
        self._gram_mult = odd * np.uint64(2) + np.uint64(1)  # n-gram hash multipliers
        self._a_hi, self._a_lo = self.a >> np.uint64(31), self.a & np.uint64((1 << 31) - 1)

    def row(self, text: str) -> np.ndarray:
        """[exact hash, band hashes]; the band hashes are 0 when the text has no words."""
        words = normalized_words(text)
        out = np.zeros(1 + self.bands, dtype=np.uint64)
        out[0] = xxhash.xxh3_64_intdigest(" ".join(words).encode("utf-8"))
        if words:
            sig = self._minhash(words).reshape(self.bands, self.rows)
            out[1:] = [xxhash.xxh3_64_intdigest(r.tobytes()) for r in sig]
        return out

    def signature(self, text: str) -> np.ndarray:
        """The bands*rows MinHash values (each < 2^61 - 1) of `text`; all 2^64-1 when it has no words."""
        words = normalized_words(text)
        return self._minhash(words) if words else np.full(self.a.shape, np.iinfo(np.uint64).max)

    def shingle_hashes(self, words: list[str]) -> np.ndarray:
        """32-bit hashes of the word n-grams (one n-gram of all words when there are fewer than n).

        Each word is hashed once; an n-gram's hash is the top 32 bits of sum_j c_j h(word_j) mod 2^64
        (odd random c_j), which is as good as hashing the joined n-gram and about twice as fast."""
        wh = np.fromiter((xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in words), np.uint64, len(words))
        n = min(self.ngram, len(wh))
        grams = wh[: len(wh) - n + 1] * self._gram_mult[0]
        for j in range(1, n):
            grams += wh[j : len(wh) - n + 1 + j] * self._gram_mult[j]
        return grams >> np.uint64(32)

    def _minhash(self, words: list[str]) -> np.ndarray:
        x = self.shingle_hashes(words)
        sig = np.full(self.a.shape, np.iinfo(np.uint64).max, dtype=np.uint64)
        t = np.empty((min(len(x), _CHUNK), len(self.a)), dtype=np.uint64)
        s = np.empty_like(t)
        for i in range(0, len(x), _CHUNK):
            np.minimum(
                sig, self._permute_min(x[i : i + _CHUNK, None], t[: len(x) - i], s[: len(x) - i]), out=sig
            )
        return sig

    def _permute_min(self, x: np.ndarray, t: np.ndarray, s: np.ndarray) -> np.ndarray:
        """min over shingles x (n, 1) of (a x + b) mod p, exactly, into the buffers t and s (n, k).

        a = a_hi 2^31 + a_lo; a_hi x < 2^62 = h 2^30 + l, and 2^61 = 1 (mod p), so
        a_hi x 2^31 = h + l 2^31 (mod p). Every partial sum below stays under 2^64."""
        np.multiply(x, self._a_hi, out=t)
        np.bitwise_and(t, np.uint64((1 << 30) - 1), out=s)
        s <<= np.uint64(31)
        t >>= np.uint64(30)
        s += t  # a_hi x 2^31 mod p, < 2^61 + 2^32
        np.multiply(x, self._a_lo, out=t)  # < 2^63
        s += t
        s += self.b  # < 2^63 + 2^62 + 2^32
        np.right_shift(s, np.uint64(61), out=t)
        s &= _P
        s += t  # < p + 8: one fold left
        if s.max() >= _P:  # rare (about 8 in 2^61 values): finish the reduction
            s += (s + np.uint64(1)) >> np.uint64(61)
            s &= _P
        return s.min(axis=0)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The share of equal MinHash values: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def write_signatures(path: Path, rows: list[np.ndarray], bands: int) -> None:
    """Write a shard's index keys sorted by key: (2, n) uint64 [key, row << 16 | column], atomically."""
    sig = np.stack(rows) if rows else np.zeros((0, 1 + bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = sig ^ (_BAND_SALT * np.arange(1 + bands, dtype=np.uint64))  # column 0 (exact) unsalted
    tags = (np.arange(len(sig), dtype=np.uint64)[:, None] << np.uint64(_TAG_BITS)) | np.arange(
        1 + bands, dtype=np.uint64
    )
    present = np.ones(sig.shape, dtype=bool)
    present[:, 1:] = sig[:, 1:] != 0  # no band keys for a text without words
    keys, tags = keys[present], tags[present]
    order = np.argsort(keys, kind="stable")
    clusters.save_sorted(path, keys[order], tags[order])


def key_range(part: int, parts: int) -> tuple[int, int]:
    """Partition `part` of `parts` owns the keys in [lo, hi) of the uint64 range."""
    return (part << 64) // parts, ((part + 1) << 64) // parts


def find_partition(sigs: list[Path], part: int, parts: int, work: Path, exact: bool, near: bool) -> int:
    """Duplicates among the keys of partition `part`: exact drops to `exact-p<part>.npy`, edges to clusters."""
    keys, gids, is_exact = _read_keys(sigs, *key_range(part, parts), exact, near)
    order = np.lexsort((gids, is_exact, keys))  # groups of equal (key, kind), smallest gid first
    keys, gids, is_exact = keys[order], gids[order], is_exact[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]) | (is_exact[1:] != is_exact[:-1])
    keeper = gids[np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))]
    dup = ~first & (gids != keeper)
    clusters.save_sorted(work / f"exact-p{part}.npy", np.unique(gids[dup & is_exact]))
    return clusters.seed_partition(work, part, gids[dup], keeper[dup])


def _read_keys(sigs: list[Path], lo: int, hi: int, exact: bool, near: bool) -> tuple:
    """(keys, gids, is_exact) in [lo, hi) over all shards; a gid is shard << 32 | row."""
    keys, gids, kinds = [], [], []
    for shard, path in enumerate(sigs):
        key, tag = clusters.read_range(path, lo, hi)
        column = tag & np.uint64((1 << _TAG_BITS) - 1)
        want = (column == 0) & exact | (column != 0) & near
        keys.append(key[want])
        gids.append((np.uint64(shard) << np.uint64(32)) | (tag[want] >> np.uint64(_TAG_BITS)))
        kinds.append(column[want] == 0)
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, bool)
    return np.concatenate(keys), np.concatenate(gids), np.concatenate(kinds)


def decide(run: Callable, sigs: list[Path], parts: int, work: Path, exact: bool, near: bool) -> dict:
    """Every task of the decision (find, components, cluster sizes, drops files in `work`), run
    through `run(fn, calls, desc)` (the job's Ray map, or a plain loop); returns the cluster stats."""
    calls = [(sigs, p, parts, work, exact, near) for p in range(parts)]
    memberships = sum(run(find_partition, calls, "dedup: find"))
    buckets = shard_buckets(len(sigs), parts)
    rnd = clusters.label_components(run, work, parts, [(r.start << 32, r.stop << 32) for r in buckets])
    run(count_labels, [(work, rnd, b) for b in range(len(buckets))], "dedup: cluster sizes")
    calls = [(work, rnd, b, r, len(buckets), parts) for b, r in enumerate(buckets)]
    found = cluster_stats(run(finish_bucket, calls, "dedup: decisions"))
    log.info(
        "dedup: %d partitions, %d buckets, %d memberships, stable after round %d",
        parts, len(buckets), memberships, rnd,
    )  # fmt: skip
    return {**found, "partitions": parts, "buckets": len(buckets), "rounds": rnd}


def shard_buckets(shards: int, parts: int) -> list[range]:
    """Contiguous shard ranges, one component bucket each: as many as partitions, at most one per shard."""
    n = max(1, min(parts, shards))
    return [range(b * shards // n, (b + 1) * shards // n) for b in range(n)]


def count_labels(work: Path, rnd: int, bucket: int) -> None:
    """`counts-b<bucket>.npy`: [label, members] of the bucket's nodes, by label."""
    _, label = clusters.final_labels(work, rnd, bucket)
    labels, counts = np.unique(label, return_counts=True)
    clusters.save_sorted(work / f"counts-b{bucket}.npy", labels, counts)


def finish_bucket(work: Path, rnd: int, bucket: int, shards: range, buckets: int, parts: int) -> dict:
    """Write `drops-<shard>.npy` ([row, reason code, cluster size]) for the bucket's shards; returns a size histogram."""
    lo, hi = shards.start << 32, shards.stop << 32
    gid, label = clusters.final_labels(work, rnd, bucket)
    counted = np.concatenate(
        [clusters.read_range(work / f"counts-b{b}.npy", lo, hi) for b in range(buckets)], 1
    )
    keepers, sizes = np.unique(counted[0], return_inverse=True)
    size = np.bincount(sizes, weights=counted[1]).astype(np.uint64)  # members per keeper, over all buckets
    exact = np.concatenate([clusters.read_range(work / f"exact-p{p}.npy", lo, hi)[0] for p in range(parts)])
    kept = gid == label
    reason = np.where(kept, 0, np.where(np.isin(gid, exact), 1, 2)).astype(np.uint64)
    cluster_size = np.zeros(len(gid), dtype=np.uint64)
    cluster_size[kept] = size[np.searchsorted(keepers, gid[kept])]
    for shard in shards:
        mine = (gid >> np.uint64(32)) == np.uint64(shard)
        rows = gid[mine] & np.uint64(0xFFFFFFFF)
        clusters.save_sorted(drops_path(work, shard), rows, reason[mine], cluster_size[mine])
    return {str(k): v for k, v in Counter(cluster_size[kept].tolist()).items()}


def drops_path(work: Path, shard: int) -> Path:
    """The decisions for shard number `shard` (its position in name order)."""
    return work / f"drops-{shard:06d}.npy"


def apply_dedup(
    src: Path, dst: Path, stats_path: Path, drops: Path, dedup_hash: str, carry: tuple = ()
) -> dict:
    """Copy cleaned shard `src` to `dst` without its duplicates, cluster sizes in meta; stats.json written last.
    `carry`: (from, to) pairs of per-row arrays of `src` (`.npy`, a row per document: quality scores),
    written for the kept rows."""
    import zstandard

    rows, reasons, sizes = np.load(drops)
    decided = dict(zip(rows.tolist(), zip(reasons.tolist(), sizes.tolist())))
    counts, kept = Counts(), []
    with atomic_write(dst, "wb") as fh:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False)
        for row, rec in enumerate(read_jsonl_zst(src)):
            reason, size = decided.get(row, (0, 1))
            if reason:
                counts.drop(REASONS[reason])
                continue
            counts.kept += 1
            kept.append(row)
            rec["meta"] = {**(rec.get("meta") or {}), "dedup_cluster_size": size}
            writer.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        writer.flush(zstandard.FLUSH_FRAME)
    for a, b in carry:
        with atomic_write(b, "wb") as fh:
            np.save(fh, np.load(a)[kept])
    stats = {"input": src.name, "config_hash": dedup_hash, "counts": counts.to_dict()}
    stats["bytes_out"] = dst.stat().st_size
    write_json(stats_path, stats)
    return stats


def cluster_stats(histograms: list[dict]) -> dict:
    """Clusters (of 2 or more documents) summed over the buckets' {size: keepers} histograms."""
    hist: Counter = Counter()
    for h in histograms:
        hist.update({int(k): v for k, v in h.items() if int(k) > 1})
    return {
        "clusters": sum(hist.values()),
        "documents_in_clusters": sum(k * v for k, v in hist.items()),
        "largest": max(hist, default=0),
        "size_histogram": {str(k): hist[k] for k in sorted(hist)},
    }
