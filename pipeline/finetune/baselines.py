"""Baselines a fine-tuned classifier must beat, fitted on the run's train split and scored on its
valid split: always predicting the majority class, and TF-IDF + logistic regression (scikit-learn).

TF-IDF reads character n-grams inside whitespace-delimited chunks (`char_wb`, 1 to 4 characters by
default), so it needs no word segmenter: Chinese or Japanese text, which has no spaces, yields the
n-grams of each run of characters, and English yields sub-word pieces robust to typos and
inflection. Logistic regression weighs classes by inverse frequency (`class_weight="balanced"`),
because the comparison is made in macro-F1, which an imbalanced split otherwise hands to the
majority class. Both are scored by class_report.py, the same arithmetic as the model's report.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from pipeline.errors import DataError
from pipeline.finetune.class_report import ClassReport, build_report

log = logging.getLogger(__name__)


def majority_class(train_labels: Sequence[str]) -> str:
    """The most frequent training label (ties: the first in sorted order, so runs agree)."""
    if not train_labels:
        raise DataError("the training split has no labelled examples")
    counts = Counter(train_labels)
    return min(counts, key=lambda name: (-counts[name], name))


def majority_baseline(
    train_labels: Sequence[str], valid_labels: Sequence[str], labels: Sequence[str]
) -> ClassReport:
    """Report of always predicting the training split's majority class on the valid split; its
    accuracy is that class's share of the valid split."""
    guess = majority_class(train_labels)
    return build_report(valid_labels, [guess] * len(valid_labels), labels)


def tfidf_predictions(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    valid_texts: Sequence[str],
    *,
    ngram_range: tuple[int, int] = (1, 4),
    max_features: int | None = 200_000,
    seed: int = 0,
) -> list[str]:
    """Predicted labels of `valid_texts` by TF-IDF character n-grams + logistic regression fitted on
    the training texts (deterministic for a seed)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if len(set(train_labels)) < 2:
        raise DataError(f"TF-IDF baseline: the training split has one class {sorted(set(train_labels))}")
    vectorizer = TfidfVectorizer(
        analyzer="char_wb", ngram_range=ngram_range, sublinear_tf=True, max_features=max_features
    )
    features = vectorizer.fit_transform(train_texts)
    # liblinear: deterministic, and fast on sparse features with few classes (one-vs-rest)
    model = LogisticRegression(solver="liblinear", class_weight="balanced", max_iter=1000, random_state=seed)
    model.fit(features, list(train_labels))
    return [str(p) for p in model.predict(vectorizer.transform(valid_texts))]


def baseline_metrics(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    valid_texts: Sequence[str],
    valid_labels: Sequence[str],
    labels: Sequence[str],
    seed: int = 0,
    tfidf: bool = True,
) -> dict[str, float]:
    """The baselines' accuracy and macro-F1 on the valid split, as metrics.jsonl keys
    (`majority_accuracy`, `majority_macro_f1`, and with `tfidf` `tfidf_accuracy`, `tfidf_macro_f1`)."""
    metrics = majority_baseline(train_labels, valid_labels, labels).summary("majority_")
    if tfidf:
        preds = tfidf_predictions(train_texts, train_labels, valid_texts, seed=seed)
        metrics |= build_report(valid_labels, preds, labels).summary("tfidf_")
    log.info(
        "baselines on %d valid examples: %s", len(valid_labels), {k: round(v, 4) for k, v in metrics.items()}
    )
    return metrics


def margins(model_macro_f1: float, metrics: dict[str, float]) -> dict[str, float]:
    """How far the model's macro-F1 is above (negative: below) each baseline in `metrics`."""
    out = {"beats_majority_by": model_macro_f1 - metrics["majority_macro_f1"]}
    if "tfidf_macro_f1" in metrics:
        out["beats_tfidf_by"] = model_macro_f1 - metrics["tfidf_macro_f1"]
    return out


def verdict(model_macro_f1: float, metrics: dict[str, float]) -> str:
    """The closing summary line: how far the model's macro-F1 is above (or below) each baseline."""
    m = margins(model_macro_f1, metrics)
    line = f"macro-F1 {model_macro_f1:.4f}: beats majority by {m['beats_majority_by']:+.4f}"
    if "beats_tfidf_by" in m:
        line += f", TF-IDF by {m['beats_tfidf_by']:+.4f}"
    return line
