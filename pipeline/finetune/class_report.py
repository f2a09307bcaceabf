"""Classification report from a run's own predictions: per-class precision, recall, F1 and support,
accuracy, macro-F1 and the confusion matrix, as text for the log and as a PNG beside the run.

Predictions are stored as JSONL, one row per validation example: `{"where", "label", "pred"}` with
class names (not ids), so the file reads on its own. The confusion matrix has true classes as rows
and predicted classes as columns. A class with no true and no predicted examples has precision,
recall and F1 0 (as sklearn's `zero_division=0`), and still counts in the macro mean, as in the
training metrics (pipeline/finetune/classify.py `scores`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.finetune.records import read_text
from pipeline.io import atomic_write


@dataclass(frozen=True)
class ClassReport:
    """Scores of one set of predictions; arrays are indexed by class id (the order of `labels`)."""

    labels: list[str]
    confusion: np.ndarray  # (C, C) int64: row = true class, column = predicted class
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,)
    f1: np.ndarray  # (C,)
    support: np.ndarray  # (C,) true examples per class

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.confusion.sum(), 1))

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Accuracy and macro-F1 as metrics.jsonl keys."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def build_report(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> ClassReport:
    """The report of predicted against true class names; DataError on a name outside `labels`."""
    if len(golds) != len(preds):
        raise DataError(f"{len(golds)} true labels but {len(preds)} predictions")
    ids = {name: i for i, name in enumerate(labels)}
    unknown = sorted({x for x in (*golds, *preds) if x not in ids})
    if unknown:
        raise DataError(f"class names {unknown[:5]} are not among the labels {list(labels)}")
    C = len(labels)
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, ([ids[g] for g in golds], [ids[p] for p in preds]), 1)
    tp = np.diag(conf).astype(np.float64)
    precision, recall = _ratio(tp, conf.sum(0)), _ratio(tp, conf.sum(1))
    f1 = _ratio(2 * tp, conf.sum(0) + conf.sum(1))  # = 2PR / (P + R), and 0 where both are 0
    return ClassReport(list(labels), conf, precision, recall, f1, conf.sum(1))


def format_report(report: ClassReport) -> str:
    """The report as a text table (per class, then accuracy and macro mean) and the confusion matrix."""
    width = max(12, *(len(n) for n in report.labels))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for i, name in enumerate(report.labels):
        p, r, f, n = report.precision[i], report.recall[i], report.f1[i], report.support[i]
        lines.append(f"{name:<{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {n:>9d}")
    total = int(report.support.sum())
    macro = (report.precision.mean(), report.recall.mean(), report.macro_f1)
    lines.append(f"{'macro avg':<{width}} {macro[0]:>9.4f} {macro[1]:>9.4f} {macro[2]:>9.4f} {total:>9d}")
    lines.append(f"{'accuracy':<{width}} {'':>9} {'':>9} {report.accuracy:>9.4f} {total:>9d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cell = max(7, width)
    lines.append(" " * cell + "".join(f"{n[:cell]:>{cell + 1}}" for n in report.labels))
    for name, row in zip(report.labels, report.confusion):
        lines.append(f"{name[:cell]:<{cell}}" + "".join(f"{int(v):>{cell + 1}d}" for v in row))
    return "\n".join(lines)


def plot_report(report: ClassReport, path: Path, title: str = "") -> Path:
    """Write the confusion matrix and per-class precision/recall/F1 as one PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on ranks or CI
    import matplotlib.pyplot as plt

    C = len(report.labels)
    fig, (ax_conf, ax_bars) = plt.subplots(1, 2, figsize=(6 + 0.6 * C, 3 + 0.4 * C))
    ax_conf.imshow(report.confusion, cmap="Blues")
    dark = report.confusion.max() / 2  # cells darker than this get white numbers
    for (i, j), v in np.ndenumerate(report.confusion):
        color = "white" if v > dark else "black"
        ax_conf.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    ax_conf.set(xticks=range(C), yticks=range(C), xlabel="predicted", ylabel="true", title="confusion")
    ax_conf.set_xticklabels(report.labels, rotation=45, ha="right")
    ax_conf.set_yticklabels(report.labels)
    x = np.arange(C)
    for k, (name, values) in enumerate(
        (("precision", report.precision), ("recall", report.recall), ("f1", report.f1))
    ):
        ax_bars.bar(x + (k - 1) * 0.27, values, 0.27, label=name)
    ax_bars.set(
        xticks=x, ylim=(0, 1), title=f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}"
    )
    ax_bars.set_xticklabels(report.labels, rotation=45, ha="right")
    ax_bars.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


def write_predictions(path: Path, wheres: Sequence[str], golds: Sequence[str], preds: Sequence[str]) -> None:
    """Write one `{"where", "label", "pred"}` JSON line per example, atomically."""
    with atomic_write(path, "w") as fh:
        for where, gold, pred in zip(wheres, golds, preds, strict=True):
            fh.write(json.dumps({"where": where, "label": gold, "pred": pred}, ensure_ascii=False) + "\n")


def read_predictions(path: Path) -> tuple[list[str], list[str]]:
    """(true labels, predicted labels) of a predictions file; DataError naming the line of a bad row."""
    golds, preds = [], []
    for lineno, line in enumerate(read_text(Path(path), "predictions").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            gold, pred = row["label"], row["pred"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno}: not a {{'where', 'label', 'pred'}} JSON object") from None
        golds.append(str(gold))
        preds.append(str(pred))
    return golds, preds


def report_from_predictions(path: Path, labels: Sequence[str]) -> ClassReport:
    """The report of a saved predictions file."""
    return build_report(*read_predictions(path), labels)
