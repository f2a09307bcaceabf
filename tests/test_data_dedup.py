"""Dedup (pipeline/data/{dedup,clusters}.py): MinHash mod 2^61-1 against the true Jaccard and against
datasketch, the partitioned index, distributed connected components, the keep rule, cluster sizes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.data import clusters
from pipeline.data.config import DedupConfig
from pipeline.data.dedup import (
    MERSENNE_61,
    MinHasher,
    apply_dedup,
    decide,
    drops_path,
    jaccard_estimate,
    normalized_words,
    write_signatures,
)
from pipeline.io import read_jsonl_zst, write_jsonl_zst

BASE = " ".join(f"word{i} common text here" for i in range(60))


def serial(fn, calls, desc):
    """The job's `map` without Ray: the same functions, one after another."""
    return [fn(*c) for c in calls]


def near_copy(text: str, k: int) -> str:
    words = text.split()
    words[k * 7] = "changed"  # one word in 240: Jaccard of 5-grams about 0.96
    return " ".join(words)


def shingles(text: str, n: int = 5) -> set[str]:
    words = normalized_words(text)
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_permutations_are_the_universal_family_mod_the_mersenne_prime():
    h = MinHasher(DedupConfig(bands=4, rows=3))
    assert (h.a >= 1).all() and (h.a < MERSENNE_61).all() and (h.b < MERSENNE_61).all()
    x = np.array([0, 1, 2**31 + 5, 2**32 - 1, 123456789], dtype=np.uint64)
    t, s = np.empty((5, 12), np.uint64), np.empty((5, 12), np.uint64)
    got = h._permute_min(x[:, None], t, s)
    want = [min((int(a) * int(v) + int(b)) % MERSENNE_61 for v in x) for a, b in zip(h.a, h.b)]
    assert got.tolist() == want  # exact: no uint64 overflow anywhere


def test_estimate_is_within_the_expected_error_of_the_true_jaccard():
    """Random document pairs over the whole range of similarity: the estimate from k hashes has
    standard error sqrt(J(1-J)/k); every pair within 4 of them, and no bias over all pairs."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    h = MinHasher(DedupConfig())
    k = h.bands * h.rows
    z = []
    for _ in range(120):
        a = [rng.choice(vocab) for _ in range(rng.randint(80, 400))]
        b = [
            w if rng.random() > rng.choice([0.0, 0.02, 0.05, 0.1, 0.3, 1.0]) else rng.choice(vocab) for w in a
        ]
        ta, tb = " ".join(a), " ".join(b)
        j = true_jaccard(ta, tb)
        est = jaccard_estimate(h.signature(ta), h.signature(tb))
        sigma = max((j * (1 - j) / k) ** 0.5, 1 / k)
        assert abs(est - j) <= 4 * sigma, (j, est)
        z.append((est - j) / sigma)
    assert abs(np.mean(z)) < 3 / len(z) ** 0.5 * 1.5  # unbiased: the mean z-score is near 0


def test_lsh_pairs_agree_with_datasketch_on_the_real_samples(raw_samples):
    """Same shingles, same 14 x 8 banding: the pairs our band keys find and those datasketch's
    MinHashLSH finds agree on at least 99% of pairs (real texts, plus edited copies of them).

    Pairs with Jaccard in (0.3, 0.9) are left out: there each implementation finds a pair with
    probability 1 - (1 - s^8)^14, a coin flip on its own random permutations, so two correct
    implementations agree only by luck (the estimate test above covers that range)."""
    datasketch = pytest.importorskip(
        "datasketch", reason="datasketch is a dev dependency: pip install -e .[dev]"
    )
    raw_texts = [json.loads(line)["text"] for line in (raw_samples / "web" / "c4-en-sample.jsonl").open()]
    texts = [t for t in raw_texts if len(t.split()) >= 40][:160]
    rng = random.Random(1)
    for t in list(texts):
        for edits in (rng.choice([0, 1, 2]), len(t.split()) // rng.choice([3, 4, 5])):  # near, far
            words = t.split()
            for _ in range(edits):
                words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
            texts.append(" ".join(words))
    h = MinHasher(DedupConfig())
    ours = _band_pairs([h.row(t)[1:] for t in texts])
    grams = [shingles(t) for t in texts]
    sketches = datasketch.MinHash.bulk([[g.encode() for g in s] for s in grams], num_perm=112, seed=7)
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}
    union = {
        (a, b)
        for a, b in ours | theirs
        if not 0.3 < len(grams[a] & grams[b]) / len(grams[a] | grams[b]) < 0.9
    }
    assert len(union) > 100  # most near copies (a copy with no edit is an exact pair)
    agree = len(ours & theirs & union) / len(union)
    odd = [round(len(grams[a] & grams[b]) / len(grams[a] | grams[b]), 3) for a, b in (ours ^ theirs) & union]
    assert agree >= 0.99, (odd, len(union))


def _band_pairs(rows: list[np.ndarray]) -> set[tuple[int, int]]:
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, bands in enumerate(rows):
        for b, key in enumerate(bands.tolist()):
            by_key.setdefault((b, key), []).append(i)
    return {(a, b) for docs in by_key.values() for a in docs for b in docs if a < b}


def test_words_of_scripts_without_spaces_are_characters():
    assert normalized_words("数学是研究 Hello, World!") == ["数", "学", "是", "研", "究", "hello", "world"]
    h = MinHasher(DedupConfig())
    zh = "数学是研究数量、结构、变化以及空间等概念的一门学科。物理学研究物质、能量的本质与相互作用。" * 3
    one_char = zh.replace("结构", "结枃", 1)
    assert abs(jaccard_estimate(h.signature(zh), h.signature(one_char)) - true_jaccard(zh, one_char)) < 0.15
    assert true_jaccard(zh, one_char) > 0.85  # character 5-grams: one character changes five of them
    assert (h.row(zh)[1:] == h.row(one_char)[1:]).sum() >= 1


def test_rows_are_deterministic_and_similar_texts_share_bands():
    h = MinHasher(DedupConfig())
    a, b = h.row(BASE), MinHasher(DedupConfig()).row(BASE)
    assert a.dtype == np.uint64 and a.shape == (15,) and (a == b).all()
    assert h.row("Word0 COMMON, text here! " + BASE.split(" ", 4)[4])[0] == a[0]  # case/punctuation
    near = h.row(near_copy(BASE, 3))
    assert near[0] != a[0] and (near[1:] == a[1:]).sum() >= 8  # most bands agree
    assert (h.row(" ".join(f"other{i} unrelated words" for i in range(80)))[1:] == a[1:]).sum() == 0


def test_signature_file_is_sorted_and_a_range_read_takes_only_its_slice(tmp_path):
    h = MinHasher(DedupConfig())
    write_signatures(tmp_path / "s.sig.npy", [h.row(f"text {i} " * 20) for i in range(50)], 14)
    keys, tags = np.load(tmp_path / "s.sig.npy")
    assert len(keys) == 50 * 15 and (np.diff(keys.astype(object)) >= 0).all()
    assert sorted((tags & 0xFFFF).tolist()).count(0) == 50  # one exact key per document
    lo, hi = 1 << 62, 3 << 62
    part = clusters.read_range(tmp_path / "s.sig.npy", lo, hi)
    assert ((part[0] >= lo) & (part[0] < hi)).all() and part.shape[1] == ((keys >= lo) & (keys < hi)).sum()


def test_local_components_match_a_reference_union_find():
    rng = np.random.default_rng(3)
    u = rng.integers(0, 400, 300).astype(np.uint64) * 7
    v = rng.integers(0, 400, 300).astype(np.uint64) * 7
    nodes, labels = clusters.local_components(u, v)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert dict(zip(nodes.tolist(), labels.tolist())) == {x: find(x) for x in parent}


def test_components_spanning_partitions_converge_over_rounds(tmp_path):
    """A chain 0-1-2-...-9 whose links alternate between 3 partitions, plus a separate pair: the
    labels need several bucket/partition rounds, and end as each component's smallest gid."""
    gid = [(i % 4) << 32 | i for i in range(12)]  # spread over 4 shards (2 buckets)
    edges = {p: ([], []) for p in range(3)}
    for i in range(9):
        edges[i % 3][0].append(gid[i + 1])
        edges[i % 3][1].append(gid[i])
    edges[1][0].append(gid[11])
    edges[1][1].append(gid[10])
    for p, (u, v) in edges.items():
        clusters.seed_partition(tmp_path, p, np.array(u, np.uint64), np.array(v, np.uint64))
    buckets = [(0, 2 << 32), (2 << 32, 4 << 32)]
    rnd = clusters.label_components(serial, tmp_path, 3, buckets)
    labels = {}
    for b in range(2):
        labels.update(zip(*(x.tolist() for x in clusters.final_labels(tmp_path, rnd, b))))
    assert labels == {
        **{gid[i]: gid[0] for i in range(10)},
        gid[10]: min(gid[10], gid[11]),
        gid[11]: min(gid[10], gid[11]),
    }
    assert rnd >= 3


def _corpus(rng: random.Random, shards: int, per_shard: int) -> list[list[str]]:
    """Shards of unique texts, plus chains of near copies (each copy of the previous one) spread over shards."""
    vocab = [f"v{i}" for i in range(5000)]
    texts = [
        [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(per_shard)] for _ in range(shards)
    ]
    for _ in range(12):
        words = texts[rng.randrange(shards)][rng.randrange(per_shard)].split()
        for _ in range(rng.randint(1, 5)):
            words = list(words)
            words[rng.randrange(len(words))] = rng.choice(vocab)  # Jaccard about 0.92 to the previous link
            texts[rng.randrange(shards)].append(" ".join(words))
    texts[0].append(texts[2][0].upper())  # an exact duplicate (after normalization) of a later shard's text
    return texts


def _reference(texts: list[list[str]], h: MinHasher) -> dict[tuple[int, int], tuple[str, int]]:
    """Brute force over every pair: component by shared band or exact hash; keep the first (shard, row)."""
    docs = [(s, r) for s, shard in enumerate(texts) for r in range(len(shard))]
    rows = {d: h.row(texts[d[0]][d[1]]) for d in docs}
    parent = {d: d for d in docs}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, a in enumerate(docs):
        for b in docs[i + 1 :]:
            if (rows[a][1:] == rows[b][1:]).any() or rows[a][0] == rows[b][0]:
                parent[max(find(a), find(b))] = min(find(a), find(b))
    groups: dict = {}
    for d in docs:
        groups.setdefault(find(d), []).append(d)
    out = {}
    for root, members in groups.items():
        for d in members:
            exact = any(rows[o][0] == rows[d][0] and o < d for o in members)
            out[d] = ("keep", len(members)) if d == root else ("dup_exact" if exact else "dup_near", 0)
    return {d: v for d, v in out.items() if v != ("keep", 1)}


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_distributed_components_equal_brute_force_for_any_partition_count(tmp_path, parts):
    texts = _corpus(random.Random(5), shards=5, per_shard=30)
    h = MinHasher(DedupConfig())
    sigs = []
    for s, shard in enumerate(texts):
        sigs.append(tmp_path / f"{s}.sig.npy")
        write_signatures(sigs[-1], [h.row(t) for t in shard], 14)
    work = tmp_path / "work"
    found = decide(serial, sigs, parts, work, exact=True, near=True)
    got = {}
    for s in range(len(texts)):
        for row, reason, size in np.load(drops_path(work, s)).T.tolist():
            got[(s, row)] = ("keep", size) if reason == 0 else (["", "dup_exact", "dup_near"][reason], 0)
    want = _reference(texts, h)
    assert got == want and found["clusters"] == sum(v[0] == "keep" for v in want.values()) >= 10
    assert found["largest"] >= 3 and found["rounds"] >= 0
    assert any(v[0] == "dup_exact" for v in want.values())


def test_exact_only_and_near_only(tmp_path):
    h = MinHasher(DedupConfig())
    shards = [[BASE, near_copy(BASE, 1)], [BASE.upper(), "unique " * 40]]
    sigs = []
    for s, shard in enumerate(shards):
        sigs.append(tmp_path / f"{s}.sig.npy")
        write_signatures(sigs[-1], [h.row(t) for t in shard], 14)
    for exact, near, want in [
        (True, False, {(1, 0): 1}),
        (False, True, {(0, 1): 2, (1, 0): 2}),
        (True, True, {(0, 1): 2, (1, 0): 1}),
    ]:
        work = tmp_path / f"w{exact}{near}"
        decide(serial, sigs, 2, work, exact, near)
        got = {(s, r): c for s in (0, 1) for r, c, _ in np.load(drops_path(work, s)).T.tolist() if c}
        assert got == want, (exact, near)


def test_apply_writes_cluster_sizes_and_counts(tmp_path):
    rows = [{"id": f"d{i}", "text": f"t{i}", "source": "x", "meta": {"url": "u"}} for i in range(4)]
    write_jsonl_zst(tmp_path / "s.jsonl.zst", rows)
    clusters.save_sorted(
        tmp_path / "drops.npy", np.array([0, 2, 3]), np.array([0, 1, 2]), np.array([3, 0, 0])
    )
    stats = apply_dedup(
        tmp_path / "s.jsonl.zst", tmp_path / "d.jsonl.zst", tmp_path / "d.json", tmp_path / "drops.npy", "h"
    )
    out = list(read_jsonl_zst(tmp_path / "d.jsonl.zst"))
    assert [(r["id"], r["meta"]["dedup_cluster_size"]) for r in out] == [("d0", 3), ("d1", 1)]
    assert out[0]["meta"]["url"] == "u"
    assert stats["counts"] == {"in": 4, "kept": 2, "dropped": {"dup_exact": 1, "dup_near": 1}, "errors": {}}


def test_empty_shard_and_texts_without_words(tmp_path):
    h = MinHasher(DedupConfig())
    write_signatures(tmp_path / "e.sig.npy", [], 14)
    write_signatures(tmp_path / "p.sig.npy", [h.row("!!! ..."), h.row("??")], 14)
    found = decide(serial, [tmp_path / "e.sig.npy", tmp_path / "p.sig.npy"], 2, tmp_path / "w", True, True)
    assert np.load(drops_path(tmp_path / "w", 1)).T.tolist() == [
        [0, 0, 2],
        [1, 1, 0],
    ]  # same empty normal form
    assert np.load(drops_path(tmp_path / "w", 0)).shape == (3, 0) and found["clusters"] == 1
