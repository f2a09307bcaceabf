"""Errors a user can cause. Everything else is a bug and may raise whatever it raises."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator

PEER_GRACE_S = 20.0
"""How long a rank other than 0 holds back its user error (see `user_errors`)."""


class GristmillError(Exception):
    """Base of every error that points at something the user can fix."""


class ConfigError(GristmillError):
    """A config value is missing, unknown, of the wrong type, or breaks a rule.

    The message always starts with the dotted key (and the file, when known), so the user
    can find the line to change.
    """

    def __init__(self, key: str, msg: str, file: str | None = None):
        self.key, self.msg, self.file = key, msg, file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {msg}" if key else f"{where}{msg}")


class DataError(GristmillError):
    """An input or output data file is missing, corrupt or foreign; the message names it."""


class CheckpointError(GristmillError):
    """A checkpoint is missing, incomplete or incompatible with the current run."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """For entry points: a GristmillError ends the process with one `error: ...` line on stderr and
    exit status 1, not a traceback, and one line per job rather than one per rank.

    Under a launcher every rank usually meets the same error (same config, same files), so rank 0
    reports it at once and the others hold theirs back for PEER_GRACE_S, in which rank 0's exit makes
    the launcher (deepspeed's, torchrun) end them. An error only one rank meets is still printed, by
    that rank and prefixed with its number, once the grace is over (under srun, in its own log).
    """
    try:
        yield
    except GristmillError as exc:
        rank = int(os.environ.get("RANK") or 0)
        if rank == 0 or int(os.environ.get("WORLD_SIZE") or 1) == 1:
            sys.exit(f"error: {exc}")
        with contextlib.suppress(ValueError):  # a training stop handler must not delay the launcher's TERM
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(PEER_GRACE_S)
        sys.exit(f"error (rank {rank}): {exc}")
