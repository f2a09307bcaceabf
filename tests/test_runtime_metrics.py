"""The metrics sink: metrics.jsonl rows, and an offline Weights & Biases run when configured."""

from __future__ import annotations

import pytest

from pipeline.runtime.metrics import MetricsWriter, read_metrics


def test_rows_are_jsonl_with_non_finite_as_null(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write({"step": 1, "loss": 2.5})
    w.write({"step": 2, "loss": float("nan")})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None}]


def test_wandb_offline_run_in_the_run_dir_and_resumed_under_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = {"project": "gristmill-test", "mode": "offline", "name": "t", "config": {"lr": 1e-3}}
    ids = []
    for start in (1, 3):
        w = MetricsWriter(tmp_path, tensorboard=False, wandb=settings)
        ids.append(w._wandb.id)
        for step in (start, start + 1):
            w.write({"step": step, "loss": 3.0 / step, "note": "text is not logged"})
        w.close()
    assert ids[0] == ids[1]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(any(r.glob("*.wandb")) for r in runs)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
