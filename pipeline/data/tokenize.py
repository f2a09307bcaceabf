"""Tokenize one cleaned shard into Megatron `.bin/.idx` token shards (train and valid splits).

Each document becomes its SentencePiece ids followed by one EOS. A document goes to the valid
split when a hash of its id falls below `valid_fraction`, so the split of a document never
changes when the corpus grows. A shard is done when `<stem>.tokens.json` (written last) matches
the cleaned shard, tokenizer and split settings; a re-run then returns its entries untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.config import TokenizeConfig
from pipeline.data.indexed import bin_path, dtype_for_vocab, idx_path, write_indexed
from pipeline.data.manifest import write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.io import read_jsonl_zst, sha256_file, write_json

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


def encode_shard(
    src: Path, sp, cfg: TokenizeConfig, dtype: np.dtype
) -> tuple[dict[str, list[np.ndarray]], Counter]:
    """Token arrays (ids + EOS) per split, in document order, and the counts of record problems."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    bad: Counter = Counter()
    eos = sp.eos_id()
    for batch in _batches(_documents(src, bad), cfg.batch_size):
        # one thread: a Ray task owns one CPU, and the output must not depend on threading
        ids = sp.encode([text for _, text in batch], num_threads=1)
        for (doc_id, _), toks in zip(batch, ids):
            split = "valid" if is_valid(doc_id, cfg.valid_fraction) else "train"
            arr = np.empty(len(toks) + 1, dtype=dtype)
            arr[:-1] = toks
            arr[-1] = eos
            out[split].append(arr)
    return out, bad


def _done_key(src: Path, fp: str, cfg: TokenizeConfig) -> dict:
    return {
        "source": src.name,
        "source_sha256": sha256_file(src),
        "tokenizer": fp,
        "valid_fraction": cfg.valid_fraction,
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


def tokenize_file(src: Path, out_dir: Path, cfg: TokenizeConfig) -> list[dict]:
    """Write `<out_dir>/<stem>.train|valid.bin/.idx`; returns one manifest entry per split written."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise DataError(f"{src}: cleaned shard not found")
    sp, fp = _open_tokenizer(cfg)
    stem, marker = shard_stem(src), out_dir / f"{shard_stem(src)}.tokens.json"
    key = _done_key(src, fp, cfg)
    if (entries := _finished(marker, key, out_dir)) is not None:
        log.info("%s: already tokenized, skipped", src.name)
        return entries
    dtype = dtype_for_vocab(sp.get_piece_size())
    per_split, bad = encode_shard(src, sp, cfg, dtype)
    entries = []
    for split in SPLITS:
        prefix = out_dir / f"{stem}.{split}"
        if not per_split[split]:  # nothing for this split: leave no (stale) files behind
            for p in (bin_path(prefix), idx_path(prefix)):
                p.unlink(missing_ok=True)
            continue
        docs, tokens = write_indexed(prefix, per_split[split], dtype)
        sums = {"bin": sha256_file(bin_path(prefix)), "idx": sha256_file(idx_path(prefix))}
        entries.append(
            {
                "split": split,
                "prefix": prefix.name,
                "source": src.name,
                "documents": docs,
                "tokens": tokens,
                "sha256": sums,
            }
        )
    if bad:  # no_text: skipped; no_id: kept, split by a hash of its text
        log.warning("%s: record problems %s", src.name, dict(bad))
    write_json(marker, {"key": key, "entries": entries, "problems": dict(bad)})
    return entries
