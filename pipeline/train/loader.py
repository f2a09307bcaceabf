"""Token-shard loader: packed samples in a rank-independent global order, resumable by a count.

A split's shards (manifest order) form one token stream; documents already end with EOS, so
packing is just cutting: sample i is stream[i*L : i*L + L + 1] (L = seq_len), consecutive
samples overlap by one token and every token after the first is a target exactly once.

Global sample g is a pure function of (seed, g): epoch g // n, then a seeded pseudo-random
permutation of that epoch's n samples, computed on the fly (a Feistel network, see `permute`),
so nothing grows with the corpus and nothing depends on the number of ranks. Optimizer step s
consumes global samples [s*G, (s+1)*G) (G = global batch); data-parallel rank r takes the r-th
contiguous slice of that range, and every rank of a tensor-parallel group passes the same
dp_rank, so it gets the same batch. Resuming needs only the count of consumed samples.

`BlendedLoader` mixes several loaders by weight with a fixed periodic schedule: any window of
samples holds each dataset within about 2 samples of its share, and position g still maps to
(dataset, that dataset's own global index) in O(1).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from pipeline.data.indexed import IndexedDataset
from pipeline.errors import ConfigError, DataError

FEISTEL_ROUNDS = 6
OPEN_SHARDS = 64  # memory maps kept open at once (2 file descriptors each)


def open_split(
    tokens_dir: Path, split: str, *, checksums: bool = True, fingerprint: str | None = None
) -> list[Path]:
    """Verify the manifest (DataError naming the shard on any mismatch) and return the split's prefixes."""
    from pipeline.data.manifest import split_prefixes, verify_manifest

    manifest = verify_manifest(tokens_dir, checksums=checksums, fingerprint=fingerprint)
    return split_prefixes(tokens_dir, manifest, split)


# ------------------------------------------------------------------ order


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
    digest = hashlib.blake2b(
        f"gristmill-order/{seed}/{epoch}".encode(), digest_size=8 * FEISTEL_ROUNDS
    ).digest()
    return [np.uint64(int.from_bytes(digest[8 * k : 8 * k + 8], "little")) for k in range(FEISTEL_ROUNDS)]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of x + key: a well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    z = x + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: list[np.uint64]) -> np.ndarray:
    """A bijection of [0, 4**half): balanced Feistel rounds on the two `half`-bit halves of x."""
    mask, h = np.uint64((1 << half) - 1), np.uint64(half)
    left, right = x >> h, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right, key) & mask)
    return (left << h) | right


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Sample index at each position of the (seed, epoch) permutation of range(n); O(1) memory in n.

    The Feistel network permutes [0, 4**half) with 4**half < 4n; mapping again while the value
    is >= n (cycle walking) restricts it to a permutation of [0, n): the walk from a position
    < n always comes back below n, after fewer than 4 steps on average.
    """
    pos = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(pos.shape, dtype=np.int64)
    half, keys = max(1, math.ceil(math.log2(n) / 2)), _round_keys(seed, epoch)
    out = _feistel(pos, half, keys)
    todo = np.flatnonzero(out >= n)
    while todo.size:
        out[todo] = _feistel(out[todo], half, keys)
        todo = todo[out[todo] >= n]
    return out.astype(np.int64)


# ------------------------------------------------------------------ packed stream


class PackedTokens:
    """The documents of some shards as one stream, cut into samples of seq_len + 1 tokens."""

    def __init__(self, prefixes: list[Path], seq_len: int):
        self.seq_len, self.prefixes = seq_len, [Path(p) for p in prefixes]
        sizes, dtypes = [], [np.dtype(np.uint16)]
        for p in self.prefixes:  # opened once to check and count, then only while in the cache
            ds = IndexedDataset(p)
            sizes.append(ds.num_tokens)
            dtypes.append(ds.dtype)
        self.dtype = np.result_type(*dtypes)  # holds every shard's ids (uint16 and int32 -> int32)
        self.starts = np.cumsum([0, *sizes])  # stream offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        self._open: OrderedDict[int, IndexedDataset] = OrderedDict()

    def __len__(self) -> int:
        return self.num_samples

    def shard(self, k: int) -> IndexedDataset:
        """Shard k, memory-mapped; the least recently used is closed past OPEN_SHARDS."""
        if k in self._open:
            self._open.move_to_end(k)
        else:
            self._open[k] = IndexedDataset(self.prefixes[k])
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[k]

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        """stream[lo:hi], read from the memory-mapped shards it spans."""
        parts = []
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while k < len(self.prefixes) and self.starts[k] < hi:
            base = int(self.starts[k])
            a, b = max(lo, base) - base, min(hi, int(self.starts[k + 1])) - base
            parts.append(np.asarray(self.shard(k).tokens[a:b]))
            k += 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def __getitem__(self, i: int) -> np.ndarray:
        lo = i * self.seq_len
        return self.tokens(lo, lo + self.seq_len + 1)


# ------------------------------------------------------------------ loaders


class _Batches:
    """micro_batches() on top of a subclass's `samples(globals) -> (len, seq_len + 1)` rows."""

    seq_len: int

    def samples(self, gs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample(self, g: int) -> np.ndarray:
        return self.samples(np.array([g]))[0]

    def micro_batches(
        self, start: int, global_size: int, micro_size: int, dp_rank: int, dp_size: int
    ) -> list[dict]:
        """This rank's micro batches of the global batch of samples [start, start + global_size).

        Each is {"input_ids", "shift_labels"}: (micro_size, seq_len) int64, targets already aligned.
        """
        if global_size % (micro_size * dp_size) or not 0 <= dp_rank < dp_size:
            raise ConfigError(
                "batch.global_size",
                f"{global_size} samples do not split into micro batches of {micro_size} "
                f"on {dp_size} data-parallel ranks (dp_rank {dp_rank})",
            )
        per_rank = global_size // dp_size
        first = start + dp_rank * per_rank
        rows = torch.from_numpy(self.samples(np.arange(first, first + per_rank)).astype(np.int64))
        out = []
        for m in range(0, per_rank, micro_size):
            x = rows[m : m + micro_size]  # (micro_size, seq_len + 1)
            out.append({"input_ids": x[:, :-1].contiguous(), "shift_labels": x[:, 1:].contiguous()})
        return out


class TokenLoader(_Batches):
    """Global samples of one split in (seed, epoch)-shuffled order, sliced per data-parallel rank."""

    def __init__(
        self, prefixes: list[Path], seq_len: int, seed: int, *, shuffle: bool = True, name: str = ""
    ):
        self.data = PackedTokens(prefixes, seq_len)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.name = name or ", ".join(str(p) for p in prefixes[:3])
        if len(self.data) == 0:
            raise DataError(
                f"{self.name}: {self.data.num_tokens} tokens, fewer than one "
                f"sample of seq_len + 1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.data)

    def sample_indices(self, gs: np.ndarray) -> np.ndarray:
        """Which packed sample each global index is (epochs repeat with a fresh permutation)."""
        gs = np.asarray(gs, dtype=np.int64)
        epochs, pos = np.divmod(gs, len(self.data))
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            sel = epochs == epoch
            out[sel] = permute(pos[sel], len(self.data), self.seed, int(epoch))
        return out

    def sample_index(self, g: int) -> int:
        return int(self.sample_indices(np.array([g]))[0])

    def samples(self, gs: np.ndarray) -> np.ndarray:
        """(len(gs), seq_len + 1) token rows of these global samples."""
        idx = self.sample_indices(gs)
        rows = np.empty((len(idx), self.seq_len + 1), dtype=self.data.dtype)
        for r, i in enumerate(idx):
            rows[r] = self.data[int(i)]
        return rows


def blend_schedule(weights: list[float], period: int) -> np.ndarray:
    """Dataset of each position of one period: counts by largest remainder, order by largest deficit.

    Dataset d gets counts[d] positions per period (counts[d] / period is within 1 / (2 * period)
    of its weight). After any k positions it has counts[d] * k / period of them to within one, so
    any window holds it to within two samples of its share (a share error <= 2 / window).
    """
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.floor(w * period).astype(np.int64)
    rest = np.argsort(-(w * period - counts), kind="stable")[: period - int(counts.sum())]
    counts[rest] += 1
    taken = np.zeros(len(w), dtype=np.int64)
    schedule = np.empty(period, dtype=np.int64)
    for k in range(period):  # deficit of dataset d after k+1 positions, times `period` (exact ints)
        d = int(np.argmax(counts * (k + 1) - taken * period))
        schedule[k], taken[d] = d, taken[d] + 1
    assert (taken == counts).all()
    return schedule


class BlendedLoader(_Batches):
    """Several loaders (e.g. wiki 0.3, web 0.7) interleaved by weight; each keeps its own order and epochs."""

    def __init__(self, loaders: list[TokenLoader], weights: list[float], *, period: int = 10_000):
        if not loaders or len(loaders) != len(weights):
            raise ConfigError("weights", f"need one weight per dataset: {len(loaders)} vs {len(weights)}")
        for i, w in enumerate(weights):
            if not (math.isfinite(w) and w > 0):
                raise ConfigError(f"weights[{i}]", f"must be a positive number, got {w}")
        if len({ld.seq_len for ld in loaders}) != 1:
            raise ConfigError("seq_len", f"blended loaders differ: {[ld.seq_len for ld in loaders]}")
        self.loaders, self.seq_len, self.period = loaders, loaders[0].seq_len, period
        self.schedule = blend_schedule(weights, period)
        self.counts = np.bincount(self.schedule, minlength=len(loaders))
        if (self.counts == 0).any():
            raise ConfigError(
                f"weights[{int(np.argmin(self.counts))}]", f"too small: no sample in a period of {period}"
            )
        # ordinal of each position among the positions of its dataset within the period
        self.ordinal = np.empty(period, dtype=np.int64)
        for d in range(len(loaders)):
            at = np.flatnonzero(self.schedule == d)
            self.ordinal[at] = np.arange(len(at))

    def sources(self, gs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, that dataset's global index) of each blended global index."""
        cycle, pos = np.divmod(np.asarray(gs, dtype=np.int64), self.period)
        d = self.schedule[pos]
        return d, cycle * self.counts[d] + self.ordinal[pos]

    def samples(self, gs: np.ndarray) -> np.ndarray:
        d, j = self.sources(gs)
        rows = np.empty((len(d), self.seq_len + 1), dtype=np.int64)
        for k, loader in enumerate(self.loaders):
            sel = d == k
            if sel.any():
                rows[sel] = loader.samples(j[sel])
        return rows


def open_blend(
    datasets: list[tuple[Path, float]],
    split: str,
    seq_len: int,
    seed: int,
    *,
    checksums: bool = True,
    fingerprint: str | None = None,
    shuffle: bool = True,
) -> BlendedLoader:
    """A BlendedLoader over verified token folders given as (tokens_dir, weight) pairs.

    Every folder must come from the same tokenizer (the first one's, or `fingerprint` when given).
    """
    from pipeline.data.manifest import split_prefixes, verify_manifest

    loaders = []
    for tokens_dir, _ in datasets:
        manifest = verify_manifest(tokens_dir, checksums=checksums, fingerprint=fingerprint)
        fingerprint = manifest["tokenizer"]["fingerprint"]
        prefixes = split_prefixes(tokens_dir, manifest, split)
        loaders.append(TokenLoader(prefixes, seq_len, seed, shuffle=shuffle, name=f"{tokens_dir} ({split})"))
    return BlendedLoader(loaders, [w for _, w in datasets])
