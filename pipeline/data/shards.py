"""Cleaned shards: one input file in, `cleaned/<stem>.jsonl.zst` + `cleaned/<stem>.stats.json` out
(+ `cleaned/<stem>.sig.npy`, the dedup signatures of the kept documents, when the job dedups, and
`cleaned/<stem>.quality.npy`, their quality scores, when the job's `select` step cuts by them).

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
from dataclasses import dataclass
from pathlib import Path

import zstandard

from pipeline.config import config_hash
from pipeline.data.config import DataConfig
from pipeline.data.decontam import index_fingerprint
from pipeline.data.dedup import MinHasher, write_signatures
from pipeline.data.document import Counts, Document
from pipeline.data.filters import build_filters, build_quality
from pipeline.data.formats import detect_format, extraction_stages, open_reader
from pipeline.data.quality_model import model_fingerprint, score_units, write_scores
from pipeline.data.readers import input_stem
from pipeline.data.stage import Stage, run_stages
from pipeline.errors import DataError
from pipeline.io import atomic_write, write_json

log = logging.getLogger(__name__)

CLEAN_VERSION = 3
"""Bump when reader/extractor/filter code changes what a shard holds, so old shards are redone."""
BATCH_DOCS = 256  # documents per run_stages call: bounds memory, does not change the output
ZSTD_LEVEL = 3


def clean_hash(cfg: DataConfig) -> str:
    """Hash of everything that decides a cleaned shard's bytes (not output_dir, ray or tokenize)."""
    parts = {"version": CLEAN_VERSION, "format": cfg.format, "read": cfg.read, "clean": cfg.clean}
    parts["filters"] = cfg.filters
    if cfg.filters.quality_model.enabled:  # a retrained model or new evaluation files redo the shards
        parts["quality_model"] = model_fingerprint(cfg.filters.quality_model)
    if cfg.filters.decontam.enabled:
        parts["decontam"] = index_fingerprint(cfg.filters.decontam)
    if "dedup" in cfg.steps:  # the signatures are part of the shard then
        parts["dedup"] = cfg.dedup.signature_settings()
    return config_hash(parts)


@dataclass(frozen=True)
class Unit:
    """One task's input: a whole file, or a byte range of a multistream Wikipedia dump."""

    path: Path
    byte_range: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The output stem: the input's, plus `@<start byte>` for a range (fixed by the index)."""
        stem = input_stem(self.path)
        return stem if self.byte_range is None else f"{stem}@{self.byte_range[0]:012d}"


def unit_name(src: str | Path | Unit) -> str:
    return src.name if isinstance(src, Unit) else input_stem(src)


def shard_paths(cleaned_dir: Path, src: str | Path | Unit) -> tuple[Path, Path]:
    """(`<stem>.jsonl.zst`, `<stem>.stats.json`) in `cleaned_dir` for input `src`."""
    stem = unit_name(src)
    return cleaned_dir / f"{stem}.jsonl.zst", cleaned_dir / f"{stem}.stats.json"


def sig_path(cleaned_dir: Path, src: str | Path | Unit) -> Path:
    """`<stem>.sig.npy`: one row of dedup hashes per kept document, in shard order."""
    return cleaned_dir / f"{unit_name(src)}.sig.npy"


def score_path(folder: Path, src: str | Path | Unit) -> Path:
    """`<stem>.quality.npy`: the quality score of each document of the shard in `folder`, in shard order."""
    return folder / f"{unit_name(src)}.quality.npy"


def finished_stats(cleaned_dir: Path, src: str | Path | Unit, cfg_hash: str) -> dict | None:
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
    src: Path | Unit, cleaned_dir: Path, cfg: DataConfig, cfg_hash: str, shared: dict | None = None
) -> dict:
    """Clean one input (file or range) into its shard and return its stats; a finished shard is not redone.
    `shared`: the filters' job-wide objects (filters.build_shared), built here when None."""
    unit = src if isinstance(src, Unit) else Unit(Path(src))
    done = finished_stats(cleaned_dir, unit, cfg_hash)
    if done is not None:
        log.info("%s: already cleaned with this config, skipped", unit.name)
        return {**done, "skipped": True}
    src = unit.path
    fmt = detect_format(src) if cfg.format == "auto" else cfg.format
    reader = open_reader(src, fmt, cfg.read, unit.byte_range)
    stages: list[Stage] = [
        *extraction_stages(fmt, reader.site, cfg.read),
        *build_filters(cfg.clean),
        *build_quality(cfg.filters, shared),
    ]
    per_stage = {stage.name: Counts() for stage in stages}
    data_path, stats_path = shard_paths(cleaned_dir, unit)
    hasher = MinHasher(cfg.dedup) if "dedup" in cfg.steps else None
    sigs: list = []
    scores: list[int] | None = [] if cfg.filters.quality_model.selects else None
    with atomic_write(data_path, "wb") as fh:
        chars = _write_docs(fh, _clean_batches(reader, stages, per_stage), hasher, sigs, scores)
        stats = _stats(unit, reader.counts, per_stage, cfg_hash, chars)
        _check_error_fraction(src, stats["totals"], cfg.max_error_fraction)  # raising here leaves no shard
    if hasher is not None:
        write_signatures(sig_path(cleaned_dir, unit), sigs, cfg.dedup.bands)
    if scores is not None:
        write_scores(score_path(cleaned_dir, unit), scores)
    stats["format"] = fmt
    stats["bytes_out"] = data_path.stat().st_size
    write_json(stats_path, stats)
    return {**stats, "skipped": False}


def _clean_batches(reader: Iterable[Document], stages: list[Stage], per_stage: dict) -> Iterator[Document]:
    it = iter(reader)
    while batch := list(itertools.islice(it, BATCH_DOCS)):
        docs, _ = run_stages(stages, batch, per_stage)
        yield from docs


def _write_docs(
    fh,
    docs: Iterable[Document],
    hasher: MinHasher | None = None,
    sigs: list | None = None,
    scores: list | None = None,
) -> int:
    """Stream documents as zstd-compressed JSON lines into `fh` (their dedup rows into `sigs`, their
    quality scores into `scores`); returns characters of text written."""
    chars = 0
    writer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(fh, closefd=False)
    for doc in docs:
        writer.write((json.dumps(doc.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
        chars += len(doc.text)
        if hasher is not None:
            sigs.append(hasher.row(doc.text))
        if scores is not None:
            scores.append(score_units(doc))
    writer.flush(zstandard.FLUSH_FRAME)  # end the frame: without it the file reads back silently short
    return chars


def _stats(unit: Unit, read: Counts, per_stage: dict[str, Counts], cfg_hash: str, chars: int) -> dict:
    """Per-stage counters and the file's totals (in = kept + dropped + errors)."""
    stages = {"read": read, **per_stage}
    totals = Counts.merge(
        [Counts(dropped=c.dropped, errors=c.errors, noted=c.noted) for c in stages.values()]
    )
    totals.kept = list(stages.values())[-1].kept  # survivors of the last stage
    assert totals.total_in == read.total_in, "accounting broken: documents disappeared between stages"
    return {
        "input": unit.path.name,
        **({"byte_range": list(unit.byte_range)} if unit.byte_range else {}),
        "config_hash": cfg_hash,
        "bytes_in": _size(unit.path) if unit.byte_range is None else unit.byte_range[1] - unit.byte_range[0],
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


def _size(path: Path) -> int:
    """Bytes of an input file, or of all files in an input folder (a saved dataset)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
