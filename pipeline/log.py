"""Logging set-up and progress bars that stay quiet off rank 0."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once: time, level, logger name; rank prefix when distributed."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # transformers imports torchao (the `deploy` extra) whenever it is installed; its import-time
    # notes about optional kernels say nothing a user can act on.
    logging.getLogger("torchao").setLevel(logging.ERROR)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True, **kw):
    """A tqdm bar on rank 0 (or the Ray driver) and on a terminal or forced by GRISTMILL_PROGRESS=1."""
    from tqdm.auto import tqdm

    rank0 = os.environ.get("RANK", "0") == "0"
    forced = os.environ.get("GRISTMILL_PROGRESS")
    show = enabled and rank0 and (forced == "1" or (forced != "0" and sys.stderr.isatty()))
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, **kw)
