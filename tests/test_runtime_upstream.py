"""The DeepSpeed behaviours Engine.load works around are still there (and the workarounds still work).

When a DeepSpeed upgrade fixes one, its assertion here fails: delete that workaround in
pipeline/runtime/engine.py (Engine.load, whose comments link the upstream change) and this check.
One 1-rank run of tests/upstream_probe.py: ZeRO-3, two AdamW groups, a universal checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dist_helpers import REPO, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("upstream")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "upstream_probe.py"), str(out)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"probe failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_universal_load_still_copies_group_zero_hyperparameters(probe):
    assert probe["saved"]["weight_decay"] == [0.1, 0.0]
    assert probe["bare"]["weight_decay"] == [0.1, 0.1], (
        "DeepSpeed's universal load now keeps each param group's weight decay: remove workaround 1 in "
        "Engine.load (the restore of `decays`)"
    )
    assert probe["ours"]["weight_decay"] == [0.1, 0.0]


def test_universal_load_still_shares_one_adam_step_tensor(probe):
    assert probe["saved"]["step_objects"] == probe["saved"]["steps"] == 2
    assert probe["bare"]["step_objects"] == 1, (
        "DeepSpeed's universal load now gives each sub-group its own Adam step: remove "
        "_unshare_adam_steps (workaround 2 of Engine.load)"
    )
    assert probe["ours"]["step_objects"] == 2
