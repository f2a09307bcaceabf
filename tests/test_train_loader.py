"""Token loader: packing reproduces the token stream, the order is rank-independent, rank slices are
disjoint, resume continues at the consumed-sample count, blends keep their shares, and the manifest
is verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from dist_helpers import write_token_dir
from tokens_helpers import instruction_docs, make_token_dir, shared_small_tokenizer

from pipeline.data.tokenize import is_valid
from pipeline.errors import ConfigError, DataError
from pipeline.runtime.engine import dp_coords
from pipeline.train import loader as loader_mod
from pipeline.train.loader import (
    BlendedLoader,
    PackedTokens,
    TokenLoader,
    blend_schedule,
    open_blend,
    open_split,
    permute,
)

SEQ = 8


def random_shards(seed: int, sizes=(7, 1, 12), lo: int = 4, hi: int = 200) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(lo, hi, size=int(rng.integers(1, 30))) for _ in range(n)] for n in sizes]


@pytest.fixture
def tokens(tmp_path) -> Path:
    shards = random_shards(0)
    return write_token_dir(tmp_path / "tokens", {"train": shards, "valid": [shards[1]]}, vocab_size=256)


def stream(tokens: Path) -> np.ndarray:
    data = PackedTokens(open_split(tokens, "train"), SEQ)
    return np.concatenate([np.asarray(data.shard(k).tokens) for k in range(len(data.prefixes))])


def loader(tokens: Path, **kw) -> TokenLoader:
    return TokenLoader(open_split(tokens, "train"), SEQ, seed=7, **kw)


def rows(batches: list[dict]) -> list[list[int]]:
    return [r.tolist() for b in batches for r in b["input_ids"]]


def test_packing_gives_exactly_the_stream(tokens):
    data = PackedTokens(open_split(tokens, "train"), SEQ)
    s = stream(tokens)
    assert data.num_tokens == len(s) and len(data) == (len(s) - 1) // SEQ
    inputs = np.concatenate([data[i][:-1] for i in range(len(data))])
    assert np.array_equal(inputs, s[: len(data) * SEQ])  # shards are crossed seamlessly
    for i in range(len(data)):
        assert len(data[i]) == SEQ + 1 and data[i][-1] == s[(i + 1) * SEQ]  # last token = next's first


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_permute_is_a_seeded_permutation(n):
    order = permute(np.arange(n), n, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(n))
    if n > 16:
        assert order.tolist() != permute(np.arange(n), n, seed=3, epoch=1).tolist()
        assert order.tolist() != permute(np.arange(n), n, seed=4, epoch=0).tolist()
        assert order.tolist() != list(range(n))


def test_permute_needs_no_memory_of_the_corpus_size():
    n = 3 * 10**12  # samples of a ~10T-token corpus: no table of n entries could exist
    pos = np.arange(10**12, 10**12 + 5000)
    out = permute(pos, n, seed=0, epoch=0)
    assert len(set(out.tolist())) == 5000 and out.min() >= 0 and out.max() < n
    assert np.array_equal(out[100:200], permute(pos[100:200], n, seed=0, epoch=0))  # random access


def test_order_is_a_seeded_permutation_per_epoch(tokens):
    ld = loader(tokens)
    n = len(ld)
    first, second = [ld.sample_index(g) for g in range(n)], [ld.sample_index(g) for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    assert first == [loader(tokens).sample_index(g) for g in range(n)]
    assert [loader(tokens, shuffle=False).sample_index(g) for g in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_see_the_global_order_of_one_rank(tokens, dp_size):
    ld = loader(tokens)
    for step in range(4):  # crosses an epoch boundary (about 40 samples per epoch)
        one = rows(ld.micro_batches(step * 16, 16, 2, dp_rank=0, dp_size=1))
        per_rank = [
            rows(ld.micro_batches(step * 16, 16, 2, dp_rank=r, dp_size=dp_size)) for r in range(dp_size)
        ]
        assert sum(per_rank, []) == one  # disjoint contiguous slices of the same global batch
        assert all(len(r) == 16 // dp_size for r in per_rank)
    assert rows(ld.micro_batches(16, 8, 2, 0, 1)) == [ld.sample(g)[:-1].tolist() for g in range(16, 24)]


def test_tensor_parallel_group_shares_a_batch(tokens):
    ld = loader(tokens)
    coords = [dp_coords(rank, world_size=4, tp_size=2) for rank in range(4)]
    assert coords == [(0, 2), (0, 2), (1, 2), (1, 2)]
    batches = [rows(ld.micro_batches(8, 8, 2, *c)) for c in coords]
    assert batches[0] == batches[1] != batches[2] == batches[3]
    with pytest.raises(ConfigError, match="tp_size"):
        dp_coords(0, world_size=4, tp_size=3)


@pytest.mark.parametrize("k", [0, 7, 37, 41, 100])
def test_resume_at_sample_k_continues_with_sample_k(tokens, k):
    full = rows(loader(tokens).micro_batches(0, 128, 2, 0, 1))
    resumed = loader(tokens)  # a new process: only the count survives
    assert rows(resumed.micro_batches(k, 16, 2, 0, 1)) == full[k : k + 16]


def test_micro_batch_shapes_and_targets(tokens):
    (mb,) = loader(tokens).micro_batches(0, 2, 2, 0, 1)
    assert mb["input_ids"].shape == mb["shift_labels"].shape == (2, SEQ)
    assert mb["input_ids"].dtype == mb["shift_labels"].dtype
    assert mb["input_ids"][0, 1:].tolist() == mb["shift_labels"][0, :-1].tolist()
    with pytest.raises(ConfigError, match="batch.global_size"):
        loader(tokens).micro_batches(0, 6, 2, 0, 2)


def test_open_shards_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(loader_mod, "OPEN_SHARDS", 3)
    d = write_token_dir(tmp_path / "t", {"train": random_shards(1, sizes=[2] * 20)}, vocab_size=256)
    ld = TokenLoader(open_split(d, "train"), SEQ, seed=0, shuffle=False)
    got = rows(ld.micro_batches(0, len(ld), 1, 0, 1))
    assert len(ld.data._open) <= 3
    s = stream(d)
    assert got == [s[i * SEQ : (i + 1) * SEQ].tolist() for i in range(len(ld))]


def test_corrupt_shard_is_refused(tokens):
    with open(tokens / "train_1.bin", "r+b") as fh:
        fh.write(b"\xff\xff")
    with pytest.raises(DataError, match="train_1"):
        open_split(tokens, "train")


def test_too_little_data(tmp_path):
    d = write_token_dir(tmp_path / "t", {"train": [[np.arange(5, 10)]]}, vocab_size=64)
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenLoader(open_split(d, "train"), SEQ, seed=0)


# ------------------------------------------------------------------ blending


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.3, 0.2], [0.01, 0.99], [1, 2, 3, 4, 5, 6, 7]])
def test_blend_share_within_one_percent_over_any_1000_samples(weights):
    schedule = np.tile(blend_schedule(weights, 10_000), 3)  # 30,000 positions, 3 periods
    w = np.asarray(weights, float) / sum(weights)
    counts = np.vstack([np.zeros(len(w)), np.cumsum(np.eye(len(w))[schedule], axis=0)])
    window = (counts[1000:] - counts[:-1000]) / 1000  # every window of 1,000 consecutive samples
    assert np.abs(window - w).max() <= 0.01


@pytest.fixture
def two_corpora(tmp_path) -> tuple[Path, Path]:
    """'wiki' tokens are in [4, 100), 'web' tokens in [100, 200): each row tells where it came from."""
    wiki = write_token_dir(tmp_path / "wiki", {"train": random_shards(2, lo=4, hi=100)}, vocab_size=256)
    web = write_token_dir(tmp_path / "web", {"train": random_shards(3, lo=100, hi=200)}, vocab_size=256)
    return wiki, web


def test_blended_samples_follow_the_weights(two_corpora):
    wiki, web = two_corpora
    blend = open_blend([(wiki, 0.3), (web, 0.7)], "train", SEQ, seed=5)
    batches = blend.micro_batches(0, 3000, 10, 0, 1)
    ids = np.concatenate([b["input_ids"].numpy() for b in batches])  # (3000, SEQ)
    from_web = ids.min(axis=1) >= 100
    assert (from_web | (ids.max(axis=1) < 100)).all()  # a row never mixes the corpora
    shares = np.convolve(from_web, np.ones(1000), "valid") / 1000
    assert np.abs(shares - 0.7).max() <= 0.01
    # each corpus is read in its own (seed, epoch) order, epoch after epoch (here ~10 epochs of wiki)
    d, j = blend.sources(np.arange(3000))
    wiki_ld = blend.loaders[0]
    assert np.array_equal(ids[d == 0][:50], wiki_ld.samples(j[d == 0][:50])[:, :-1])
    assert j[d == 0].tolist() == list(range(int((d == 0).sum())))


def test_blend_is_rank_independent_and_resumable(two_corpora):
    wiki, web = two_corpora
    blend = open_blend([(wiki, 1.0), (web, 2.0)], "train", SEQ, seed=5)
    one = rows(blend.micro_batches(40, 16, 2, 0, 1))
    four = sum((rows(blend.micro_batches(40, 16, 2, r, 4)) for r in range(4)), [])
    again = open_blend([(wiki, 1.0), (web, 2.0)], "train", SEQ, seed=5)
    assert one == four == rows(again.micro_batches(40, 16, 2, 0, 1))
    assert rows(again.micro_batches(47, 4, 2, 0, 1)) == one[7:11]


def test_blend_errors(two_corpora, tmp_path):
    wiki, web = two_corpora
    lds = [TokenLoader(open_split(p, "train"), SEQ, seed=0) for p in two_corpora]
    with pytest.raises(ConfigError, match=r"weights\[1\]"):
        BlendedLoader(lds, [1.0, 0.0])
    with pytest.raises(ConfigError, match="one weight per dataset"):
        BlendedLoader(lds, [1.0])
    with pytest.raises(ConfigError, match="too small"):
        BlendedLoader(lds, [1.0, 1e-9])
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"another tokenizer")
    foreign = write_token_dir(
        tmp_path / "f", {"train": random_shards(4)}, vocab_size=256, tokenizer_dir=other
    )
    with pytest.raises(DataError, match="fingerprint mismatch"):
        open_blend([(wiki, 1.0), (foreign, 1.0)], "train", SEQ, seed=0)


# ------------------------------------------------------------------ round trip with a real tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return shared_small_tokenizer(tmp_path_factory)


def test_round_trip_documents_to_loader(tmp_path, tok_dir):
    """Documents -> tokenize_file -> shards + manifest -> loader: exactly their ids, EOS after each."""
    docs = instruction_docs(300)
    out, _ = make_token_dir(tmp_path / "tokens", tok_dir, [docs[:120], docs[120:]], valid_fraction=0.1)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    want = {"train": [], "valid": []}
    for d in docs:  # shard order, then document order within a shard
        want["valid" if is_valid(d["id"], 0.1) else "train"] += sp.encode(d["text"]) + [sp.eos_id()]
    for split in ("train", "valid"):
        ld = TokenLoader(open_split(out, split), 32, seed=0, shuffle=False)
        got = np.concatenate([b["input_ids"].numpy().ravel() for b in ld.micro_batches(0, len(ld), 1, 0, 1)])
        assert got.tolist() == want[split][: len(ld) * 32]
        assert len(want[split]) - len(got) <= 32  # only the tail that fills no sample is left
    assert want["train"].count(2) == sum(not is_valid(d["id"], 0.1) for d in docs)
