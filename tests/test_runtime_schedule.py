"""Learning-rate schedule values: warmup, cosine/linear decay to min_lr, constant, past the end."""

from __future__ import annotations

import math

import pytest

from pipeline.runtime.schedule import lr_at, make_lr_fn

BASE = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "total_steps": 110}


def test_warmup_is_linear_and_never_zero():
    assert lr_at(0, **BASE) == pytest.approx(1e-4)
    assert lr_at(4, **BASE) == pytest.approx(5e-4)
    assert lr_at(9, **BASE) == pytest.approx(1e-3)


def test_cosine_endpoints_and_midpoint():
    assert lr_at(10, **BASE) == pytest.approx(1e-3)
    assert lr_at(60, **BASE) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **BASE) == pytest.approx(1e-4)
    assert lr_at(500, **BASE) == pytest.approx(1e-4)  # clamped after the end


def test_linear_and_constant():
    assert lr_at(60, **BASE, schedule="linear") == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert lr_at(80, **BASE, schedule="constant") == pytest.approx(1e-3)


def test_no_warmup_and_lr_fn():
    fn = make_lr_fn({**BASE, "warmup_steps": 0, "schedule": "cosine"})
    assert fn(0) == pytest.approx(1e-3)
    assert fn(0) > fn(50) > fn(109) > 1e-4 - 1e-12


def test_warmup_stable_decay():
    wsd = {**BASE, "schedule": "wsd", "decay_fraction": 0.2}  # 100 post-warmup steps: decay over the last 20
    assert lr_at(10, **wsd) == pytest.approx(1e-3)
    assert lr_at(90, **wsd) == pytest.approx(1e-3)  # still stable at 80% of the span
    assert lr_at(100, **wsd) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert lr_at(110, **wsd) == pytest.approx(1e-4) and lr_at(300, **wsd) == pytest.approx(1e-4)


def test_unknown_schedule():
    with pytest.raises(ValueError):
        lr_at(20, **BASE, schedule="step")
