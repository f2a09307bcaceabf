"""Cleaned shards: one input file in, `cleaned/<stem>.jsonl.zst` + `cleaned/<stem>.stats.json` out.

`clean_file` is the whole per-file job (read -> extract -> filters -> write) in plain Python,
so the Ray runner only schedules it and a test can call it directly. Memory stays flat: the
reader streams, documents go through the stages in batches, and the output is compressed as a
stream. The data file is written under a temporary name and renamed only after the whole input
was read and the error fraction checked; `stats.json` is written last and records the config
hash, so a shard counts as done only when both exist and the hash matches (resume).
Output bytes depend only on the input file and the config, never on the worker that ran it.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from pipeline.config import config_hash
from pipeline.data.config import CleanConfig, DataConfig
from pipeline.data.document import Counts, Document
from pipeline.data.extract import EXTRACTORS
from pipeline.data.filters import build_filters
from pipeline.data.readers import READERS, input_stem
from pipeline.data.stage import Stage, run_stages
from pipeline.errors import DataError
from pipeline.io import atomic_write, write_json

log = logging.getLogger(__name__)

CLEAN_VERSION = 1
"""Bump when reader/extractor/filter code changes what a shard holds, so old shards are redone."""
BATCH_DOCS = 256  # documents per run_stages call: bounds memory, does not change the output
ZSTD_LEVEL = 3


def clean_hash(cfg: DataConfig) -> str:
    """Hash of everything that decides a cleaned shard's bytes (not output_dir, ray or tokenize)."""
    return config_hash({"version": CLEAN_VERSION, "format": cfg.format, "clean": cfg.clean})


def shard_paths(cleaned_dir: Path, src: str | Path) -> tuple[Path, Path]:
    """(`<stem>.jsonl.zst`, `<stem>.stats.json`) in `cleaned_dir` for input file `src`."""
    stem = input_stem(src)
    return cleaned_dir / f"{stem}.jsonl.zst", cleaned_dir / f"{stem}.stats.json"


def finished_stats(cleaned_dir: Path, src: str | Path, cfg_hash: str) -> dict | None:
    """The recorded stats if `src`'s shard is complete and was made with `cfg_hash`, else None."""
    data_path, stats_path = shard_paths(cleaned_dir, src)
    if not (data_path.is_file() and stats_path.is_file()):
        return None
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable stats: redo the shard
    return stats if stats.get("config_hash") == cfg_hash else None


def clean_file(
    src: Path, cleaned_dir: Path, *, fmt: str, clean: CleanConfig, cfg_hash: str, max_error_fraction: float
) -> dict:
    """Clean one input file into its shard and return its stats; a finished shard is not redone."""
    done = finished_stats(cleaned_dir, src, cfg_hash)
    if done is not None:
        log.info("%s: already cleaned with this config, skipped", src)
        return {**done, "skipped": True}
    reader = READERS[fmt](src)
    stages: list[Stage] = [EXTRACTORS[fmt](reader.site), *build_filters(clean)]
    per_stage = {stage.name: Counts() for stage in stages}
    data_path, stats_path = shard_paths(cleaned_dir, src)
    with atomic_write(data_path, "wb") as fh:
        chars = _write_docs(fh, _clean_batches(reader, stages, per_stage))
        stats = _stats(src, reader.counts, per_stage, cfg_hash, chars)
        _check_error_fraction(src, stats["totals"], max_error_fraction)  # raising here leaves no shard
    stats["bytes_out"] = data_path.stat().st_size
    write_json(stats_path, stats)
    return {**stats, "skipped": False}


def _clean_batches(reader: Iterable[Document], stages: list[Stage], per_stage: dict) -> Iterator[Document]:
    it = iter(reader)
    while batch := list(itertools.islice(it, BATCH_DOCS)):
        docs, _ = run_stages(stages, batch, per_stage)
        yield from docs


def _write_docs(fh, docs: Iterable[Document]) -> int:
    """Stream documents as zstd-compressed JSON lines into `fh`; returns characters of text written."""
    chars = 0
    writer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(fh, closefd=False)
    for doc in docs:
        writer.write((json.dumps(doc.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
        chars += len(doc.text)
    writer.flush(zstandard.FLUSH_FRAME)  # end the frame: without it the file reads back silently short
    return chars


def _stats(src: Path, read: Counts, per_stage: dict[str, Counts], cfg_hash: str, chars: int) -> dict:
    """Per-stage counters and the file's totals (in = kept + dropped + errors)."""
    stages = {"read": read, **per_stage}
    totals = Counts.merge([Counts(dropped=c.dropped, errors=c.errors) for c in stages.values()])
    totals.kept = list(stages.values())[-1].kept  # survivors of the last stage
    assert totals.total_in == read.total_in, "accounting broken: documents disappeared between stages"
    return {
        "input": src.name,
        "config_hash": cfg_hash,
        "bytes_in": src.stat().st_size,
        "chars_out": chars,
        "stages": [{"name": name, **c.to_dict()} for name, c in stages.items()],  # a list: funnel order
        "totals": totals.to_dict(),
    }


def _check_error_fraction(src: Path, totals: dict, limit: float) -> None:
    errors = sum(totals["errors"].values())
    if errors and errors / max(totals["in"], 1) > limit:
        reasons = ", ".join(f"{k} {v}" for k, v in totals["errors"].items())
        raise DataError(
            f"{src}: {errors} of {totals['in']} records could not be read ({reasons}), more than "
            f"max_error_fraction={limit}; see the warnings above for where (is it the right format?)"
        )
