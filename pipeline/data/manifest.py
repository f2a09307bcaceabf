"""`manifest.json` of a token folder: what the shards are, how they were made, and checks they are intact.

Schema ("prefix" is relative to the manifest's folder):
    {"format": "megatron-indexed-v1", "dtype": "uint16",
     "tokenizer": {"path", "fingerprint" (sha256 of tokenizer.model), "vocab_size", "bos_id", "eos_id", "pad_id"},
     "splits": {"train": [{"prefix", "documents", "tokens", "sha256": {"bin", "idx"}, ...}], "valid": [...]},
     "totals": {"train": {"documents", "tokens"}, "valid": {...}},
     "config": {...}, "lineage": {"inputs": [{"name", "bytes"}], ...}}
The trainer reads only this module and indexed.py from `pipeline.data`, so it never imports Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.indexed import IndexedDataset, bin_path, dtype_for_vocab, idx_path
from pipeline.errors import DataError
from pipeline.io import sha256_file, write_json

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


def verify_manifest(tokens_dir: Path, *, checksums: bool = True, fingerprint: str | None = None) -> dict:
    """Check every shard against the manifest; DataError naming the shard and what differs. Returns it."""
    tokens_dir = Path(tokens_dir)
    manifest = load_manifest(tokens_dir)
    _check_tokenizer(tokens_dir, manifest["tokenizer"], fingerprint)
    dtype = np.dtype(manifest["dtype"])
    for split, entries in manifest["splits"].items():
        for entry in entries:
            _check_shard(tokens_dir, entry, dtype, checksums)
        total = {
            "documents": sum(e["documents"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
        }
        if manifest["totals"].get(split) != total:
            raise DataError(
                f"{tokens_dir / MANIFEST}: totals[{split}] {manifest['totals'].get(split)} "
                f"!= sum of its shards {total}"
            )
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


def _check_shard(tokens_dir: Path, entry: dict, dtype: np.dtype, checksums: bool) -> None:
    prefix = tokens_dir / entry["prefix"]
    name = entry["prefix"]
    for p in (bin_path(prefix), idx_path(prefix)):
        if not p.is_file():
            raise DataError(f"shard {name}: missing file {p}")
    if checksums:
        for kind, p in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
            got = sha256_file(p)
            if got != entry["sha256"][kind]:
                raise DataError(
                    f"shard {name}: sha256 mismatch in {p} ({got[:12]} != recorded {entry['sha256'][kind][:12]})"
                )
    ds = IndexedDataset(prefix)  # DataError on a bad header or a .bin/.idx size mismatch
    found = {"documents": len(ds), "tokens": ds.num_tokens, "dtype": ds.dtype.name}
    want = {"documents": entry["documents"], "tokens": entry["tokens"], "dtype": dtype.name}
    if found != want:
        raise DataError(f"shard {name}: {idx_path(prefix)} holds {found}, manifest says {want}")
