"""Distributed helpers that degrade to single-process identities without a process group.

Only torch.distributed is touched here; nothing else needs to know whether it runs
under DeepSpeed, torchrun, srun or plain `python`.
"""

from __future__ import annotations

import os


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


def barrier() -> None:
    pg = _pg()
    if pg:
        pg.barrier()


def all_reduce_sum(x):
    """Sum a tensor across ranks in place and return it; identity without a process group."""
    pg = _pg()
    if pg:
        pg.all_reduce(x, op=pg.ReduceOp.SUM)
    return x


def all_reduce_max(x):
    """Max of a tensor across ranks in place; identity without a process group."""
    pg = _pg()
    if pg:
        pg.all_reduce(x, op=pg.ReduceOp.MAX)
    return x
