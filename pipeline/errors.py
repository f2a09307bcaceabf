"""Errors a user can cause. Everything else is a bug and may raise whatever it raises."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


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
    exit status 1, not a traceback (under a launcher, every rank would print one)."""
    try:
        yield
    except GristmillError as exc:
        sys.exit(f"error: {exc}")
