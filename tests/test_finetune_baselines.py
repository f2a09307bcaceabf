"""Classification baselines and report (issue 20): the report's numbers equal sklearn.metrics on the
same saved predictions, text and PNG are written; the majority and TF-IDF baselines on Chinese text
(no spaces) and on the real VADER tweets; the seeded initialisation of a new head."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from finetune_helpers import tiny_llama

from pipeline.errors import DataError
from pipeline.finetune import baselines, class_report
from pipeline.finetune.heads import init_new_parameters

LABELS = ["negative", "neutral", "positive", "unused"]  # "unused": never true, never predicted


def test_report_from_saved_predictions_equals_sklearn(tmp_path):
    from sklearn import metrics

    rng = random.Random(0)
    golds = [rng.choice(LABELS[:3]) for _ in range(300)]
    preds = [g if rng.random() < 0.6 else rng.choice(LABELS[:2]) for g in golds]  # "positive" under-predicted
    path = tmp_path / "predictions.jsonl"
    class_report.write_predictions(path, [f"valid:{i}" for i in range(300)], golds, preds)
    report = class_report.report_from_predictions(path, LABELS)

    p, r, f, n = metrics.precision_recall_fscore_support(golds, preds, labels=LABELS, zero_division=0)
    np.testing.assert_allclose(report.precision, p, atol=1e-12)
    np.testing.assert_allclose(report.recall, r, atol=1e-12)
    np.testing.assert_allclose(report.f1, f, atol=1e-12)
    np.testing.assert_array_equal(report.support, n)
    np.testing.assert_array_equal(report.confusion, metrics.confusion_matrix(golds, preds, labels=LABELS))
    assert report.accuracy == pytest.approx(metrics.accuracy_score(golds, preds), abs=1e-12)
    macro = metrics.f1_score(golds, preds, labels=LABELS, average="macro", zero_division=0)
    assert report.macro_f1 == pytest.approx(macro, abs=1e-12)

    text = class_report.format_report(report)
    assert f"{report.f1[2]:.4f}" in text and f"{report.accuracy:.4f}" in text
    conf_rows = text.split("columns: predicted)\n")[1].splitlines()[1:]
    assert [list(map(int, row.split()[1:])) for row in conf_rows] == report.confusion.tolist()
    png = class_report.plot_report(report, tmp_path / "classification_report.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_prediction_rows_and_unknown_classes_are_data_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"label": "a", "pred": "b"}) + "\n" + json.dumps({"label": "a"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: not a"):
        class_report.read_predictions(path)
    with pytest.raises(DataError, match=r"\['c'\] are not among the labels"):
        class_report.build_report(["a", "c"], ["a", "b"], ["a", "b"])


def test_majority_baseline():
    from sklearn import metrics

    train = ["pos"] * 5 + ["neg"] * 5 + ["neu"] * 2  # a tie: sorted order decides, run after run
    assert baselines.majority_class(train) == "neg"
    valid = ["pos"] * 6 + ["neg"] * 3 + ["neu"]
    report = baselines.majority_baseline(train, valid, ["neg", "neu", "pos"])
    assert report.accuracy == pytest.approx(0.3)  # the share of "neg" in the valid split
    want = metrics.f1_score(
        valid, ["neg"] * 10, labels=["neg", "neu", "pos"], average="macro", zero_division=0
    )
    assert report.macro_f1 == pytest.approx(want) == pytest.approx((2 * 0.3 / 1.3) / 3)


def chinese_reviews(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Unsegmented Chinese reviews: the sentiment phrase decides the label, subjects are noise."""
    rng = random.Random(seed)
    subjects = ["这家餐厅", "这部电影", "这本书", "这个手机", "酒店的服务", "快递", "这件衣服", "老师的课"]
    good = ["非常好，我很喜欢", "太棒了，值得推荐", "质量很好，满意", "让人开心，还会再来"]
    bad = ["太差了，很失望", "质量糟糕，不推荐", "让人生气，浪费钱", "很难用，后悔了"]
    texts, labels = [], []
    for _ in range(n):
        positive = rng.random() < 0.35  # imbalanced: negative is the majority
        texts.append(rng.choice(subjects) + rng.choice(good if positive else bad) + "。")
        labels.append("positive" if positive else "negative")
    return texts, labels


def test_tfidf_reads_chinese_without_spaces():
    train_x, train_y = chinese_reviews(200, seed=0)
    valid_x, valid_y = chinese_reviews(60, seed=1)
    m = baselines.baseline_metrics(train_x, train_y, valid_x, valid_y, ["negative", "positive"])
    assert m["tfidf_accuracy"] >= 0.95 and m["tfidf_macro_f1"] >= 0.95
    assert m["majority_accuracy"] == pytest.approx(valid_y.count("negative") / 60)
    assert m["tfidf_macro_f1"] > m["majority_macro_f1"] + 0.4
    assert "beats majority by +0." in baselines.verdict(0.7, m)


def test_baselines_on_real_vader_tweets(raw_samples):
    """The split the run uses; the TF-IDF numbers are sklearn's own on the same predictions."""
    from sklearn import metrics

    from pipeline.finetune.classify import load_rows
    from pipeline.finetune.config import ClassifySection
    from pipeline.finetune.records import split_examples

    cfg = ClassifySection(header=False, text_column="2", label_column="1", binarize_at=0.0)
    rows, _ = load_rows(raw_samples / "sft" / "classification" / "vader-tweets_GroundTruth.tsv", cfg)
    train, valid = split_examples(rows[:2000], 0.15, seed=1234, key=lambda r: r.text)
    labels = ["negative", "positive"]
    preds = baselines.tfidf_predictions(
        [r.text for r in train], [r.label for r in train], [r.text for r in valid]
    )
    golds = [r.label for r in valid]
    report = class_report.build_report(golds, preds, labels)
    assert report.macro_f1 == pytest.approx(metrics.f1_score(golds, preds, average="macro"), abs=1e-12)
    majority = baselines.majority_baseline([r.label for r in train], golds, labels)
    assert majority.accuracy > 0.6 and majority.macro_f1 < 0.45  # imbalanced: ~2/3 positive
    assert report.macro_f1 > majority.macro_f1 + 0.25 and report.accuracy > majority.accuracy


def test_new_head_init_is_seeded_and_ignores_global_rng(tmp_path):
    """A causal LM loaded as a classifier: transformers reports `score.weight` missing and draws it from
    the global RNG; after init_new_parameters it depends on the seed only."""
    from transformers import AutoModelForSequenceClassification

    tiny_llama("sft").save_pretrained(tmp_path / "lm")

    def classifier(global_seed: int, seed: int, names_reversed: bool = False):
        torch.manual_seed(global_seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "lm", num_labels=3, output_loading_info=True
        )
        names = list(info["missing_keys"])
        assert names == ["score.weight"]
        init_new_parameters(model, reversed(names) if names_reversed else names, seed=seed)
        return model.score.weight.detach().clone(), model.model.layers[0].mlp.up_proj.weight.detach().clone()

    head, body = classifier(global_seed=1, seed=7)
    head2, body2 = classifier(global_seed=2, seed=7, names_reversed=True)
    assert torch.equal(head, head2) and torch.equal(body, body2)
    assert not torch.equal(head, classifier(global_seed=1, seed=8)[0])
    assert head.std().item() == pytest.approx(0.02, rel=0.25)  # config.initializer_range
