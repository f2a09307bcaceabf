"""Run-directory checkpoints: DeepSpeed's files plus our trainer state, promoted atomically.

Layout under `runs/<name>/checkpoints/`:
    step_<N>/                    DeepSpeed's per-rank model/optimizer files (Engine.save)
    step_<N>/trainer_state.json  TrainerState: step, consumed samples/tokens, layout, counters,
                                 LR schedule, loss scale, data fingerprint, early-stopping and
                                 spike-guard state (rank 0)
    step_<N>/rng_rank<R>.pt      each rank's torch/numpy/python(/cuda) RNG state as tensors and plain
                                 numbers, loadable with weights_only=True (ZeRO-1/2 would give every
                                 rank rank 0's client_state, so RNG lives in per-rank files)
    step_<N>/parity.pt           a fixed batch and the training model's logits on it (export checks them)
    universal_step_<N>/          step_<N> converted for another data-parallel size or for an AutoTP
                                 export (made on demand, by one process)
    latest                       the tag of the newest complete checkpoint
A checkpoint is written as `.tmp-step_<N>` by every rank, renamed to `step_<N>` by rank 0 after a
barrier (all ranks finished), and only then does `latest` move. A crash at any point leaves
`latest` naming a complete checkpoint; stale `.tmp-*` folders are deleted at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.errors import CheckpointError
from pipeline.io import TMP_PREFIX, atomic_write, remove_stale_temps, write_json

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d+)$")
UNIVERSAL_PREFIX = "universal_"


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done (skipped non-finite steps included: their samples are consumed)."""
    consumed_samples: int = 0
    """Global training samples consumed (the loader's position)."""
    consumed_tokens: int = 0
    """Target tokens trained on (summed over ranks)."""
    manifest_fingerprint: str = ""
    """Fingerprint of the data the run trains on (the token manifest's sha256 for pretraining, the
    data file's for fine-tuning); the name is kept so older checkpoints still resume."""
    world_size: int = 0
    dp_size: int = 0
    tp_size: int = 1
    global_batch: int = 0
    seq_len: int = 0
    nonfinite_skips: int = 0
    """Steps skipped because the loss or gradient norm was inf/NaN on some rank."""
    nonfinite_in_row: int = 0
    loss_scale_skips: int = 0
    """fp16 steps skipped by the dynamic loss scaler (overflow at a finite loss)."""
    spike_skips: int = 0
    """Steps whose update the spike guard skipped (train.spike_skip)."""
    loss_scale: float = 1.0
    """The loss scale at save time (DeepSpeed restores the scaler itself; recorded for checks)."""
    lr_schedule: dict = field(default_factory=dict)
    """The schedule's settings: with `step` they determine every future LR."""
    early_stop: dict = field(default_factory=dict)
    """EarlyStopper state: best value, step and checkpoint tag, evals without improvement, history."""
    spike: dict = field(default_factory=dict)
    """SpikeGuard state: the loss and gradient-norm windows and the spike counts."""


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


def read_state(run_dir: Path, tag: str) -> TrainerState:
    """The TrainerState of checkpoints/<tag> (CheckpointError when the folder is incomplete)."""
    path = ckpt_root(run_dir) / tag / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {path.parent} is not a complete checkpoint")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in raw.items() if k in known})


def clean_stale(run_dir: Path) -> int:
    """Delete `.tmp-*` leftovers of interrupted saves (rank 0, before anything reads the folder)."""
    n = remove_stale_temps(ckpt_root(run_dir))
    if n:
        log.warning("removed %d unfinished checkpoint folder(s) in %s", n, ckpt_root(run_dir))
    return n


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (so torch.load(weights_only=True) reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    run_dir: Path,
    state: TrainerState,
    keep_last: int,
    extra: dict | None = None,
    faults=None,
    keep: str | None = None,
) -> str:
    """Write checkpoints/step_<N> via a temp folder, then move `latest` and prune (collective).

    `extra` maps file names to objects rank 0 saves with torch.save beside the trainer state;
    `keep` names a checkpoint pruning spares (the best one) besides the newest `keep_last`.
    """
    root, tag = ckpt_root(run_dir), tag_for(state.step)
    tmp = TMP_PREFIX + tag
    if dist.is_main() and (root / tmp).exists():
        shutil.rmtree(root / tmp)
    dist.barrier()
    engine.save(root, tmp, client_state={"trainer_state": asdict(state)})
    torch.save(rng_state(), root / tmp / f"rng_rank{dist.rank()}.pt")
    if dist.is_main():
        for name, obj in (extra or {}).items():
            torch.save(obj, root / tmp / name)
        write_json(root / tmp / "trainer_state.json", asdict(state))
    if faults is not None:
        faults.crash_in_save(state.step)
    dist.barrier()  # every rank's files are on disk before the folder is promoted
    if dist.is_main():
        _promote(root, tmp, tag)
        prune(root, keep_last, keep)
    dist.barrier()
    return tag


def _promote(root: Path, tmp: str, tag: str) -> None:
    """Rename the finished temp folder to its tag, then point `latest` at it."""
    if (root / tag).exists():
        shutil.rmtree(root / tag)  # an earlier save of this step that `latest` never named
    os.replace(root / tmp, root / tag)
    with atomic_write(root / "latest", "w") as fh:
        fh.write(tag + "\n")


def prune(root: Path, keep_last: int, keep_tag: str | None = None) -> None:
    """Delete step folders other than the newest `keep_last` complete ones and `keep_tag` (and their
    universal copies)."""
    latest = (root / "latest").read_text().strip()
    latest_step = int(TAG_RE.match(latest).group(1))
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())
    keep = set(sorted(s for s in steps if s <= latest_step)[-keep_last:])
    if keep_tag and (m := TAG_RE.match(keep_tag)):
        keep.add(int(m.group(1)))
    for s in steps:
        if s not in keep:
            shutil.rmtree(root / tag_for(s), ignore_errors=True)
    for p in root.glob(UNIVERSAL_PREFIX + "step_*"):
        if p.name[len(UNIVERSAL_PREFIX) :] not in {tag_for(s) for s in keep}:
            shutil.rmtree(p, ignore_errors=True)


def check_compatible(
    saved: TrainerState, *, fingerprint: str, global_batch: int, seq_len: int, tp_size: int, where: Path
) -> None:
    """CheckpointError naming what cannot change between a checkpoint and the run resuming it."""
    if saved.manifest_fingerprint != fingerprint:
        raise CheckpointError(
            f"{where} was trained on data with fingerprint {saved.manifest_fingerprint[:12]}, the "
            f"config's data now has {fingerprint[:12]}; use a new run.name"
        )
    for key, was, now in (
        ("batch.global_size", saved.global_batch, global_batch),
        ("data.seq_len", saved.seq_len, seq_len),
        ("parallel.tp_size", saved.tp_size, tp_size),
    ):
        if was and was != now:
            raise CheckpointError(
                f"{where}: saved with {key}={was}, the config now says {now}; resuming would change the "
                f"sample order or the weight layout. Set {key}={was} (the data-parallel size may change)"
            )


def convert_universal(run_dir: Path, tag: str) -> str:
    """The tag of checkpoints/<tag> in universal form, converting it once (one process, no collectives:
    the runtime calls it through dist.run_on_main, an export calls it directly)."""
    from pipeline.runtime.engine import to_universal

    root = ckpt_root(run_dir)
    utag = UNIVERSAL_PREFIX + tag
    if (root / utag).is_dir():
        return utag
    log.info("converting %s to a universal checkpoint", root / tag)
    tmp = root / (TMP_PREFIX + utag)
    shutil.rmtree(tmp, ignore_errors=True)
    to_universal(root / tag, tmp)
    for name in ("trainer_state.json", "parity.pt", *(p.name for p in (root / tag).glob("rng_rank*.pt"))):
        if (root / tag / name).is_file():
            shutil.copy2(root / tag / name, tmp / name)
    (root / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; ours is `latest`
    os.replace(tmp, root / utag)
    return utag


def load(engine, run_dir: Path, tag: str, saved: TrainerState) -> TrainerState:
    """Restore engine and this rank's RNG from checkpoints/<tag> (the state was checked already)."""
    root = ckpt_root(run_dir)
    engine.load(root, tag)
    if engine.global_steps != saved.step:
        raise CheckpointError(
            f"{root / tag}: DeepSpeed is at step {engine.global_steps}, trainer state {saved.step}"
        )
    rng_file = root / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s missing: this rank's RNG starts fresh (the world size grew)", rng_file)
    return saved
