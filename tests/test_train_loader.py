"""Token loader: packing reproduces the token stream, the order is rank-independent, rank slices are
disjoint, resume continues at the consumed-sample count, and the manifest is verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_helpers import write_token_dir

from pipeline.errors import DataError
from pipeline.train.loader import PackedTokens, TokenLoader, open_split

SEQ = 8


@pytest.fixture
def tokens(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    shards = [[rng.integers(4, 200, size=int(rng.integers(1, 30))) for _ in range(n)] for n in (7, 1, 12)]
    return write_token_dir(tmp_path / "tokens", {"train": shards, "valid": [shards[1]]}, vocab_size=256)


def stream(tokens: Path) -> np.ndarray:
    return np.concatenate(
        [np.asarray(PackedTokens([p], SEQ).shards[0].tokens) for p in open_split(tokens, "train")]
    )


def loader(tokens: Path, **kw) -> TokenLoader:
    return TokenLoader(open_split(tokens, "train"), SEQ, seed=7, **kw)


def test_packing_gives_exactly_the_stream(tokens):
    data = PackedTokens(open_split(tokens, "train"), SEQ)
    s = stream(tokens)
    assert data.num_tokens == len(s) and len(data) == (len(s) - 1) // SEQ
    inputs = np.concatenate([data[i][:-1] for i in range(len(data))])
    assert np.array_equal(inputs, s[: len(data) * SEQ])  # shards are crossed seamlessly
    for i in range(len(data)):
        assert len(data[i]) == SEQ + 1 and data[i][-1] == s[(i + 1) * SEQ]  # last token = next's first


def test_order_is_a_seeded_permutation_per_epoch(tokens):
    ld = loader(tokens)
    n = len(ld.data)
    first, second = [ld.sample_index(g) for g in range(n)], [ld.sample_index(g) for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    assert first == [loader(tokens).sample_index(g) for g in range(n)]
    assert [loader(tokens, shuffle=False).sample_index(g) for g in range(3)] == [0, 1, 2]


def rows(batches: list[dict]) -> list[list[int]]:
    return [r.tolist() for b in batches for r in b["input_ids"]]


def test_ranks_take_disjoint_slices_of_the_same_global_batch(tokens):
    ld = loader(tokens)
    one = rows(ld.micro_batches(16, 8, 2, dp_rank=0, dp_size=1))
    two = [rows(ld.micro_batches(16, 8, 2, dp_rank=r, dp_size=2)) for r in range(2)]
    assert two[0] + two[1] == one  # same global batch, each rank a contiguous half
    assert len(two[0]) == len(two[1]) == 4
    assert one == [ld.sample(g)[:-1].tolist() for g in range(16, 24)]


def test_resume_from_consumed_samples(tokens):
    ld = loader(tokens)
    full = [rows(ld.micro_batches(s * 4, 4, 2, 0, 1)) for s in range(5)]
    resumed = loader(tokens)  # a new process: only the count survives
    assert [rows(resumed.micro_batches(s * 4, 4, 2, 0, 1)) for s in range(3, 5)] == full[3:]


def test_micro_batch_shapes_and_targets(tokens):
    (mb,) = loader(tokens).micro_batches(0, 2, 2, 0, 1)
    assert mb["input_ids"].shape == mb["shift_labels"].shape == (2, SEQ)
    assert mb["input_ids"].dtype == mb["shift_labels"].dtype
    assert mb["input_ids"][0, 1:].tolist() == mb["shift_labels"][0, :-1].tolist()


def test_corrupt_shard_is_refused(tokens):
    with open(tokens / "train_1.bin", "r+b") as fh:
        fh.write(b"\xff\xff")
    with pytest.raises(DataError, match="train_1"):
        open_split(tokens, "train")


def test_too_little_data(tmp_path):
    d = write_token_dir(tmp_path / "t", {"train": [[np.arange(5, 10)]]}, vocab_size=64)
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenLoader(open_split(d, "train"), SEQ, seed=0)
