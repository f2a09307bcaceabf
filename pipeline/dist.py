"""The one door to torch.distributed: every collective in the code base goes through here.

Without a process group each helper is the single-process identity (rank 0 of 1), so the same
code runs under DeepSpeed, torchrun, srun or plain `python`. With one, a collective gets its
tensor on the device the group's backend takes: the CPU under gloo, the rank's accelerator
under NCCL (which rejects CPU tensors), and the caller gets back what it handed in (the same
tensor, on its own device and dtype) or plain Python numbers. Count-style metadata that lives on
the CPU anyway (target counts, flags, timings) goes through `sum_floats`/`max_floats`, which use
a gloo side group when the main group is not gloo, so no host-device copy is made for them.
Nothing else in the code asks which device it is on (tests/test_dist_door.py keeps it so).

Long work only rank 0 does (checksums of a huge corpus, a checkpoint conversion, an export) goes
through `run_on_main`: the other ranks wait by polling a file rather than inside a collective, so
the work may outlast the collective timeout, and a collective called inside such work raises
instead of pairing with some other rank's collective (the hang of a rank-0-only barrier).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CPU_BACKENDS = ("gloo", "mpi", "ccl")  # backends whose collectives take CPU tensors
_side_group = None  # the gloo group for CPU metadata, when the main group is not gloo
_main_only: str | None = None  # the rank-0-only work now running (collectives are refused meanwhile)
POLL_S = 1.0
"""Seconds between the waiting ranks' looks at the marker file."""
BEAT_S = 5.0
"""Seconds between rank 0's heartbeats while it works."""
STALL_S = 600.0
"""A waiting rank gives up when rank 0's heartbeat has not changed for this long (rank 0 died)."""


def _pg():
    try:
        import torch.distributed as tdist
    except ImportError:  # data-prep installs may lack torch
        return None
    return tdist if tdist.is_available() and tdist.is_initialized() else None


def rank() -> int:
    """Global rank: from the process group, else the launcher's RANK, else 0."""
    pg = _pg()
    return pg.get_rank() if pg else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks: from the process group, else WORLD_SIZE, else 1."""
    pg = _pg()
    return pg.get_world_size() if pg else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device():
    """The device this rank computes on: its current accelerator device, else the CPU."""
    import torch

    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, torch.accelerator.current_device_index())


def bind_device() -> None:
    """Make accelerator device LOCAL_RANK this process's current one (no-op on CPU-only hosts)."""
    import torch

    if torch.accelerator.is_available():
        torch.accelerator.set_device_index(local_rank() % torch.accelerator.device_count())


def comm_device():
    """The device the main group's collectives take tensors on (CPU under gloo)."""
    import torch

    pg = _pg()
    if pg is None or pg.get_backend() in CPU_BACKENDS:
        return torch.device("cpu")
    return device()


def init_side_group() -> None:
    """Create the gloo group for CPU metadata (collective: every rank calls it once, after the
    main group started; a no-op when the main group already takes CPU tensors)."""
    global _side_group
    _refuse_in_main_only("new_group")
    pg = _pg()
    if pg is not None and _side_group is None and pg.get_backend() not in CPU_BACKENDS:
        _side_group = pg.new_group(backend="gloo")


def _refuse_in_main_only(name: str) -> None:
    """RuntimeError when a collective is called inside rank-0-only work: no other rank would join it
    (they are polling), or worse, it would pair with a later collective of theirs."""
    if _main_only is not None:
        raise RuntimeError(
            f"collective {name}() called inside rank-0-only work ({_main_only}); such work must not "
            "call collectives (make the function collective-free, or call it on every rank)"
        )


def barrier() -> None:
    _refuse_in_main_only("barrier")
    pg = _pg()
    if pg:
        pg.barrier()


def _reduce_(x, op_name: str):
    """All-reduce x in place on the comm device; x keeps its own device and dtype."""
    _refuse_in_main_only("all_reduce")
    pg = _pg()
    if not pg:
        return x
    target = comm_device()
    buf = x if x.device == target else x.to(target)
    pg.all_reduce(buf, op=getattr(pg.ReduceOp, op_name))
    if buf is not x:
        x.copy_(buf)
    return x


def all_reduce_sum_(x):
    """Sum a tensor over ranks in place (on any device) and return it; identity without a group."""
    return _reduce_(x, "SUM")


def all_reduce_max_(x):
    """Max of a tensor over ranks in place (on any device) and return it; identity without a group."""
    return _reduce_(x, "MAX")


def _reduce_floats(values: list[float], op_name: str) -> list[float]:
    import torch

    _refuse_in_main_only("all_reduce")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    pg = _pg()
    if pg:
        if _side_group is None and pg.get_backend() not in CPU_BACKENDS:
            return _reduce_(t, op_name).tolist()  # no side group made: through the main group
        pg.all_reduce(t, op=getattr(pg.ReduceOp, op_name), group=_side_group)
    return t.tolist()


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few CPU numbers (float64: counts stay exact to 2**53)."""
    return _reduce_floats(values, "SUM")


def max_floats(values: list[float]) -> list[float]:
    """Element-wise maxima over ranks of a few CPU numbers."""
    return _reduce_floats(values, "MAX")


def shutdown() -> None:
    """Wait for every rank, then end the process group (and the side group); no-op without one."""
    global _side_group
    _refuse_in_main_only("shutdown")
    pg = _pg()
    if pg:
        pg.barrier()
        pg.destroy_process_group()
        _side_group = None


# ---------------------------------------------------------------- rank-0-only work


def run_on_main(
    work: Callable[[], Any], sync_dir: str | os.PathLike, what: str, stall_s: float = STALL_S
) -> Any:
    """Run `work()` on rank 0 only and return its result (JSON-able) on every rank; rank 0's error is
    raised on every rank. Collective: every rank calls it, the same number of times.

    No collective is pending while the work runs: the other ranks poll a marker file in `sync_dir`
    (a folder every rank sees, such as the run directory), so the work may outlast the collective
    timeout. They give up when rank 0's heartbeat file stops changing for `stall_s` seconds (rank 0
    died). `work` must not call collectives: the helpers here raise if it does, also without a
    process group, so a test in one process finds the mistake.
    """
    marker = Path(sync_dir) / f".main-{re.sub(r'[^A-Za-z0-9_.-]+', '_', what)}.json"
    if _pg() is None or world_size() == 1:
        return _guarded(work, what)
    if is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        for p in (marker, _beat_path(marker)):
            p.unlink(missing_ok=True)  # a killed earlier run's: nobody may mistake it for this one's
    barrier()
    if not is_main():
        outcome = _wait_for(marker, what, stall_s)
        barrier()  # read: rank 0 may remove the marker
        barrier()  # removed: on return no rank sees this call's files
        return _unpack(outcome, what)
    error, result = None, None
    try:
        with _Heartbeat(_beat_path(marker)):
            result = _guarded(work, what)
        payload = json.dumps({"ok": True, "result": result})  # TypeError here: a bug of the caller's
    except Exception as exc:  # noqa: BLE001  every rank must learn of it, then it is raised here too
        error, payload = exc, json.dumps({"ok": False, "type": type(exc).__name__, "error": str(exc)})
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(payload)
    os.replace(tmp, marker)  # whole or absent: a waiting rank never reads half of it
    barrier()  # every rank has read the marker
    for p in (marker, _beat_path(marker)):
        p.unlink(missing_ok=True)
    barrier()
    if error is not None:
        raise error
    return result


def _guarded(work: Callable[[], Any], what: str) -> Any:
    """work() with collectives refused."""
    global _main_only
    outer, _main_only = _main_only, what
    try:
        return work()
    finally:
        _main_only = outer


def _beat_path(marker: Path) -> Path:
    return marker.with_name(marker.name + ".beat")


class _Heartbeat:
    """While active, a thread rewrites `path` with a counter every BEAT_S seconds."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="gristmill-heartbeat", daemon=True)

    def _beat(self) -> None:
        n = 0
        while True:
            n += 1
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text(str(n))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a missed beat is only a delay; STALL_S is many beats long
            if self.stop.wait(BEAT_S):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _wait_for(marker: Path, what: str, stall_s: float) -> dict:
    """Poll for rank 0's marker; RuntimeError when its heartbeat stops for stall_s seconds."""
    beat, seen, changed = _beat_path(marker), None, time.monotonic()
    wait = 0.02  # short work (nothing to clean, a record that says all is verified) returns at once
    while True:
        try:
            return json.loads(marker.read_text())
        except (FileNotFoundError, ValueError):
            pass
        try:
            now_beat = beat.read_text()
        except OSError:
            now_beat = None
        if now_beat != seen:
            seen, changed = now_beat, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            raise RuntimeError(
                f"rank {rank()}: rank 0 stopped answering during {what} (no heartbeat in {marker.parent} "
                f"for {stall_s:.0f} s); is the folder on a filesystem every rank sees?"
            )
        time.sleep(wait)
        wait = min(2 * wait, POLL_S)


def _unpack(outcome: dict, what: str) -> Any:
    """The result of rank 0's outcome, or its error raised here (same class for user errors)."""
    if outcome.get("ok"):
        return outcome.get("result")
    from pipeline import errors

    msg = f"rank 0 failed during {what}: {outcome.get('error')}"
    cls = getattr(errors, str(outcome.get("type")), None)
    if cls in (errors.DataError, errors.CheckpointError, errors.GristmillError):
        raise cls(msg)
    if cls is errors.ConfigError:
        raise errors.ConfigError("", msg)
    raise RuntimeError(f"{msg} ({outcome.get('type')})")
