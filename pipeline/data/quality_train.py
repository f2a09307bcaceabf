"""Train the quality classifier (DCLM's recipe): fastText on positives vs. negatives given in config.

Positives are text you want more of (cleaned Wikipedia shards, instruction answers), negatives
random raw web text. Every text goes to the held-out split when a seeded hash of the text falls
under `valid_fraction` (so a text repeated in the inputs never sits on both sides); the larger
class is cut down to the smaller one by the same kind of hash when `balance` is on. Training is
floret's `train_supervised` (fastText's algorithm; one thread by default, which makes the model a
function of data and seed). The folder `<output_root>/<name>/` appears atomically with `model.bin`
and `quality_model.json`: labels, config, each input file's sha256 and counts, and accuracy,
precision, recall, F1 and ROC AUC on the held-out split.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import to_dict
from pipeline.data.quality_model import MODEL_FILE, SIDECAR, QualityScorer, model_text
from pipeline.data.records import field_texts, iter_records
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)


@dataclass
class TextSource:
    path: str
    """A file or glob: `.jsonl`/`.json` (optionally `.gz`/`.zst`/`.bz2`, cleaned shards too) or `.parquet`."""
    fields: list[str] = field(default_factory=lambda: ["text"])
    """Record fields to take text from; dotted names walk into objects and lists (`instances.output`)."""
    max_texts: int = 0
    """Take at most this many texts from this source, those with the smallest seeded hash (0: all)."""


@dataclass
class QualityTrainConfig:
    name: str
    """Folder name: the model is written to `<output_root>/<name>/`."""
    positives: list[TextSource]
    negatives: list[TextSource]
    output_root: Path = Path("quality_models")
    positive_label: str = "hq"
    negative_label: str = "lq"
    valid_fraction: float = 0.1
    """Share of texts held out for the reported accuracy and F1 (by a seeded hash of the text)."""
    balance: bool = True
    """Cut the larger class down to the size of the smaller one (seeded hash), so 0.5 is a fair threshold."""
    min_chars: int = 50
    """Texts shorter than this are skipped (counted as too_short)."""
    max_chars: int = 0
    """Characters of each text the model sees, here and when scoring (0: all)."""
    seed: int = 0
    dim: int = 32
    """Embedding width. Model size is about (words + bucket) x dim x 4 bytes."""
    epoch: int = 10
    """Passes over the training texts (fastText's 5 is for millions of texts; small sets want more)."""
    lr: float = 0.5
    """Learning rate (fastText's classification examples use 0.1 to 1.0; 0.5 held up on the samples)."""
    word_ngrams: int = 2
    """fastText word n-grams (DCLM: bigrams)."""
    min_count: int = 2
    bucket: int = 200_000
    """Hash buckets of the word n-grams."""
    threads: int = 1
    """Training threads; more is faster but no longer reproducible (fastText's Hogwild updates)."""

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(
                "name", f"must be a folder name (letters, digits, '.', '_', '-'), got {self.name!r}"
            )
        for key in ("positives", "negatives"):
            if not getattr(self, key):
                raise ConfigError(key, "must list at least one source")
        if self.positive_label == self.negative_label or not re.fullmatch(
            r"\S+", self.positive_label + self.negative_label
        ):
            raise ConfigError("positive_label", "labels must differ and contain no spaces")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError("valid_fraction", f"must be in (0, 1), got {self.valid_fraction}")
        for key in ("dim", "epoch", "word_ngrams", "min_count", "bucket", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


def _hash01(seed: int, salt: str, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def read_source(src: TextSource, i: int, key: str, cfg: QualityTrainConfig) -> tuple[list[str], list[dict]]:
    """Texts of one source (all its files) and a fingerprint per file; bad records are counted and logged."""
    files = sorted(Path(p) for p in glob.glob(src.path, recursive=True)) or [Path(src.path)]
    texts, prints = [], []
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{key}[{i}].path", f"no file matches {src.path!r}")
        n = {"records": 0, "texts": 0, "too_short": 0, "bad_records": 0}
        for rec in iter_records(path):
            if isinstance(rec, str):
                n["bad_records"] += 1
                log.warning("skipped %s", rec)
                continue
            n["records"] += 1
            for text in field_texts(rec, src.fields):
                if len(text) < cfg.min_chars:
                    n["too_short"] += 1
                    continue
                n["texts"] += 1
                texts.append(text)
        if n["records"] and not n["texts"] + n["too_short"]:
            raise ConfigError(f"{key}[{i}].fields", f"no record of {path} has any of {src.fields}")
        prints.append({"file": path.name, "sha256": sha256_file(path), **n})
    if src.max_texts and len(texts) > src.max_texts:
        texts = sorted(texts, key=lambda t: _hash01(cfg.seed, "take", t))[: src.max_texts]
    return texts, prints


def split_texts(pos: list[str], neg: list[str], cfg: QualityTrainConfig) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(label, text)], "valid": [...]}: hash split by text, classes balanced by hash."""
    if cfg.balance:
        n = min(len(pos), len(neg))
        pos, neg = (sorted(t, key=lambda s: _hash01(cfg.seed, "balance", s))[:n] for t in (pos, neg))
    out: dict[str, list[tuple[str, str]]] = {"train": [], "valid": []}
    for label, texts in ((cfg.positive_label, pos), (cfg.negative_label, neg)):
        for text in texts:
            side = "valid" if _hash01(cfg.seed, "valid", text) < cfg.valid_fraction else "train"
            out[side].append((label, text))
    for side in out:  # a fixed, label-mixed order (fastText learns in file order)
        out[side].sort(key=lambda lt: _hash01(cfg.seed, "order", lt[1]))
    return out


def binary_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 (positive class, score >= threshold) and ROC AUC."""
    pred = scores >= threshold
    tp, fp = int(np.sum(pred & truth)), int(np.sum(pred & ~truth))
    fn, tn = int(np.sum(~pred & truth)), int(np.sum(~pred & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1.0  # ties broken by order
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    auc = (
        (ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg else float("nan")
    )
    return {
        "n": len(scores),
        "accuracy": round((tp + tn) / max(len(scores), 1), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "roc_auc": round(float(auc), 4),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def _write_fasttext_file(path: Path, rows: list[tuple[str, str]], max_chars: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for label, text in rows:
            fh.write(f"__label__{label} {model_text(text, max_chars)}\n")


def train_quality_model(cfg: QualityTrainConfig) -> Path:
    """Read, split, train, evaluate and save; returns the model folder."""
    import floret

    sources = {
        key: [read_source(s, i, key, cfg) for i, s in enumerate(getattr(cfg, key))]
        for key in ("positives", "negatives")
    }
    pos = [t for texts, _ in sources["positives"] for t in texts]
    neg = [t for texts, _ in sources["negatives"] for t in texts]
    if min(len(pos), len(neg)) < 10:
        raise DataError(
            f"too little data: {len(pos)} positive and {len(neg)} negative texts (need >= 10 each)"
        )
    split = split_texts(pos, neg, cfg)
    out = Path(cfg.output_root) / cfg.name
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        _write_fasttext_file(tmp / "train.txt", split["train"], cfg.max_chars)
        model = floret.train_supervised(
            input=str(tmp / "train.txt"), dim=cfg.dim, epoch=cfg.epoch, lr=cfg.lr, wordNgrams=cfg.word_ngrams,
            minCount=cfg.min_count, bucket=cfg.bucket, thread=cfg.threads, seed=cfg.seed, verbose=0,
        )  # fmt: skip
        (tmp / "train.txt").unlink()
        model.save_model(str(tmp / MODEL_FILE))
        info = _sidecar(cfg, sources, split, floret.__name__)
        write_json(tmp / SIDECAR, info)  # the scorer reads the labels from it
        info["metrics"] = evaluate(tmp, split["valid"], cfg)
        info["train_seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / SIDECAR, info)
    log.info("quality model %s: held-out %s", out, info["metrics"])
    return out


def evaluate(folder: Path, rows: list[tuple[str, str]], cfg: QualityTrainConfig) -> dict:
    """Held-out metrics of the saved model in `folder`, scored exactly as the filter stage scores."""
    scorer = QualityScorer(folder, max_chars=cfg.max_chars)
    scores = np.array([scorer.score(text) for _, text in rows])
    truth = np.array([label == cfg.positive_label for label, _ in rows], dtype=bool)
    return binary_metrics(scores, truth)


def _sidecar(cfg: QualityTrainConfig, sources: dict, split: dict, library: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        lib_version = version(library)
    except PackageNotFoundError:
        lib_version = "unknown"
    return {
        "model_file": MODEL_FILE,
        "library": library,
        "library_version": lib_version,
        "labels": {"positive": cfg.positive_label, "negative": cfg.negative_label},
        "text": "pipeline.data.quality_model.model_text (units.spaced)",
        "config": to_dict(cfg),
        "data": {key: [p for _, prints in src for p in prints] for key, src in sources.items()},
        "split": {
            side: {
                lab: sum(1 for lb, _ in rows if lb == lab) for lab in (cfg.positive_label, cfg.negative_label)
            }
            for side, rows in split.items()
        },
    }
