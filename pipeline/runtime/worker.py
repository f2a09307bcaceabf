"""How a launcher worker ends: a clean exit that sidesteps torch's flaky gloo abort at interpreter exit."""

from __future__ import annotations

import logging
import os
import sys

from pipeline import dist


def exit_worker(code: int = 0) -> None:
    """End a launcher worker without torch 2.13's flaky gloo abort at exit (notes: 0 in ~40 runs)."""
    try:
        dist.shutdown()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
