"""Token-shard loader: packed samples in a rank-independent global order, resumable by a count.

A split's shards (manifest order) form one token stream; documents already end with EOS, so
packing is just cutting: sample i is stream[i*L : i*L + L + 1] (L = seq_len), consecutive
samples overlap by one token and every token after the first is a target exactly once. The
global order is a permutation of the samples per epoch, seeded by (seed, epoch), so global
sample g is the same whatever the number of ranks. Optimizer step s consumes global samples
[s*G, (s+1)*G) (G = global batch); data-parallel rank r takes the r-th contiguous slice of
that range. Resuming needs only the count of consumed samples.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.data.indexed import IndexedDataset
from pipeline.errors import DataError


def open_split(
    tokens_dir: Path, split: str, *, checksums: bool = True, fingerprint: str | None = None
) -> list[Path]:
    """Verify the manifest (DataError naming the shard on any mismatch) and return the split's prefixes."""
    from pipeline.data.manifest import split_prefixes, verify_manifest

    manifest = verify_manifest(tokens_dir, checksums=checksums, fingerprint=fingerprint)
    return split_prefixes(tokens_dir, manifest, split)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample permutation of one epoch: a pure function of (seed, epoch, n)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedTokens:
    """The documents of some shards as one stream, cut into samples of seq_len + 1 tokens."""

    def __init__(self, prefixes: list[Path], seq_len: int):
        self.seq_len = seq_len
        self.shards = [IndexedDataset(p) for p in prefixes]
        self.starts = np.cumsum([0] + [s.num_tokens for s in self.shards])  # stream offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        """stream[lo:hi], read from the memory-mapped shards it spans."""
        parts = []
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        for k in range(first, len(self.shards)):
            if self.starts[k] >= hi:
                break
            a, b = max(lo, self.starts[k]) - self.starts[k], min(hi, self.starts[k + 1]) - self.starts[k]
            parts.append(np.asarray(self.shards[k].tokens[a:b]))
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def __getitem__(self, i: int) -> np.ndarray:
        lo = i * self.seq_len
        return self.tokens(lo, lo + self.seq_len + 1)


class TokenLoader:
    """Global samples of one split in (seed, epoch)-shuffled order, sliced per data-parallel rank."""

    def __init__(
        self, prefixes: list[Path], seq_len: int, seed: int, *, shuffle: bool = True, name: str = ""
    ):
        self.data = PackedTokens(prefixes, seq_len)
        self.seed, self.shuffle = seed, shuffle
        if len(self.data) == 0:
            raise DataError(
                f"{name or prefixes}: {self.data.num_tokens} tokens, fewer than one "
                f"sample of seq_len + 1 = {seq_len + 1}"
            )
        self._order = lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        return epoch_order(self.seed, epoch, n) if self.shuffle else np.arange(n)

    def sample_index(self, g: int) -> int:
        """Which packed sample is global sample g (epochs repeat with a fresh permutation)."""
        epoch, pos = divmod(g, len(self.data))
        return int(self._order(epoch)[pos])

    def sample(self, g: int) -> np.ndarray:
        return self.data[self.sample_index(g)]

    def micro_batches(
        self, start: int, global_size: int, micro_size: int, dp_rank: int, dp_size: int
    ) -> list[dict]:
        """This rank's micro batches of the global batch of samples [start, start + global_size).

        Each is {"input_ids", "shift_labels"}: (micro_size, seq_len) int64, targets already aligned.
        """
        per_rank = global_size // dp_size
        first = start + dp_rank * per_rank
        out = []
        for m in range(first, first + per_rank, micro_size):
            rows = np.stack([self.sample(g) for g in range(m, m + micro_size)]).astype(np.int64)
            x = torch.from_numpy(rows)  # (micro_size, seq_len + 1)
            out.append({"input_ids": x[:, :-1].contiguous(), "shift_labels": x[:, 1:].contiguous()})
        return out
