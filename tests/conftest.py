"""Shared fixtures: the real raw samples (skipped when absent) and one local Ray instance per session."""

from __future__ import annotations

from pathlib import Path

import pytest

RAW_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"


@pytest.fixture(scope="session")
def raw_samples() -> Path:
    """`../shared/data/raw` next to the repo (see its SOURCES.md); skips the test when it is absent."""
    if not RAW_SAMPLES.is_dir():
        pytest.skip(f"raw samples not found at {RAW_SAMPLES} (expected ../shared/data/raw next to the repo)")
    return RAW_SAMPLES


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs, shared by the whole session, shut down at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
