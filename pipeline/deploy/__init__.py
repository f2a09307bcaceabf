"""Deployment: GGUF export for llama.cpp-family runtimes, weight-only quantization for CPU inference,
and evaluation with lm-evaluation-harness. Importing this package imports none of those libraries."""

from __future__ import annotations

import importlib.util

from pipeline.errors import ConfigError


def require(module: str, key: str) -> None:
    """ConfigError at `key` when `module` (a library of the `deploy` extra) is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            key,
            f"needs the {module!r} package, which is not installed: pip install -e '.[deploy]' "
            "(bash launch/setup.sh dev installs it)",
        )
