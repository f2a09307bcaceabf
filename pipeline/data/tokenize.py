"""Tokenize one cleaned shard into Megatron `.bin/.idx` token shards (train and valid splits).

Each document becomes its SentencePiece ids followed by one EOS. A document goes to the valid
split when a hash of its id falls below `valid_fraction`, so the split of a document never
changes when the corpus grows. Documents are streamed to the output (memory holds one encode
batch), into one `.bin/.idx` pair per split or, with `shard_tokens`, pairs of about that size.
A shard is done when `<stem>.tokens.json` (written last) matches the cleaned shard, tokenizer,
split and size settings; a re-run then returns its entries untouched.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.config import TokenizeConfig
from pipeline.data.indexed import IndexedWriter, bin_path, dtype_for_vocab, idx_path
from pipeline.data.manifest import write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.io import read_jsonl_zst, sha256_file, write_json, zstd_chunks

__all__ = ["tokenize_file", "write_manifest", "is_valid", "shard_stem"]

log = logging.getLogger(__name__)
SPLITS = ("train", "valid")


def shard_stem(src: Path) -> str:
    """`enwiki-1.jsonl.zst` -> `enwiki-1`: the name every output of this shard starts with."""
    name = Path(src).name
    return name[: -len(".jsonl.zst")] if name.endswith(".jsonl.zst") else Path(name).stem


def is_valid(doc_id: str, valid_fraction: float) -> bool:
    """True for the documents of the valid split: the first 8 bytes of blake2b(id), as a fraction."""
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < valid_fraction


def _open_tokenizer(cfg: TokenizeConfig):
    import sentencepiece as spm

    if cfg.tokenizer is None:
        raise ConfigError("tokenize.tokenizer", "is required to tokenize")
    model = Path(cfg.tokenizer) / "tokenizer.model"
    if not model.is_file():
        raise ConfigError(
            "tokenize.tokenizer", f"{model} not found (train one with launch/train_tokenizer.py)"
        )
    return spm.SentencePieceProcessor(model_file=str(model)), sha256_file(model)


def _records(src: Path):
    """Yield (record number, row) from a cleaned shard; a corrupt file is a DataError naming it."""
    import zstandard

    n = 0
    try:
        for n, row in enumerate(read_jsonl_zst(src), start=1):
            yield n, row
    except (ValueError, OSError, zstandard.ZstdError) as exc:  # bad JSON or UTF-8, corrupt/truncated zstd
        raise DataError(f"{src}: unreadable after record {n}: {exc}") from None


def check_complete(src: Path) -> None:
    """DataError unless every zstd frame of `src` ends: checked before any output is written, so a
    truncated shard fails before the stage has spent time on it."""
    for _ in zstd_chunks(src):
        pass


def _documents(src: Path, bad: Counter):
    """Yield (doc id, text); records without a string text are counted under `no_text` and skipped."""
    for n, row in _records(src):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            bad["no_text"] += 1
            log.warning("%s: record %d has no text, skipped", src, n)
            continue
        doc_id = row.get("id")
        if not isinstance(doc_id, str) or not doc_id:  # still tokenized; split by the text instead
            bad["no_id"] += 1
            doc_id = "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()
        yield doc_id, text


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class SplitShards:
    """One split's output of one cleaned shard: documents streamed into `<stem>.<split>.bin/.idx`,
    or, with `shard_tokens`, into `<stem>.<split>.0000`, `.0001`, ... of about that many tokens each
    (a document is never cut: a shard ends after the document that reaches the limit)."""

    def __init__(self, out_dir: Path, stem: str, split: str, dtype: np.dtype, shard_tokens: int, source: str):
        self.out_dir, self.stem, self.split, self.dtype = out_dir, stem, split, dtype
        self.shard_tokens, self.source = shard_tokens, source
        self.entries: list[dict] = []
        self.writer: IndexedWriter | None = None

    def prefix(self, k: int) -> Path:
        name = f"{self.stem}.{self.split}" + (f".{k:04d}" if self.shard_tokens else "")
        return self.out_dir / name

    def add(self, tokens: np.ndarray) -> None:
        if self.writer is None:
            self.writer = IndexedWriter(self.prefix(len(self.entries)), self.dtype)
        self.writer.add(tokens)
        if self.shard_tokens and self.writer.tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        docs, tokens = writer.finish()
        sums = {"bin": writer.bin_sha256.hexdigest(), "idx": sha256_file(idx_path(writer.prefix))}
        self.entries.append(
            {
                "split": self.split,
                "prefix": writer.prefix.name,
                "source": self.source,
                "documents": docs,
                "tokens": tokens,
                "sha256": sums,
            }
        )

    def finish(self) -> list[dict]:
        """Close the last shard; returns one manifest entry per shard written (none for an empty split)."""
        if self.writer is not None:
            self._close()
        return self.entries

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def encode_shard(src: Path, sp, cfg: TokenizeConfig, outputs: dict[str, SplitShards]) -> Counter:
    """Stream every document's ids + EOS into its split's output, in document order; returns record problems."""
    bad: Counter = Counter()
    eos, dtype = sp.eos_id(), outputs["train"].dtype
    for batch in _batches(_documents(src, bad), cfg.batch_size):
        # one thread: a Ray task owns one CPU, and the output must not depend on threading
        ids = sp.encode([text for _, text in batch], num_threads=1)
        for (doc_id, _), toks in zip(batch, ids):
            arr = np.empty(len(toks) + 1, dtype=dtype)
            arr[:-1] = toks
            arr[-1] = eos
            outputs["valid" if is_valid(doc_id, cfg.valid_fraction) else "train"].add(arr)
    return bad


def _remove_outputs(out_dir: Path, stem: str) -> None:
    """Delete this shard's token files from an earlier run (other settings may have named them differently)."""
    pattern = re.compile(re.escape(stem) + r"\.(train|valid)(\.\d{4})?\.(bin|idx)")
    for p in out_dir.glob(f"{glob.escape(stem)}.*"):
        if pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)


def _done_key(src: Path, fp: str, cfg: TokenizeConfig, shard_tokens: int) -> dict:
    return {
        "source": src.name,
        "source_sha256": sha256_file(src),
        "tokenizer": fp,
        "valid_fraction": cfg.valid_fraction,
        "shard_tokens": shard_tokens,
    }


def _finished(marker: Path, key: dict, out_dir: Path) -> list[dict] | None:
    """The entries recorded by a previous run, if it finished with the same inputs and settings."""
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if done.get("key") != key:
        return None
    prefixes = [out_dir / e["prefix"] for e in done.get("entries", [])]
    if not all(bin_path(p).is_file() and idx_path(p).is_file() for p in prefixes):
        return None
    return done["entries"]


def tokenize_file(src: Path, out_dir: Path, cfg: TokenizeConfig, *, shard_tokens: int = 0) -> list[dict]:
    """Write `<out_dir>/<stem>.train|valid[.NNNN].bin/.idx`; returns one manifest entry per shard written.

    `shard_tokens` > 0 cuts each split into shards of about that many tokens (0: one per split).
    Documents are streamed: memory holds one encode batch, whatever the size of the shard.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise DataError(f"{src}: cleaned shard not found")
    if shard_tokens < 0:
        raise ConfigError(
            "tokenize.shard_tokens", f"must be >= 0 (0: one shard per split), got {shard_tokens}"
        )
    sp, fp = _open_tokenizer(cfg)
    stem, marker = shard_stem(src), out_dir / f"{shard_stem(src)}.tokens.json"
    key = _done_key(src, fp, cfg, shard_tokens)
    if (entries := _finished(marker, key, out_dir)) is not None:
        log.info("%s: already tokenized, skipped", src.name)
        return entries
    check_complete(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    _remove_outputs(out_dir, stem)  # no stale shard of an earlier run is left beside the new ones
    dtype = dtype_for_vocab(sp.get_piece_size())
    outputs = {s: SplitShards(out_dir, stem, s, dtype, shard_tokens, src.name) for s in SPLITS}
    try:
        bad = encode_shard(src, sp, cfg, outputs)
        entries = [e for s in SPLITS for e in outputs[s].finish()]
    except BaseException:  # a shard is all or nothing: drop its temp file and any finished pieces
        for out in outputs.values():
            out.abort()
        _remove_outputs(out_dir, stem)
        raise
    if bad:  # no_text: skipped; no_id: kept, split by a hash of its text
        log.warning("%s: record problems %s", src.name, dict(bad))
    write_json(marker, {"key": key, "entries": entries, "problems": dict(bad)})
    return entries
