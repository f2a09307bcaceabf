"""The one door to torch.distributed: every collective in the code base goes through here.

Without a process group each helper is the single-process identity (rank 0 of 1), so the same
code runs under DeepSpeed, torchrun, srun or plain `python`. With one, a collective gets its
tensor on the device the group's backend takes: the CPU under gloo, the rank's accelerator
under NCCL (which rejects CPU tensors), and the caller gets back what it handed in (the same
tensor, on its own device and dtype) or plain Python numbers. Count-style metadata that lives on
the CPU anyway (target counts, flags, timings) goes through `sum_floats`/`max_floats`, which use
a gloo side group when the main group is not gloo, so no host-device copy is made for them.
Nothing else in the code asks which device it is on (tests/test_dist_door.py keeps it so).
"""

from __future__ import annotations

import os

CPU_BACKENDS = ("gloo", "mpi", "ccl")  # backends whose collectives take CPU tensors
_side_group = None  # the gloo group for CPU metadata, when the main group is not gloo


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
    pg = _pg()
    if pg is not None and _side_group is None and pg.get_backend() not in CPU_BACKENDS:
        _side_group = pg.new_group(backend="gloo")


def barrier() -> None:
    pg = _pg()
    if pg:
        pg.barrier()


def _reduce_(x, op_name: str):
    """All-reduce x in place on the comm device; x keeps its own device and dtype."""
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
    pg = _pg()
    if pg:
        pg.barrier()
        pg.destroy_process_group()
        _side_group = None
