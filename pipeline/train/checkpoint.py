"""Run-directory checkpoints: DeepSpeed's files plus our trainer state, and an atomic `latest`.

Layout under `runs/<name>/checkpoints/`:
    step_<N>/                  DeepSpeed's per-rank model/optimizer files (Engine.save)
    step_<N>/trainer_state.json  step, consumed samples/tokens, manifest fingerprint (rank 0)
    step_<N>/rng_rank<R>.pt    each rank's torch/numpy/python RNG state (ZeRO-1/2 would give every
                               rank rank 0's client_state, so RNG lives in per-rank files)
    latest                     the tag of the newest complete checkpoint
`latest` is replaced only after a barrier, i.e. after every rank finished writing; a step folder
that `latest` does not name is an interrupted save and is overwritten or deleted.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.errors import CheckpointError
from pipeline.io import atomic_write, write_json

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Global training samples consumed (the loader's position)."""
    consumed_tokens: int = 0
    """Target tokens trained on (summed over ranks)."""
    manifest_fingerprint: str = ""
    """sha256 of the token manifest the run trains on."""


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step}"


def latest_tag(run_dir: Path) -> str | None:
    """The tag in checkpoints/latest, or None when the run has no complete checkpoint."""
    path = ckpt_root(run_dir) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_root(run_dir) / tag).is_dir():
        raise CheckpointError(f"{path} names {tag!r} but {ckpt_root(run_dir) / tag} does not exist")
    return tag


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, run_dir: Path, state: TrainerState, keep_last: int) -> str:
    """Write checkpoints/step_<N> on all ranks, then point `latest` at it and prune (collective)."""
    root, tag = ckpt_root(run_dir), tag_for(state.step)
    if dist.is_main() and (root / tag).exists():
        shutil.rmtree(root / tag)  # an interrupted earlier save of this step
    dist.barrier()
    engine.save(root, tag, client_state={"trainer_state": asdict(state)})
    torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")
    if dist.is_main():
        write_json(root / tag / "trainer_state.json", asdict(state))
    dist.barrier()  # every rank's files are on disk before `latest` moves
    if dist.is_main():
        with atomic_write(root / "latest", "w") as fh:
            fh.write(tag + "\n")
        prune(root, keep_last)
    dist.barrier()
    return tag


def prune(root: Path, keep_last: int) -> None:
    """Delete step folders other than the newest `keep_last` complete ones (and unfinished ones)."""
    latest = (root / "latest").read_text().strip()
    latest_step = int(TAG_RE.match(latest).group(1))
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())
    keep = {s for s in steps if s <= latest_step}
    keep = set(sorted(keep)[-keep_last:])
    for s in steps:
        if s not in keep:
            shutil.rmtree(root / tag_for(s), ignore_errors=True)


def load(engine, run_dir: Path, tag: str, manifest_fingerprint: str) -> TrainerState:
    """Restore engine and this rank's RNG from checkpoints/<tag>; CheckpointError if the data changed."""
    root = ckpt_root(run_dir)
    state_file = root / tag / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing; {root / tag} is not a complete checkpoint")
    state = TrainerState(**json.loads(state_file.read_text()))
    if state.manifest_fingerprint != manifest_fingerprint:
        raise CheckpointError(
            f"{root / tag} was trained on a token manifest with fingerprint {state.manifest_fingerprint[:12]}, "
            f"the config's data.tokens now has {manifest_fingerprint[:12]}; use a new run.name"
        )
    engine.load(root, tag)
    if engine.global_steps != state.step:
        raise CheckpointError(
            f"{root / tag}: DeepSpeed is at step {engine.global_steps}, trainer state {state.step}"
        )
    rng_file = root / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s missing: this rank's RNG starts fresh (world size changed?)", rng_file)
    return state
