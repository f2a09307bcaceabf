"""Sequence classification: labelled texts from CSV/TSV/JSONL, batches, the loss, accuracy and macro F1.

Rows are read with the `classify` config section: a text column and a label column, named (a
header row or JSONL keys) or given as a 0-based index; numeric labels can be split at a threshold
into `negative`/`positive` (the VADER ratings: the mean of ~20 human ratings on -4..+4). Each
text becomes `BOS + text + EOS` (cut to seq_len, EOS kept); the model is transformers'
`LlamaForSequenceClassification`, which reads the logits at the last non-padding token, here
always the EOS. Bad rows are counted by reason and logged with file and line.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError, DataError
from pipeline.finetune.config import ClassifySection
from pipeline.finetune.records import read_text
from pipeline.runtime.engine import IGNORE_INDEX

log = logging.getLogger(__name__)
_MAX_LOGGED = 20
HEAD = "score"
"""The name transformers gives the new classification head of Llama-family models (`score.weight`)."""


@dataclass(frozen=True)
class Row:
    """One labelled text as read (label still a string); `where` is `file:line`."""

    text: str
    label: str
    where: str = ""


@dataclass(frozen=True)
class Labeled:
    """One tokenized text, its class id and where it was read (`file:line`)."""

    input_ids: list[int]
    label: int
    where: str = ""


# ---------------------------------------------------------------- reading


def load_rows(path: Path, cfg: ClassifySection) -> tuple[list[Row], Counter]:
    """Read labelled rows from .csv, .tsv/.tab or .jsonl/.json(l) lines; returns rows and skip counts."""
    path = Path(path)
    text = read_text(path, "classification data")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        raw = _jsonl_rows(path, text)
    elif suffix in (".csv", ".tsv", ".tab"):
        raw = _delimited_rows(path, text, "," if suffix == ".csv" else "\t", cfg.header)
    else:
        raise DataError(f"{path}: unknown classification file type {suffix!r} (use .csv, .tsv or .jsonl)")
    rows, counts, logged = [], Counter(), 0
    for where, rec in raw:
        out = to_row(rec, where, cfg)
        if isinstance(out, str):
            counts[out] += 1
            if logged < _MAX_LOGGED:
                log.warning("%s: skipped row (%s)", where, out)
                logged += 1
        else:
            rows.append(out)
    if not rows:
        raise DataError(f"{path}: no usable labelled rows (skipped: {dict(counts) or 'file is empty'})")
    return rows, counts


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, object]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError:
                out.append((f"{path}:{lineno}", None))
    return out


def _delimited_rows(path: Path, text: str, delimiter: str, header: bool) -> list[tuple[str, object]]:
    """(where, dict or list) per CSV/TSV row; with a header, rows are dicts keyed by column name."""
    lines = text.splitlines()  # also splits the VADER files' CRLF endings
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE  # TSV text keeps its quotes
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    names = None
    out = []
    for lineno, fields in enumerate(reader, 1):
        if not fields:
            continue
        if header and names is None:
            names = fields
            continue
        out.append((f"{path}:{lineno}", dict(zip(names, fields)) if names else fields))
    return out


def _column(rec: object, column: str) -> object:
    """The value of a named or 0-based indexed column; None when the row lacks it."""
    if isinstance(rec, dict):
        if column in rec:
            return rec[column]
        return None
    if isinstance(rec, list) and column.isdigit() and int(column) < len(rec):
        return rec[int(column)]
    return None


def to_row(rec: object, where: str, cfg: ClassifySection) -> Row | str:
    """A Row, or the snake_case reason the record is skipped."""
    if not isinstance(rec, (dict, list)):
        return "bad_record"
    text, label = _column(rec, cfg.text_column), _column(rec, cfg.label_column)
    if not isinstance(text, str) or not text.strip():
        return "missing_text"
    if label is None or (isinstance(label, str) and not label.strip()):
        return "missing_label"
    if cfg.binarize_at is None:
        return Row(text, str(label).strip(), where)
    try:
        value = float(label)
    except (TypeError, ValueError):
        return "non_numeric_label"
    if value == cfg.binarize_at:
        return "label_at_threshold"
    return Row(text, "positive" if value > cfg.binarize_at else "negative", where)


def label_names(cfg: ClassifySection, train: list[Row], where: Path) -> list[str]:
    """Class names in id order: the configured list, else the sorted labels of the training split."""
    names = list(cfg.labels) or sorted({r.label for r in train})
    if len(names) < 2:
        raise DataError(f"{where}: the training split has {len(names)} distinct label(s) {names}; need 2+")
    return names


def encode_rows(tokenizer, rows: list[Row], labels: list[str], seq_len: int) -> tuple[list[Labeled], Counter]:
    """Tokenize rows as BOS + text + EOS (cut to seq_len, keeping EOS); counts `truncated` and
    `unknown_label` (a label the class list lacks: skipped)."""
    if seq_len < 3:
        raise ConfigError("data.seq_len", f"must leave room for BOS, text and EOS, got {seq_len}")
    ids_of = {name: i for i, name in enumerate(labels)}
    out, counts = [], Counter()
    for row in rows:
        if row.label not in ids_of:
            counts["unknown_label"] += 1
            continue
        body = tokenizer.encode(row.text, add_special_tokens=False)
        if len(body) > seq_len - 2:
            counts["truncated"] += 1
            body = body[: seq_len - 2]
        ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        out.append(Labeled(ids, ids_of[row.label], row.where))
    return out, counts


# ---------------------------------------------------------------- batches and metrics


def collate(items: list[Labeled], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids right-padded to the longest item, attention_mask, and (B,) labels.

    An empty list gives one padding row with label -100 (a rank with nothing left to evaluate
    still joins ZeRO-3's collective forward)."""
    if not items:
        items = [Labeled([pad_id], IGNORE_INDEX)]
    T = min(seq_len, max(len(it.input_ids) for it in items))
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, it in enumerate(items):
        input_ids[i, : len(it.input_ids)] = torch.tensor(it.input_ids)
        attention_mask[i, : len(it.input_ids)] = 1
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Examples the loss is taken on (labels not ignored)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts: row = true class, column = predicted; ignored labels skipped."""
    keep = labels != IGNORE_INDEX
    flat = labels[keep] * num_labels + preds[keep]
    return torch.bincount(flat, minlength=num_labels**2).reshape(num_labels, num_labels).double()


def scores(conf: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 (the unweighted mean of per-class F1; a class never predicted nor
    present scores 0) from a confusion matrix."""
    tp = conf.diag()
    total = conf.sum()
    precision_den, recall_den = conf.sum(0), conf.sum(1)
    f1 = torch.where(precision_den + recall_den > 0, 2 * tp / (precision_den + recall_den).clamp(min=1), 0.0)
    return {"accuracy": float(tp.sum() / total.clamp(min=1)), "macro_f1": float(f1.mean())}


def predictions_path(run_dir: Path, tag: str) -> Path:
    """Where the eval at checkpoint tag `step_<N>` saves its predictions (class_report's JSONL)."""
    return Path(run_dir) / "predictions" / f"{tag}.jsonl"
