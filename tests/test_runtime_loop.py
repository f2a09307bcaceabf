"""Pure pieces of the training loop: the background batch fetch, the early-stopping metric check,
the loop settings. (The loop itself runs in test_train_pretrain, test_train_faults and
test_finetune_run.)"""

from __future__ import annotations

import threading

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.runtime.config import LoopConfig
from pipeline.runtime.loop import Prefetcher, _stopper
from pipeline.runtime.task import Task


class Steps(Task):
    """Batches that name their step and rank; records which thread fetched what."""

    name = "steps"
    metric_modes = {"eval_loss": "min", "accuracy": "max"}

    def __init__(self):
        self.fetched: list[tuple[int, str]] = []

    def micro_batches(self, step, dp_rank, dp_size):
        self.fetched.append((step, threading.current_thread().name))
        return [{"step": step, "rank": dp_rank, "of": dp_size}]


def test_prefetcher_hands_out_exactly_the_step_asked_for():
    task = Steps()
    pf = Prefetcher(task, dp_rank=1, dp_size=2)
    try:
        assert pf.get(0) == [{"step": 0, "rank": 1, "of": 2}]
        assert pf.get(1) == [{"step": 1, "rank": 1, "of": 2}]  # the one fetched ahead
        assert pf.get(7) == [{"step": 7, "rank": 1, "of": 2}]  # not the one fetched ahead (2): fetched now
    finally:
        pf.close()
    by = {s: thread for s, thread in task.fetched}
    assert by[0] == by[7] == threading.main_thread().name  # nothing fetched ahead for them
    assert by[1].startswith("gristmill-prefetch")  # step 1 came from the background fetch


def test_early_stop_metric_must_be_one_of_the_tasks():
    assert _stopper(LoopConfig(), Steps()) is None
    up = _stopper(LoopConfig(early_stop_metric="accuracy", patience=2, eval_every=5), Steps())
    assert up.metric == "accuracy" and not up.lower_is_better and up.patience == 2
    with pytest.raises(ConfigError, match="train.early_stop_metric.*macro_f1.*not a metric of task steps"):
        _stopper(LoopConfig(early_stop_metric="macro_f1"), Steps())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("spike_window=1", "spike_window: must be 0"),
        ("spike_zscore=0", "spike_zscore: must be > 0"),
        ("patience=2", "patience: early stopping needs a metric"),
        ("keep_last=0", "keep_last: must be >= 1"),
    ],
)
def test_loop_settings_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(LoopConfig, None, [override])
