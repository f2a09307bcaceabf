"""Shared fixtures: the real raw samples (skipped when absent) and one local Ray instance per session;
tests marked `gpu` / `gpu(n)` are skipped, with the reason, where fewer than n CUDA GPUs are visible."""

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


def pytest_collection_modifyitems(config, items) -> None:
    """Skip `gpu(n)` tests where torch sees fewer than n CUDA GPUs, saying how many it sees and why."""
    wanted = {item: item.get_closest_marker("gpu") for item in items}
    wanted = {item: (m.args[0] if m.args else m.kwargs.get("n", 1)) for item, m in wanted.items() if m}
    if not wanted:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = f"torch {torch.__version__} is a CPU build" if not torch.version.cuda else "no CUDA GPU is visible"
    for item, n in wanted.items():
        if have < n:
            seen = f"{have} CUDA GPU(s) visible" if have else why
            item.add_marker(pytest.mark.skip(reason=f"needs {n} CUDA GPU(s): {seen}"))
