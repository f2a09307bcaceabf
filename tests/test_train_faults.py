"""Failure paths of the training loop: non-finite steps, loss spikes, a crash while writing a
checkpoint, fp16 loss scaling; plus the pure pieces (fault spec, spike guard, MFU peak table,
checkpoint pruning and compatibility, RNG state).

Runs (module scope): `nan` (2 ranks, bf16 ZeRO-3, NaN and a loss spike injected on rank 1 only),
`fp16` (2 ranks, ZeRO-3 fp16 with dynamic loss scaling, emulated on CPUs without fp16 support),
and `crash` (1 process, ZeRO-0 fp32 with a NaN step, killed inside a checkpoint save, then started
again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dist_helpers import CPU_FP16_ENV, REPO, check, make_corpus, run_launcher, run_single

from pipeline.errors import CheckpointError
from pipeline.runtime import checkpoint, telemetry
from pipeline.runtime.checkpoint import TrainerState
from pipeline.runtime.faults import CRASH_EXIT_CODE, NONFINITE_EXIT_CODE, Faults
from pipeline.runtime.guards import SpikeGuard
from pipeline.runtime.metrics import read_metrics

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def test_fault_spec(monkeypatch):
    spec = "nan_steps=3,5;nan_rank=1;crash_save_step=4;step_sleep=0.5;spike_steps=6;spike_scale=50"
    monkeypatch.setenv("GRISTMILL_FAULTS", spec)
    f = Faults.from_env()
    assert (f.nan_steps, f.nan_rank, f.crash_save_step, f.step_sleep) == ({3, 5}, 1, 4, 0.5)
    assert (f.spike_steps, f.spike_scale) == ({6}, 50.0)
    assert f.loss_factor(3) == 1.0  # this process is rank 0, the faults are rank 1's
    f.nan_rank = 0
    assert math.isnan(f.loss_factor(3)) and f.loss_factor(6) == 50.0 and f.loss_factor(4) == 1.0
    monkeypatch.setenv("GRISTMILL_FAULTS", "main_sleep=2.5;main_sleep_at=init_export,export")
    f = Faults.from_env()
    assert (f.main_sleep, f.main_sleep_at) == (2.5, {"init_export", "export"})
    monkeypatch.setenv("GRISTMILL_FAULTS", "explode=1")
    with pytest.raises(ValueError, match="explode"):
        Faults.from_env()


def test_spike_guard_judges_only_a_full_window_and_survives_a_restore():
    g = SpikeGuard(window=4, zscore=6.0)
    for loss in (5.0, 4.9, 5.1, 4.8):
        assert not g.is_loss_spike(loss)  # window not yet full: never judged
        g.record_loss(loss, spike=False)
    assert not g.is_loss_spike(5.2) and not g.is_loss_spike(3.0)  # a lower loss is never a spike
    assert g.is_loss_spike(50.0)
    g.record_loss(50.0, spike=True)  # counted, kept out of the window
    assert g.loss_spikes == 1 and g.losses == [5.0, 4.9, 5.1, 4.8]
    g.record_loss(float("nan"), spike=False)  # non-finite steps never enter the window
    assert g.losses == [5.0, 4.9, 5.1, 4.8]
    for norm in (1.0, 1.1, 0.9, 1.0):
        assert not g.check_grad_norm(norm)
    assert g.check_grad_norm(100.0) and g.grad_norm_spikes == 1 and not g.check_grad_norm(None)
    same = SpikeGuard(window=4, zscore=6.0)
    same.restore(json.loads(json.dumps(g.state())))  # what a checkpoint's trainer state carries
    assert same.state() == g.state() and same.is_loss_spike(50.0)
    flat = SpikeGuard(window=2)
    flat.record_loss(2.0, False)
    flat.record_loss(2.0, False)
    assert flat.is_loss_spike(2.1) and not flat.is_loss_spike(2.0)  # a flat window still has a band
    assert not SpikeGuard(window=0).is_loss_spike(1e9)  # off


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random()) == want


def test_peak_table_and_mfu():
    assert telemetry.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert telemetry.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert telemetry.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5  # FP32, not TF32
    assert telemetry.peak_tflops("NVIDIA V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta
    assert telemetry.peak_tflops("cpu", "bf16") is None and telemetry.mfu(1.0, None) == "n/a"
    assert telemetry.peak_tflops("cpu", "bf16", override=2.0) == 2.0
    assert telemetry.mfu(98.9, 989.0) == pytest.approx(0.1)


def test_prune_keeps_last_k_and_universal_copies(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8):
        (root / f"step_{s}").mkdir(parents=True)
    (root / "universal_step_2").mkdir()
    (root / "universal_step_6").mkdir()
    (root / "latest").write_text("step_6\n")  # step_8 is unfinished (latest never moved to it)
    checkpoint.prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_4", "step_6", "universal_step_6"]


def test_stale_temp_folders_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_4").mkdir(parents=True)
    (root / "step_2").mkdir()
    assert checkpoint.clean_stale(tmp_path) == 1
    assert [p.name for p in root.iterdir()] == ["step_2"]


def test_what_cannot_change_on_resume(tmp_path):
    saved = TrainerState(manifest_fingerprint="a" * 64, global_batch=8, seq_len=128, tp_size=1)
    ok = {"fingerprint": "a" * 64, "global_batch": 8, "seq_len": 128, "tp_size": 1, "where": tmp_path}
    checkpoint.check_compatible(saved, **ok)
    for key, change in (
        ("batch.global_size", {"global_batch": 16}),
        ("data.seq_len", {"seq_len": 64}),
        ("parallel.tp_size", {"tp_size": 2}),
    ):
        with pytest.raises(CheckpointError, match=key):
            checkpoint.check_compatible(saved, **{**ok, **change})
    with pytest.raises(CheckpointError, match="fingerprint"):
        checkpoint.check_compatible(saved, **{**ok, "fingerprint": "b" * 64})


# ----------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus: Path, runs: Path, name: str, max_steps: int, *extra: str) -> list[str]:
    return [
        "launch/pretrain.py",
        "--config",
        str(TINY_CPU),
        f"data.tokens={corpus}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"train.max_steps={max_steps}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "optim.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.slow
@pytest.mark.dist
def test_nan_and_spike_on_one_rank_are_skipped_then_nans_stop_the_run(corpus, runs):
    faults = {"GRISTMILL_FAULTS": "nan_steps=3,7,8;spike_steps=5;spike_scale=1000;nan_rank=1"}
    extra = (
        "parallel.precision=bf16",
        "train.max_nonfinite=2",
        "train.save_every=4",
        "train.spike_window=3",
        "train.spike_skip=true",
    )
    check(run_launcher(args(corpus, runs, "nan", 10, *extra), env=faults), NONFINITE_EXIT_CODE)
    run = runs / "nan"
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert rows[3]["loss"] is None and rows[3]["skipped_nonfinite"] == 1  # skipped on every rank
    # step 5's loss is ~500x the window's (steps 1, 2, 4): judged a spike before the update, skipped
    assert rows[4]["spikes_loss"] == 0 and rows[5]["spikes_loss"] == 1 and rows[5]["skipped_spikes"] == 1
    assert rows[5]["loss"] is None and rows[5]["skipped_nonfinite"] == 1  # not a non-finite step
    assert rows[6]["loss"] < rows[1]["loss"] - 0.2  # bf16 ZeRO-3 learns on
    assert max(rows) == 8 and rows[8]["skipped_nonfinite"] == 3
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped_nonfinite" and status["exit_code"] == NONFINITE_EXIT_CODE
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_8"
    state = json.loads((run / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    assert state["nonfinite_skips"] == 3 and state["spike_skips"] == 1 and state["consumed_samples"] == 8 * 8
    assert state["spike"]["loss_spikes"] == 1 and len(state["spike"]["losses"]) == 3  # steps 2, 4, 6
    bad = json.loads((run / "nonfinite_samples.json").read_text())
    assert [b["step"] for b in bad["steps"]] == [7, 8] and [b["step"] for b in bad["all"]] == [3, 7, 8]
    assert bad["steps"][0]["global_samples"] == [48, 56] and len(bad["steps"][0]["sample_indices"]) == 8


@pytest.mark.slow
@pytest.mark.dist
def test_fp16_dynamic_loss_scaling(corpus, runs):
    extra = (
        "parallel.precision=fp16",
        "parallel.fp16_initial_scale_power=20",
        "parallel.fp16_hysteresis=1",
        "train.save_every=0",
    )
    check(run_launcher(args(corpus, runs, "fp16", 8, *extra), env=CPU_FP16_ENV))
    rows = [r for r in read_metrics(runs / "fp16") if "loss" in r]
    skips = rows[-1]["skipped_loss_scale"]
    assert skips >= 1 and rows[-1]["skipped_nonfinite"] == 0  # overflows are the scaler's, not NaN skips
    assert rows[-1]["loss_scale"] == 2.0 ** (20 - skips)  # halved once per overflow (hysteresis 1)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    state = json.loads((runs / "fp16" / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    assert state["loss_scale"] == rows[-1]["loss_scale"] and state["loss_scale_skips"] == skips


@pytest.mark.slow
@pytest.mark.dist
def test_crash_while_saving_leaves_latest_valid(corpus, runs):
    """ZeRO-0 fp32 (no overflow check in DeepSpeed): a NaN step is skipped before the update, and a
    crash inside a save leaves `latest` on the previous checkpoint, from which the redo is exact."""
    base = args(
        corpus,
        runs,
        "crash",
        4,
        "parallel.precision=fp32",
        "parallel.zero_stage=0",
        "train.save_every=2",
        "optim.schedule_steps=4",
    )
    check(run_single(base, env={"GRISTMILL_FAULTS": "nan_steps=3;crash_save_step=4"}), CRASH_EXIT_CODE)
    root = runs / "crash" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_2"
    assert (root / ".tmp-step_4").is_dir() and not (root / "step_4").exists()
    proc = run_single(base, env={"GRISTMILL_FAULTS": "nan_steps=3"})
    check(proc)
    assert "resumed from step_2" in proc.stderr
    assert (root / "latest").read_text().strip() == "step_4" and not (root / ".tmp-step_4").exists()
    rows = [r for r in read_metrics(runs / "crash") if "loss" in r]  # appended across both attempts
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]
    assert [r["loss"] for r in rows[2:4]] == [r["loss"] for r in rows[4:]]  # the redo is exact
    assert rows[2]["loss"] is None and rows[3]["loss"] < rows[1]["loss"]  # step 3 skipped, weights intact


@pytest.mark.slow
@pytest.mark.dist
def test_a_zero0_checkpoint_exports(runs, tmp_path):
    """ZeRO-0 writes no optimizer partitions (DeepSpeed's converters refuse it); the export reads the
    module's weights and checks them against the recorded logits."""
    from safetensors.torch import load_file

    from pipeline.train.export import export_hf

    out = export_hf(runs / "crash", tmp_path / "hf")  # the crash test's run (ZeRO-0 fp32)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


@pytest.mark.slow
def test_a_startup_error_is_in_status_json_before_any_engine(corpus, runs, tmp_path):
    """A shard whose bytes changed fails the checksum before the engine and model exist."""
    import shutil

    bad = tmp_path / "tokens"
    shutil.copytree(corpus, bad)
    shard = bad / "train_1.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_single(args(bad, runs, "badsum", 2))
    assert proc.returncode == 1 and "train_1" in proc.stderr, proc.stderr[-3000:]
    status = json.loads((runs / "badsum" / "status.json").read_text())
    assert status["status"] == "failed" and "DataError" in status["error"] and "train_1" in status["error"]
    assert not (runs / "badsum" / "layout.json").exists()  # written once the engine is built: never reached
