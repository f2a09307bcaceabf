"""Sequence classification: reading labelled CSV/TSV/JSONL rows (bad rows counted), label binarizing,
accuracy and macro F1, early-stopping bookkeeping, and two identical short runs (2 ranks, ZeRO-3, one
spawned process group) on the real VADER tweets: the first beats the majority-class macro-F1 by 0.15,
logs the baselines and a report that equals sklearn on its saved predictions, and exports its best
checkpoint; the second repeats it exactly (the new head is seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks
from finetune_helpers import REPO, VADER_TWEETS, ft_init, metrics_rows  # noqa: F401

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.finetune import class_report, classify
from pipeline.finetune.config import ClassifySection, FinetuneConfig
from pipeline.finetune.tasks import build_task
from pipeline.finetune.trainer import load_tokenizer
from pipeline.runtime.early_stop import EarlyStopper

CONFIG = REPO / "configs" / "finetune" / "classify_vader.yaml"


def test_vader_tsv_rows_binarized(raw_samples):
    cfg = ClassifySection(header=False, text_column="2", label_column="1", binarize_at=0.0)
    rows, counts = classify.load_rows(raw_samples / VADER_TWEETS, cfg)
    assert counts == {"label_at_threshold": 4}  # SOURCES.md: 2,897 > 0, 1,299 < 0, 4 == 0
    assert len(rows) == 4196
    assert sum(r.label == "positive" for r in rows) == 2897
    assert rows[0].text.startswith("Somehow I was blessed") and not rows[0].text.endswith("\r")
    assert rows[4].label == "negative" and rows[0].where.endswith(":1")


def test_csv_and_jsonl_rows_count_bad_records(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"good, with comma",pos\n,neg\nno label,\nfine,neg\n')
    rows, counts = classify.load_rows(csv_file, ClassifySection())
    assert [(r.text, r.label) for r in rows] == [("good, with comma", "pos"), ("fine", "neg")]
    assert counts == {"missing_text": 1, "missing_label": 1}
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"t": "a", "y": 1}\n{"t": "b", "y": "x"}\nnot json\n[1]\n')
    cfg = ClassifySection(text_column="t", label_column="y", binarize_at=0.5)
    rows, counts = classify.load_rows(jl, cfg)
    assert [(r.text, r.label) for r in rows] == [("a", "positive")]
    assert counts == {"non_numeric_label": 1, "bad_record": 1, "missing_text": 1}
    with pytest.raises(DataError, match="unknown classification file type"):
        classify.load_rows(_touch(tmp_path / "d.parquet"), ClassifySection())
    with pytest.raises(DataError, match="no usable labelled rows"):
        classify.load_rows(_touch(tmp_path / "e.csv", "text,label\n"), ClassifySection())


def _touch(path: Path, text: str = "x") -> Path:
    path.write_text(text)
    return path


def test_scores_accuracy_and_macro_f1():
    preds = torch.tensor([0, 0, 1, 1, 1, 0])
    labels = torch.tensor([0, 1, 1, 1, -100, 0])  # one ignored row
    conf = classify.confusion(preds, labels, 2)
    assert conf.tolist() == [[2, 0], [1, 2]]
    s = classify.scores(conf)
    assert s["accuracy"] == pytest.approx(4 / 5)
    f1_0, f1_1 = 2 * 2 / (2 * 2 + 1), 2 * 2 / (2 * 2 + 1)  # precision/recall: class 0 2/3,1; class 1 1,2/3
    assert s["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    always_zero = classify.scores(
        classify.confusion(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1]), 2)
    )
    assert always_zero["accuracy"] == 0.75 and always_zero["macro_f1"] == pytest.approx((6 / 7) / 2)


def test_encode_rows_frame_truncate_and_label(ft_tok):
    rows = [
        classify.Row("good movie", "positive"),
        classify.Row("word " * 50, "negative"),
        classify.Row("x", "meh"),
    ]
    enc, counts = classify.encode_rows(ft_tok, rows, ["negative", "positive"], seq_len=16)
    assert counts == {"truncated": 1, "unknown_label": 1}
    assert enc[0].input_ids[0] == ft_tok.bos_token_id and enc[0].input_ids[-1] == ft_tok.eos_token_id
    assert enc[0].label == 1 and enc[1].label == 0 and len(enc[1].input_ids) == 16
    b = classify.collate(enc, 16, ft_tok.pad_token_id)
    assert b["input_ids"].shape == (2, 16) and b["labels"].tolist() == [1, 0]
    assert b["attention_mask"][0].sum() == len(enc[0].input_ids)
    assert classify.collate([], 16, 3)["labels"].tolist() == [-100]


@pytest.fixture(scope="module")
def ft_tok(ft_init):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ft_init)


def test_early_stopper_keeps_best_and_stops():
    s = EarlyStopper("eval_loss", lower_is_better=True, patience=2, min_delta=0.01)
    improved = [s.update(v, k) for k, v in enumerate([3.0, 2.5, 2.495, float("nan")])]
    assert improved == [True, True, False, False]  # within min_delta, and NaN, do not count
    assert s.should_stop and s.best == 2.5 and s.best_step == 1
    up = EarlyStopper("macro_f1", lower_is_better=False, patience=0)
    assert up.update(0.5, 1) and not up.update(0.4, 2) and up.update(0.6, 3) and not up.should_stop
    again = EarlyStopper("eval_loss", lower_is_better=True, patience=2, min_delta=0.01)
    again.restore(s.state())  # what a checkpoint carries: a resumed run judges the next eval alike
    assert again.should_stop and again.best == 2.5 and again.summary() == s.summary()


def test_config_checks(ft_init):  # noqa: F811
    base = [f"init_from={ft_init}"]
    cfg = load_config(FinetuneConfig, CONFIG, base)
    assert cfg.task == "classify" and cfg.classify.binarize_at == 0.0
    assert cfg.train.early_stop_metric == "macro_f1"  # classify's default; sft's is eval_loss
    assert load_config(FinetuneConfig, None, [*base, "task=sft"]).train.early_stop_metric == "eval_loss"
    with pytest.raises(ConfigError, match="classify.head_lr: must be > 0"):
        load_config(FinetuneConfig, CONFIG, [*base, "classify.head_lr=0"])
    with pytest.raises(ConfigError, match="train.early_stop_metric: accuracy needs task classify"):
        load_config(FinetuneConfig, CONFIG, [*base, "task=sft", "train.early_stop_metric=accuracy"])
    with pytest.raises(ConfigError, match="train.patience: early stopping needs evals"):
        load_config(FinetuneConfig, CONFIG, [*base, "train.eval_every=0"])
    with pytest.raises(ConfigError, match="data.pack"):
        load_config(FinetuneConfig, CONFIG, [*base, "data.pack=true"])


VADER_STEPS = 60


def vader_overrides(raw: Path, init: Path, runs: Path, name: str) -> list[str]:
    return [
        f"init_from={init}",
        f"data.path={raw / VADER_TWEETS}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"out={runs / name / 'hf'}",
        "parallel.precision=fp32",
        f"train.max_steps={VADER_STEPS}",
        "train.eval_every=20",
        "train.save_every=0",
        "train.patience=0",
        "train.keep_last=1",
        "train.log_every=5",
    ]


def train_both(rank: int, world_size: int, jobs: list[list[str]], runs: str) -> None:
    """One rank of the process group: each run in turn, as launch/finetune.py runs one (rank 0's log
    to `<runs>/<name>.log`)."""
    import logging

    from pipeline import dist
    from pipeline.finetune.trainer import finetune
    from pipeline.log import setup_logging

    setup_logging("INFO" if rank == 0 else "WARNING")
    for overrides in jobs:
        cfg = load_config(FinetuneConfig, CONFIG, overrides)
        handler = logging.FileHandler(Path(runs) / f"{cfg.run.name}.log")
        logging.getLogger().addHandler(handler)
        try:
            assert finetune(cfg).status == "completed", cfg.run.name
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    dist.shutdown()


@pytest.fixture(scope="module")
def vader_runs(raw_samples, ft_init, tmp_path_factory) -> dict:  # noqa: F811
    """Two runs of one config (2 ranks, ZeRO-3, fp32) on the real VADER tweets, `a` then `b`, in one
    spawned process group (no launcher start-up per run)."""
    runs = tmp_path_factory.mktemp("vader")
    jobs = [vader_overrides(raw_samples, ft_init, runs, name) for name in ("a", "b")]
    run_ranks(train_both, 2, timeout=600, jobs=jobs, runs=str(runs))
    logs = {name: (runs / f"{name}.log").read_text() for name in ("a", "b")}
    return {"runs": runs, "logs": logs, "raw": raw_samples, "init": ft_init}


def event_row(rows: list[dict], event: str) -> dict:
    return next(r for r in rows if r.get("event") == event)


@pytest.mark.slow
@pytest.mark.dist
def test_vader_run_beats_the_baselines_and_exports_its_best(vader_runs):
    """A short run learns: its best eval's macro-F1 beats the majority class's by a margin, the
    baselines are in metrics.jsonl and the summary line, and the export is the best checkpoint."""
    from transformers import AutoModelForSequenceClassification

    run = vader_runs["runs"] / "a"
    rows = metrics_rows(run)
    data, summary = event_row(rows, "data"), event_row(rows, "summary")
    assert data["majority_accuracy"] > 0.6 and data["majority_macro_f1"] < 0.45  # ~2/3 positive
    assert data["tfidf_macro_f1"] > data["majority_macro_f1"] + 0.2  # measured: 0.71 vs 0.41
    evals = [r for r in rows if "macro_f1" in r and "event" not in r]
    best = json.loads((run / "best.json").read_text())
    top = max(evals, key=lambda r: r["macro_f1"])
    assert [e["step"] for e in evals] == [20, 40, 60] and best["metric"] == "macro_f1"  # the default
    assert best["tag"] == f"step_{top['step']}" and summary["checkpoint"] == best["tag"]
    assert summary["macro_f1"] == pytest.approx(top["macro_f1"], abs=1e-12)
    assert summary["macro_f1"] > data["majority_macro_f1"] + 0.15, (evals, data)  # measured: +0.2
    assert summary["beats_majority_by"] == pytest.approx(summary["macro_f1"] - data["majority_macro_f1"])
    assert summary["beats_tfidf_by"] == pytest.approx(summary["macro_f1"] - data["tfidf_macro_f1"])
    want = f"macro-F1 {summary['macro_f1']:.4f}: beats majority by {summary['beats_majority_by']:+.4f}, TF-IDF by"
    assert want in vader_runs["logs"]["a"]
    kept = {p.name for p in (run / "checkpoints").glob("step_*")}
    assert kept == {best["tag"], f"step_{VADER_STEPS}"}  # the best (exported) and the last (to resume)

    # the exported folder, run with plain transformers, predicts what the run saved for that step
    golds, saved = class_report.read_predictions(run / "predictions" / f"{best['tag']}.jsonl")
    cfg = load_config(
        FinetuneConfig, CONFIG, vader_overrides(vader_runs["raw"], vader_runs["init"], run.parent, "a")
    )
    data = build_task(cfg, vader_runs["init"], load_tokenizer(vader_runs["init"]))
    model = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    batch = classify.collate(data.valid, cfg.data.seq_len, data.pad_id)
    with torch.no_grad():
        ids = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert golds == [data.labels[ex.label] for ex in data.valid]
    agree = sum(model.config.id2label[i] == p for i, p in zip(ids.tolist(), saved)) / len(saved)
    assert agree >= 0.995, agree  # fp32 ZeRO-3 and plain fp32 differ only by rounding (near-ties)


@pytest.mark.slow
@pytest.mark.dist
def test_report_equals_sklearn_on_the_saved_predictions(vader_runs):
    """The closing report (text, PNG, summary row) and the eval metrics are sklearn's numbers on the
    run's own saved predictions."""
    from sklearn import metrics

    run = vader_runs["runs"] / "a"
    rows = metrics_rows(run)
    summary = event_row(rows, "summary")
    golds, preds = class_report.read_predictions(run / "predictions" / f"{summary['checkpoint']}.jsonl")
    labels = ["negative", "positive"]
    p, r, f, n = metrics.precision_recall_fscore_support(golds, preds, labels=labels, zero_division=0)
    accuracy = metrics.accuracy_score(golds, preds)
    macro = metrics.f1_score(golds, preds, labels=labels, average="macro", zero_division=0)
    step_eval = next(
        x for x in rows if x.get("step") == summary["step"] and "macro_f1" in x and "event" not in x
    )
    for row in (summary, step_eval):
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert row["macro_f1"] == pytest.approx(macro, abs=1e-12)
    text = (run / "classification_report.txt").read_text()
    for i, name in enumerate(labels):
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        assert line.split()[1:] == [f"{p[i]:.4f}", f"{r[i]:.4f}", f"{f[i]:.4f}", str(n[i])]
    conf = metrics.confusion_matrix(golds, preds, labels=labels)
    table = text.split("columns: predicted)\n")[1].splitlines()[1:]
    assert [list(map(int, x.split()[1:])) for x in table] == conf.tolist()
    assert (run / "classification_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "classification report of " + summary["checkpoint"] in vader_runs["logs"]["a"]


@pytest.mark.slow
@pytest.mark.dist
def test_head_trains_at_its_own_lr(vader_runs):
    """classify.head_lr gives the head (`score`) its own optimizer groups at head_lr/optim.lr times the
    body's scheduled LR, as saved in the last checkpoint (which a resume keeps, engine.py)."""
    cfg = load_config(FinetuneConfig, CONFIG, [f"init_from={vader_runs['init']}"])
    states = sorted(
        (vader_runs["runs"] / "a" / "checkpoints" / f"step_{VADER_STEPS}").glob("*optim_states.pt")
    )
    saved = torch.load(states[0], weights_only=False, map_location="cpu")["optimizer_state_dict"]
    groups = saved["optimizer_state_dict"]["param_groups"]  # ZeRO-3's wrapper around torch's state
    scale = cfg.classify.head_lr / cfg.optim.lr
    assert sorted({g["lr_scale"] for g in groups}) == [1.0, pytest.approx(scale)]
    body = {g["lr"] for g in groups if g["lr_scale"] == 1.0}
    assert len(body) == 1 and all(
        g["lr"] == pytest.approx(scale * min(body)) for g in groups if g["lr_scale"] != 1.0
    )


@pytest.mark.slow
@pytest.mark.dist
def test_two_runs_of_one_config_are_identical(vader_runs):
    """The new head is drawn from the run's seed on every rank: two runs (2 ranks, ZeRO-3) give the
    same losses, metrics and predictions, from the first step on."""
    a, b = (vader_runs["runs"] / name for name in ("a", "b"))
    keys = ("loss", "grad_norm", "lr", "eval_loss", "accuracy", "macro_f1")
    for key in keys:
        want = {r["step"]: r[key] for r in metrics_rows(a) if key in r and "event" not in r}
        assert want and want == {r["step"]: r[key] for r in metrics_rows(b) if key in r and "event" not in r}

    def events(run):  # a checkpoint row's save_s is wall time, the one thing allowed to differ
        return [{k: v for k, v in r.items() if k != "save_s"} for r in metrics_rows(run) if "event" in r]

    assert events(a) == events(b)
    for path in sorted((a / "predictions").iterdir()):
        assert path.read_bytes() == (b / "predictions" / path.name).read_bytes()
    assert "initialised new parameters ['score.weight'] from seed 1234" in vader_runs["logs"]["a"]


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_every_registered_task_builds_and_batches_by_step(task, ft_init, ft_tok, tmp_path):  # noqa: F811
    """Each task of the registry, built as the trainer builds it: its data row, batches that are a
    function of the step alone (a slice per rank of one global batch), and the step's samples."""
    from pipeline.finetune.tasks import TASKS, build_task

    assert set(TASKS) >= {"sft", "classify"}
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    path = data if task == "classify" else REPO / "tests/data/sample/instructions.jsonl"
    cfg = load_config(
        FinetuneConfig,
        None,
        [f"init_from={ft_init}", f"task={task}", f"data.path={path}", "data.seq_len=32"]
        + ["batch.global_size=4", "batch.micro_size=1"]
        + (["train.early_stop_metric=accuracy"] if task == "classify" else []),
    )
    t = build_task(cfg, ft_init, ft_tok)
    assert t.info["train_examples"] == len(t.train) and t.init_dir == ft_init and len(t.fingerprint) == 64
    whole = t.micro_batches(3, 0, 1)  # one rank: the global batch of step 3
    halves = t.micro_batches(3, 0, 2) + t.micro_batches(3, 1, 2)  # two ranks: a slice each
    assert len(whole) == 4 and sorted(len(h["input_ids"]) for h in halves) == [1, 1, 1, 1]
    key = lambda b: b["input_ids"].tolist()  # noqa: E731
    assert sorted(map(key, halves)) == sorted(map(key, whole))
    assert len(t.step_samples(3)) == 4 and t.step_samples(3) == t.step_samples(3)
    assert sum(t.count_targets(b) for b in whole) > 0
