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
    SCALE,
    UNSCORED,
    QualityModelConfig,
    QualityModelFilter,
    QualityScorer,
    apply_select,
    find_threshold,
    write_scores,
)
from pipeline.data.quality_train import QualityTrainConfig, TextSource, binary_metrics, train_quality_model
from pipeline.errors import ConfigError, DataError
from pipeline.io import read_jsonl_zst, sha256_file, write_jsonl_zst


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
    cfg = QualityModelConfig(enabled=True, model=model_dir, keep="threshold", threshold=0.5)
    kept, counts = QualityModelFilter(cfg, skip_sources=["wikipedia"]).process(docs)
    assert_accounting(docs, kept, counts)
    assert [d.id for d in kept] == ["a", "b", "d"] and counts.dropped == {"low_quality": 1}
    assert counts.noted == {"unscored": 1}
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


def _loop(fn, calls, desc):
    """Job.map without Ray: the same calls, in order."""
    return [fn(*call) for call in calls]


def _score_files(folder: Path, shards: list[list[int]]) -> list[Path]:
    paths = []
    for i, units in enumerate(shards):
        paths.append(folder / f"s{i}.quality.npy")
        write_scores(paths[-1], units)
    return paths


def test_top_fraction_cut_is_exact_keeps_ties_and_ignores_sharding(tmp_path):
    rng = random.Random(0)
    scores = [rng.randrange(0, SCALE + 1) for _ in range(5000)] + [700_000] * 50 + [SCALE] * 7
    both = scores + [UNSCORED] * 30  # skipped sources: never counted, never cut
    a = find_threshold(_loop, _score_files(tmp_path / "a", [both[i::3] for i in range(3)]), 0.3)
    b = find_threshold(_loop, _score_files(tmp_path / "b", [both[:10], both[10:]]), 0.3)
    assert a == b
    target = -(-3 * len(scores) // 10)  # ceil(0.3 x N)
    assert a["threshold"] == sorted(scores, reverse=True)[target - 1]  # the target-th best score
    kept = sum(s >= a["threshold"] for s in scores)
    assert a["scored"] == len(scores) and a["kept"] == kept >= a["target"] == target
    assert sum(a["tenths"]) == len(scores)
    ties = find_threshold(_loop, _score_files(tmp_path / "c", [[700_000] * 10]), 0.1)
    assert ties["kept"] == 10 and ties["threshold"] == 700_000  # one score: all tie, all kept
    assert find_threshold(_loop, _score_files(tmp_path / "d", [[SCALE, 0]]), 0.5)["threshold"] == SCALE


def test_apply_select_keeps_unscored_and_refuses_a_score_file_that_does_not_fit(tmp_path):
    rows = [{"id": str(i), "text": f"doc {i}", "source": "web", "meta": {}} for i in range(4)]
    write_jsonl_zst(tmp_path / "s.jsonl.zst", rows)
    write_scores(tmp_path / "s.quality.npy", [900_000, 100_000, UNSCORED, 500_000])
    args = (
        tmp_path / "s.jsonl.zst",
        tmp_path / "s.quality.npy",
        tmp_path / "out.jsonl.zst",
        tmp_path / "st.json",
    )
    stats = apply_select(*args, 500_000, "h")
    assert [r["id"] for r in read_jsonl_zst(tmp_path / "out.jsonl.zst")] == ["0", "2", "3"]
    assert stats["counts"] == {
        "in": 4, "kept": 3, "dropped": {"below_top_fraction": 1}, "errors": {}, "noted": {"unscored": 1}
    }  # fmt: skip
    assert apply_select(*args, 500_000, "h")["skipped"]  # done with this hash: not redone
    write_scores(tmp_path / "s.quality.npy", [1, 2, 3])
    with pytest.raises(DataError, match="4 documents but .* holds 3 scores"):
        apply_select(*args, 500_000, "other")


def test_binary_metrics_by_hand():
    import numpy as np

    m = binary_metrics(np.array([0.9, 0.8, 0.3, 0.6, 0.1]), np.array([True, True, True, False, False]))
    assert m["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1} and m["f1"] == pytest.approx(
        2 / 3, abs=1e-4
    )
    assert m["roc_auc"] == pytest.approx(5 / 6, abs=1e-4)  # 5 of 6 (positive, negative) pairs ordered


def test_shipped_configs_load(raw_samples, monkeypatch):
    from pipeline.config import load_config
    from pipeline.data.config import DataConfig

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the evaluation set's path is relative to the repo
    cfg = load_config(QualityTrainConfig, repo / "configs" / "quality" / "sample.yaml")
    assert cfg.positives[2].fields == ["instances.output"] and cfg.threads == 1
    path = repo / "configs" / "data" / "all_samples.yaml"
    on = ["filters.quality_model.enabled=true", "filters.decontam.enabled=true"]
    data = load_config(DataConfig, path, [*on, "steps=[clean, dedup, select]"])
    assert data.filters.quality_model.keep == "top_fraction"
    assert data.filters.decontam.eval_sets[0].name == "self_instruct"
    with pytest.raises(ConfigError, match="filters.quality_model.keep: top_fraction .* add it to steps"):
        load_config(DataConfig, path, on)  # the cut needs its step
    with pytest.raises(ConfigError, match="steps: 'select' applies"):
        load_config(DataConfig, path, ["steps=[clean, select]"])
