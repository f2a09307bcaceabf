"""Connected components of a graph too large for one process, as rounds of tasks over files.

Dedup hands this module its duplicate edges split into P *partitions* (one per slice of the
LSH key space, so a document appears in several). Nodes are gids (`shard << 32 | row`), and a
component's label is its smallest gid: the document that comes first in (shard, position), so
the result depends neither on P nor on the number of workers. Nothing here imports Ray; the
job runs each function below as one task (`label_components` drives the rounds).

1. `seed_partition`: each partition finds its own components (numpy union by min-label with
   pointer jumping) and sends every member's local label to the member's *bucket* (a
   contiguous range of shards, i.e. of gids).
2. `bucket_round`: a bucket takes each node's smallest label over all partitions and sends
   the new label back to every partition that holds the node and does not know it yet.
3. `partition_round`: a partition applies those labels, lowers each local component to the
   minimum of its members' labels and sends the members it lowered. Rounds 2-3 repeat until
   a bucket round sends nothing; each round carries labels one partition further, so the
   rounds needed grow with the longest chain of partitions a component spans (2-4 on real
   near-duplicates).

Every file is a 2-D uint64 `.npy` sorted by its first row, so a task reads its slice with a
binary search on a memory map and nothing else (`read_range`). Files are never overwritten:
round r writes under `r<r>/`, so a task that dies and is retried reads what it read before.

Memory per task, with M = duplicate memberships (a document in k partitions counts k times):
a partition holds about M/P memberships and a bucket about M/B, each about 40 bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.io import atomic_write

_INF = np.iinfo(np.uint64).max


def save_sorted(path: Path, *rows: np.ndarray) -> None:
    """Write rows (equal length, the first sorted ascending) as one uint64 (k, n) array, atomically."""
    arr = np.stack([np.asarray(r, dtype=np.uint64) for r in rows]) if rows[0].size else None
    with atomic_write(path, "wb") as fh:
        np.save(fh, arr if arr is not None else np.zeros((len(rows), 0), dtype=np.uint64))


def read_range(path: Path, lo: int, hi: int | None = None) -> np.ndarray:
    """The columns of a `save_sorted` file whose first row is in [lo, hi) (hi None: to the end)."""
    arr = np.load(path, mmap_mode="r")
    if arr.shape[1] == 0:
        return np.zeros(arr.shape, dtype=np.uint64)
    start = int(np.searchsorted(arr[0], np.uint64(lo)))
    end = arr.shape[1] if hi is None or hi >= 1 << 64 else int(np.searchsorted(arr[0], np.uint64(hi)))
    return np.array(arr[:, start:end])


def local_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, labels) of the graph with edges u[i]-v[i]: sorted unique nodes, each one's smallest component member."""
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    a, b = inv[: len(u)], inv[len(u) :]
    label = np.arange(len(nodes))  # indices into nodes; nodes are sorted, so min index = min gid
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while not np.array_equal(jumped := new[new], new):  # pointer jumping: follow labels to their root
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def _state(work: Path, rnd: int, part: int) -> Path:
    return work / f"r{rnd}" / f"state-p{part}.npy"  # [gid, local component, label] by gid


def _outbox(work: Path, rnd: int, part: int) -> Path:
    return work / f"r{rnd}" / f"out-p{part}.npy"  # [gid, label] a partition lowered, by gid


def _labels(work: Path, rnd: int, bucket: int) -> Path:
    return work / f"r{rnd}" / f"labels-b{bucket}.npy"  # [gid, best label] of the bucket's nodes


def _inbox(work: Path, rnd: int, bucket: int) -> Path:
    return work / f"r{rnd}" / f"in-b{bucket}.npy"  # [partition, gid, label] for partitions, by partition


def _refs(work: Path, bucket: int) -> Path:
    return work / f"refs-b{bucket}.npy"  # [gid, partition]: which partitions hold each node


def seed_partition(work: Path, part: int, u: np.ndarray, v: np.ndarray) -> int:
    """Round 0 of partition `part`: local components of edges u-v, every member sent; returns nodes."""
    nodes, labels = local_components(u.astype(np.uint64), v.astype(np.uint64))
    save_sorted(_state(work, 0, part), nodes, labels, labels)
    save_sorted(_outbox(work, 0, part), nodes, labels)
    return len(nodes)


def bucket_round(work: Path, rnd: int, bucket: int, lo: int, hi: int, parts: int) -> int:
    """Best label per node of gids [lo, hi) from every partition's outbox; returns updates sent back."""
    got = [read_range(_outbox(work, rnd, p), lo, hi) for p in range(parts)]
    gid = np.concatenate([g[0] for g in got])
    label = np.concatenate([g[1] for g in got])
    src = np.concatenate([np.full(g.shape[1], p, dtype=np.uint64) for p, g in enumerate(got)])
    order = np.lexsort((src, gid))
    gid, label, src = gid[order], label[order], src[order]
    if rnd == 0:  # every membership is sent once, in round 0: remember who holds what
        save_sorted(_refs(work, bucket), gid, src)
        prev = np.unique(gid), None
    else:
        prev = tuple(np.load(_labels(work, rnd - 1, bucket)))
    known, best = _merge_labels(prev, gid, label)
    save_sorted(_labels(work, rnd, bucket), known, best)
    p, g, lab = _updates(work, bucket, known, best, prev, gid, label, src, parts)
    order = np.lexsort((g, p))
    save_sorted(_inbox(work, rnd, bucket), p[order], g[order], lab[order])
    return len(p)


def _merge_labels(prev: tuple, gid: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bucket's labels (prev's gids; prev's labels or +inf) lowered by the received (gid, label)."""
    known = prev[0]
    best = np.full(len(known), _INF, dtype=np.uint64) if prev[1] is None else prev[1].copy()
    if len(gid):
        np.minimum.at(best, np.searchsorted(known, gid), label)
    return known, best


def _updates(work, bucket, known, best, prev, gid, label, src, parts) -> tuple:
    """(partition, gid, label) for every holder of a node whose label fell, except senders of that label."""
    old = np.full(len(known), _INF, dtype=np.uint64) if prev[1] is None else prev[1]
    fell = known[best < old]
    if not len(fell):
        return (np.zeros(0, np.uint64),) * 3
    refs = np.load(_refs(work, bucket))
    held = refs[:, np.isin(refs[0], fell, assume_unique=False)]  # sorted by gid like refs
    idx = np.searchsorted(known, held[0])
    sent_idx = np.searchsorted(known, gid)
    sent_best = label == best[sent_idx]  # this sender already holds the new label
    sent_key = sent_idx[sent_best].astype(np.uint64) * np.uint64(parts) + src[sent_best]
    need = ~np.isin(idx.astype(np.uint64) * np.uint64(parts) + held[1], sent_key)
    return held[1][need], held[0][need], best[idx][need]


def partition_round(work: Path, rnd: int, part: int, buckets: int) -> int:
    """Apply the buckets' labels, lower each local component to its members' minimum; returns nodes lowered."""
    gid, comp, label = np.load(_state(work, rnd - 1, part))
    for b in range(buckets):
        _, g, lab = read_range(_inbox(work, rnd - 1, b), part, part + 1)
        idx = np.searchsorted(gid, g)
        label[idx] = np.minimum(label[idx], lab)
    comps, inv = np.unique(comp, return_inverse=True)
    low = np.full(len(comps), _INF, dtype=np.uint64)
    np.minimum.at(low, inv, label)
    new = low[inv]
    lowered = new < label
    save_sorted(_state(work, rnd, part), gid, comp, new)
    save_sorted(_outbox(work, rnd, part), gid[lowered], new[lowered])
    return int(lowered.sum())


def final_labels(work: Path, rnd: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(gids, labels) of bucket `bucket`'s nodes after the last round `rnd`."""
    gid, label = np.load(_labels(work, rnd, bucket))
    return gid, label


def label_components(run: Callable, work: Path, parts: int, buckets: list[tuple[int, int]]) -> int:
    """Bucket and partition rounds (as tasks, through `run(fn, calls, desc)`) until stable; returns the last round.

    The partitions must have run `seed_partition` into `work` first."""
    rnd = 0
    while True:
        calls = [(work, rnd, b, lo, hi, parts) for b, (lo, hi) in enumerate(buckets)]
        if sum(run(bucket_round, calls, f"dedup: components, round {rnd}")) == 0:
            return rnd
        rnd += 1
        calls = [(work, rnd, p, len(buckets)) for p in range(parts)]
        run(partition_round, calls, f"dedup: components, round {rnd}")
        if rnd >= 2:  # nothing reads round rnd-2 any more
            shutil.rmtree(work / f"r{rnd - 2}", ignore_errors=True)
