"""user_errors (pipeline/errors.py): one `error:` line per job, not one per rank."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import REPO

from pipeline import errors
from pipeline.errors import ConfigError, user_errors


def raise_in_user_errors() -> str:
    with pytest.raises(SystemExit) as exc, user_errors():
        raise ConfigError("batch.global_size", "must be divisible", "x.yaml")
    return str(exc.value.code)


def test_rank_zero_or_a_lone_process_reports_at_once(monkeypatch):
    monkeypatch.setattr(errors, "PEER_GRACE_S", 60.0)  # would hang the test if it waited
    monkeypatch.delenv("RANK", raising=False)
    assert raise_in_user_errors() == "error: x.yaml: batch.global_size: must be divisible"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert raise_in_user_errors().startswith("error: x.yaml")


def test_another_rank_reports_its_own_error_after_the_grace(monkeypatch):
    monkeypatch.setattr(errors, "PEER_GRACE_S", 0.05)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert raise_in_user_errors() == "error (rank 3): x.yaml: batch.global_size: must be divisible"


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    return bool(int(status["SigCgt"].strip(), 16) & (1 << (signal.SIGTERM - 1)))


def test_another_rank_ended_by_the_launcher_prints_nothing():
    """What deepspeed's launch.py and torchrun do once rank 0 has failed: TERM to the other ranks.
    The rank holding its error back dies silently, even with a training stop handler installed."""
    code = (
        "import signal\n"
        "from pipeline.errors import ConfigError, user_errors\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"  # what the trainer's stop handler amounts to
        "print('ready', flush=True)\n"
        "with user_errors():\n"
        "    raise ConfigError('batch.global_size', 'must be divisible')\n"
    )
    env = {"RANK": "1", "WORLD_SIZE": "2", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"  # the stop handler is installed
        deadline = time.monotonic() + 10
        while catches_sigterm(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # until user_errors has put TERM back to its default, before the grace sleep
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM and "error" not in err, err
