"""The learned quality filter: training (pipeline/data/quality_train.py) on real positives and
negatives, scoring and keeping (pipeline/data/quality_model.py), and the job-wide cut."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import assert_accounting

from pipeline.data.document import Document
from pipeline.data.quality_model import (
    QualityModelConfig,
    QualityModelFilter,
    QualityScorer,
    top_fraction_threshold,
)
from pipeline.data.quality_train import QualityTrainConfig, TextSource, binary_metrics, train_quality_model
from pipeline.errors import ConfigError
from pipeline.io import sha256_file


def train_cfg(raw: Path, out: Path, **kw) -> QualityTrainConfig:
    """Instruction answers (English and Chinese) against raw web text, a few hundred of each."""
    web = raw / "web"
    return QualityTrainConfig(
        name="q",
        output_root=out,
        positives=[
            TextSource(str(raw / "sft" / "alpaca_en_demo.json"), ["output"], max_texts=200),
            TextSource(str(raw / "sft" / "alpaca_zh_demo.json"), ["output"], max_texts=100),
        ],
        negatives=[
            TextSource(
                str(web / "CC-MAIN-20190717121559-20190717143559-00140.dolma.jsonl.gz"), max_texts=200
            ),
            TextSource(str(web / "oscar-2201-multilingual-sample.jsonl.zst"), ["content"]),
            TextSource(str(web / "c4-en-sample.jsonl"), max_texts=60),
        ],
        epoch=10,
        lr=0.5,
        bucket=20_000,
        dim=16,
        max_chars=1000,  # the model reads the head of each text: 4x less training work
        **kw,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, raw_samples) -> Path:
    return train_quality_model(train_cfg(raw_samples, tmp_path_factory.mktemp("models")))


def test_training_reports_held_out_metrics_and_fingerprints_and_is_reproducible(
    model_dir, raw_samples, tmp_path
):
    info = json.loads((model_dir / "quality_model.json").read_text())
    metrics = info["metrics"]
    assert metrics["n"] == sum(info["split"]["valid"].values()) > 30
    # many "negatives" are Wikipedia pages in other languages (the Dolma sample): accuracy stays modest
    assert metrics["accuracy"] > 0.7 and metrics["f1"] > 0.75 and metrics["roc_auc"] > 0.85
    assert info["library"] == "floret" and info["labels"] == {"positive": "hq", "negative": "lq"}
    files = {p["file"]: p for p in info["data"]["positives"] + info["data"]["negatives"]}
    zh = files["alpaca_zh_demo.json"]
    assert zh["sha256"] == sha256_file(raw_samples / "sft" / "alpaca_zh_demo.json") and zh["records"] == 1000
    assert info["config"]["epoch"] == 10
    again = train_quality_model(train_cfg(raw_samples, tmp_path))  # one thread + seed: the same model
    assert sha256_file(again / "model.bin") == sha256_file(model_dir / "model.bin")


def test_filter_writes_scores_and_keeps_by_threshold_and_skips_sources(model_dir):
    docs = [
        Document(
            "a",
            "Photosynthesis is the process by which green plants turn light into chemical energy. " * 3,
            "web",
        ),
        Document("b", "光合作用是植物利用光能把二氧化碳和水转化为有机物并释放氧气的过程。" * 3, "web"),
        Document(
            "c", "Login | Register | Cart (0) | Home » Shop » Sale!!! Best prices click here " * 3, "web"
        ),
        Document("d", "Login | Register | Cart (0) | Home » Shop » Sale!!! " * 3, "wikipedia"),
    ]
    cfg = QualityModelConfig(
        enabled=True, model=model_dir, keep="threshold", threshold=0.5, skip_sources=["wikipedia"]
    )
    kept, counts = QualityModelFilter(cfg).process(docs)
    assert_accounting(docs, kept, counts)
    assert [d.id for d in kept] == ["a", "b", "d"] and counts.dropped == {"low_quality": 1}
    assert kept[0].meta["scores"]["quality"] > 0.5 and "scores" not in kept[2].meta


def test_a_bare_fasttext_file_is_read_with_fasttext_and_labels_are_checked():
    from pipeline.data.langid import bundled_model_path

    lid = bundled_model_path()  # a real fastText model file, here as a 176-label "quality" model
    scorer = QualityScorer(lid, positive_label="zh")
    assert (
        scorer.score("数学是研究数量、结构以及空间等概念的一门学科。")
        > 0.9
        > scorer.score("The cat sat on the mat.")
    )
    with pytest.raises(ConfigError, match="not __label__hq"):
        QualityScorer(lid, positive_label="hq")
    with pytest.raises(ConfigError, match="model"):
        QualityModelConfig(enabled=True).validate()


def test_top_fraction_cut_is_exact_keeps_ties_and_ignores_sharding():
    rng = random.Random(0)
    scores = [rng.randrange(0, 1_000_001) for _ in range(5000)] + [700_000] * 50
    shards_a = [_counts(scores[i::3]) for i in range(3)]
    shards_b = [_counts(scores[:10]), _counts(scores[10:])]
    cut, info = top_fraction_threshold(shards_a, 0.3)
    assert (cut, info) == top_fraction_threshold(reversed(shards_b), 0.3)
    kept = sum(s >= cut * 1_000_000 for s in scores)
    assert info["kept"] == kept >= info["target"] == 1515 and kept - 1515 < 50  # ties at the cut all kept
    assert top_fraction_threshold([_counts([5] * 10)], 0.1)[1]["kept"] == 10  # one score: all tie


def _counts(scores: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in scores:
        out[s] = out.get(s, 0) + 1
    return out


def test_binary_metrics_by_hand():
    import numpy as np

    m = binary_metrics(np.array([0.9, 0.8, 0.3, 0.6, 0.1]), np.array([True, True, True, False, False]))
    assert m["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1} and m["f1"] == pytest.approx(
        2 / 3, abs=1e-4
    )
    assert m["roc_auc"] == pytest.approx(5 / 6, abs=1e-4)  # 5 of 6 (positive, negative) pairs ordered


def test_shipped_configs_load():
    from pipeline.config import load_config
    from pipeline.data.config import DataConfig

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(QualityTrainConfig, repo / "configs" / "quality" / "sample.yaml")
    assert cfg.positives[2].fields == ["instances.output"] and cfg.threads == 1
    data = load_config(
        DataConfig, repo / "configs" / "data" / "all_samples.yaml", ["quality_model.enabled=true"]
    )
    assert data.quality_model.keep == "top_fraction" and data.decontam.eval_sets[0].name == "self_instruct"
