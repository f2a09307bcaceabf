"""`manifest.json` of a token folder: what the shards are, how they were made, and checks they are intact.

Schema ("prefix" is relative to the manifest's folder):
    {"format": "megatron-indexed-v1", "dtype": "uint16",
     "tokenizer": {"path", "fingerprint" (sha256 of tokenizer.model), "vocab_size", "bos_id", "eos_id", "pad_id"},
     "splits": {"train": [{"prefix", "documents", "tokens", "sha256": {"bin", "idx"}, ...}], "valid": [...]},
     "totals": {"train": {"documents", "tokens"}, "valid": {...}},
     "config": {...}, "lineage": {"inputs": [{"name", "bytes"}], ...}}
The trainer reads only this module and indexed.py from `pipeline.data`, so it never imports Ray.

Checksums of a huge corpus take long (about 10 minutes per 600 GB at 1 GB/s), so a `ChecksumRecord`
(a JSON file the trainer keeps in the run directory) remembers each file whose sha256 matched,
with its size, modification and change times and inode: a later verification (a requeued job, a
resume) hashes only files that changed since, or whose manifest entry did.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.data.indexed import IndexedDataset, bin_path, dtype_for_vocab, idx_path
from pipeline.errors import DataError
from pipeline.io import sha256_file, write_json

log = logging.getLogger(__name__)
FORMAT = "megatron-indexed-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")


def tokenizer_info(tokenizer_dir: Path) -> dict:
    """The manifest's `tokenizer` section, read from `tokenizer_dir/tokenizer.model`."""
    import sentencepiece as spm

    model = Path(tokenizer_dir) / "tokenizer.model"
    if not model.is_file():
        raise DataError(f"{model}: tokenizer model not found")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return {
        "path": str(tokenizer_dir),
        "fingerprint": sha256_file(model),
        "vocab_size": sp.get_piece_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
    }


def write_manifest(
    out_dir: Path, entries: list[dict], *, tokenizer_dir: Path, config: dict, lineage: dict
) -> Path:
    """Write `<out_dir>/manifest.json` atomically from tokenize_file's entries (sorted: deterministic)."""
    tok = tokenizer_info(tokenizer_dir)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for e in entries:
        split = e.get("split") or e["prefix"].rsplit(".", 1)[-1]
        if split not in splits:
            raise DataError(f"{out_dir}: shard entry {e['prefix']} has unknown split {split!r}")
        splits[split].append(e)
    prefixes = [e["prefix"] for e in entries]
    if len(set(prefixes)) != len(prefixes):
        raise DataError(f"{out_dir}: duplicate shard prefixes in {sorted(prefixes)}")
    splits = {s: sorted(es, key=lambda e: e["prefix"]) for s, es in splits.items()}
    manifest = {
        "format": FORMAT,
        "dtype": dtype_for_vocab(tok["vocab_size"]).name,
        "tokenizer": tok,
        "splits": splits,
        "totals": {
            s: {"documents": sum(e["documents"] for e in es), "tokens": sum(e["tokens"] for e in es)}
            for s, es in splits.items()
        },
        "config": config,
        "lineage": lineage,
    }
    path = Path(out_dir) / MANIFEST
    write_json(path, manifest)
    return path


def load_manifest(tokens_dir: Path) -> dict:
    """The parsed manifest of a token folder; DataError if missing, unreadable or not ours."""
    path = Path(tokens_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path}: token manifest not found (run launch/prepare_data.py with the tokenize step)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    for key in ("dtype", "tokenizer", "splits", "totals"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    return manifest


def split_prefixes(tokens_dir: Path, manifest: dict, split: str) -> list[Path]:
    """Absolute shard prefixes of one split, in manifest order (may be empty)."""
    if split not in manifest["splits"]:
        raise DataError(
            f"{Path(tokens_dir) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    return [Path(tokens_dir) / e["prefix"] for e in manifest["splits"][split]]


class ChecksumRecord:
    """Files whose sha256 matched, keyed by path and (size, mtime, ctime, inode): an unchanged file is
    not hashed again. Writing a file changes its ctime, which no user can set back."""

    VERSION = 1

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files: dict[str, dict] = {}
        self.hashed = self.skipped = 0
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                if raw.get("version") == self.VERSION:
                    self.files = dict(raw["files"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("%s: unreadable checksum record (%s); verifying every file again", self.path, exc)

    @staticmethod
    def _key(file: Path, sha256: str) -> tuple[str, dict]:
        st = file.stat()
        stamp = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino,
        }
        return str(file.resolve()), {**stamp, "sha256": sha256}

    def verified(self, file: Path, sha256: str) -> bool:
        """Whether `file` matched `sha256` before and has not changed since."""
        name, entry = self._key(file, sha256)
        return self.files.get(name) == entry

    def add(self, file: Path, sha256: str) -> None:
        name, entry = self._key(file, sha256)
        self.files[name] = entry

    def save(self) -> None:
        write_json(self.path, {"version": self.VERSION, "files": self.files})


def verify_manifest(
    tokens_dir: Path,
    *,
    checksums: bool = True,
    fingerprint: str | None = None,
    record: ChecksumRecord | None = None,
) -> dict:
    """Check every shard against the manifest; DataError naming the shard and what differs. Returns it.

    With a `record`, files it lists as verified and unchanged are not hashed, and newly hashed ones
    are added to it (saved every minute and at the end, so an interrupted pass keeps its progress).
    """
    tokens_dir = Path(tokens_dir)
    manifest = load_manifest(tokens_dir)
    _check_tokenizer(tokens_dir, manifest["tokenizer"], fingerprint)
    dtype = np.dtype(manifest["dtype"])
    saved_at = time.monotonic()
    for split, entries in manifest["splits"].items():
        for entry in entries:
            _check_shard(tokens_dir, entry, dtype, checksums, record)
            if record is not None and time.monotonic() - saved_at > 60:
                record.save()
                saved_at = time.monotonic()
        total = {
            "documents": sum(e["documents"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
        }
        if manifest["totals"].get(split) != total:
            raise DataError(
                f"{tokens_dir / MANIFEST}: totals[{split}] {manifest['totals'].get(split)} "
                f"!= sum of its shards {total}"
            )
    if record is not None and checksums:
        record.save()
    return manifest


def _check_tokenizer(tokens_dir: Path, tok: dict, fingerprint: str | None) -> None:
    where = tokens_dir / MANIFEST
    if fingerprint is not None and tok.get("fingerprint") != fingerprint:
        raise DataError(
            f"{where}: tokenizer fingerprint mismatch: shards were made with "
            f"{str(tok.get('fingerprint'))[:12]}, expected {fingerprint[:12]}"
        )
    model = _tokenizer_model(tokens_dir, tok.get("path", ""))
    if model is not None and sha256_file(model) != tok.get("fingerprint"):
        raise DataError(
            f"{where}: tokenizer fingerprint mismatch: {model} changed since the shards were "
            f"made (was {str(tok.get('fingerprint'))[:12]}); re-tokenize or restore the tokenizer"
        )


def _tokenizer_model(tokens_dir: Path, path: str) -> Path | None:
    """The recorded tokenizer.model when it can be found (as written, or relative to the token folder)."""
    for folder in (Path(path), tokens_dir / path):
        if path and (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None


def _check_shard(
    tokens_dir: Path, entry: dict, dtype: np.dtype, checksums: bool, record: ChecksumRecord | None = None
) -> None:
    prefix = tokens_dir / entry["prefix"]
    name = entry["prefix"]
    for p in (bin_path(prefix), idx_path(prefix)):
        if not p.is_file():
            raise DataError(f"shard {name}: missing file {p}")
    if checksums:
        for kind, p in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
            want = entry["sha256"][kind]
            if record is not None and record.verified(p, want):
                record.skipped += 1
                continue
            got = sha256_file(p)
            if got != want:
                raise DataError(f"shard {name}: sha256 mismatch in {p} ({got[:12]} != recorded {want[:12]})")
            if record is not None:
                record.add(p, got)
                record.hashed += 1
    ds = IndexedDataset(prefix)  # DataError on a bad header or a .bin/.idx size mismatch
    found = {"documents": len(ds), "tokens": ds.num_tokens, "dtype": ds.dtype.name}
    want = {"documents": entry["documents"], "tokens": entry["tokens"], "dtype": dtype.name}
    if found != want:
        raise DataError(f"shard {name}: {idx_path(prefix)} holds {found}, manifest says {want}")
