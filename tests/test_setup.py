"""launch/setup.sh's choice of torch build (run with --dry-run against a simulated nvidia-smi) and
constraints.txt, the versions CI tested, against pyproject.toml's ranges."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from dist_helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def constraints() -> dict[str, str]:
    """name -> pinned version from constraints.txt."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: '{line}' is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    """Fails when a dependency is added or its floor raised without `python launch/freeze_constraints.py`."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python's standard library from 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraints()
    assert "torch" not in pins  # GPU users keep their CUDA build
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + extras["dev"] + extras.get("deploy", []):  # `setup.sh dev`
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it (regenerate it)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


@pytest.fixture
def checkout(tmp_path):
    """A folder with only launch/setup.sh (no .venv), and a bin/ for a simulated nvidia-smi."""
    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch" / "setup.sh", tmp_path / "launch" / "setup.sh")
    (tmp_path / "bin").mkdir()
    return tmp_path


def fake_nvidia_smi(checkout, listing: str, rc: int = 0) -> None:
    tool = checkout / "bin" / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\nexit {rc}\n")
    tool.chmod(0o755)


def dry_run(checkout, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{checkout / 'bin'}:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", str(checkout / "launch" / "setup.sh"), "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_setup_picks_the_build_from_the_gpus_it_sees_and_says_why(checkout):
    fake_nvidia_smi(checkout, "GPU 0: NVIDIA H100 (UUID: a)\nGPU 1: NVIDIA H100 (UUID: b)\n")
    out = dry_run(checkout).stdout
    assert "would install the cuda build of torch, because nvidia-smi lists 2 GPU(s) here" in out, out
    out = dry_run(checkout, "dev", "--cpu").stdout
    assert "would install the cpu build of torch, because --cpu was given" in out, out
    # a login node: nvidia-smi present but no driver
    fake_nvidia_smi(checkout, "NVIDIA-SMI has failed because it could not communicate with the driver", 9)
    out = dry_run(checkout).stdout
    assert "would install the cpu build" in out and "use --cuda" in out, out
    out = dry_run(checkout, "--cuda").stdout
    assert "would install the cuda build of torch, because --cuda was given" in out, out


def test_setup_refuses_contradictory_or_unknown_options(checkout):
    both = dry_run(checkout, "--cpu", "--cuda")
    assert both.returncode == 2 and "not both" in both.stderr
    typo = dry_run(checkout, "--gpu")
    assert typo.returncode == 2 and "unknown argument '--gpu'" in typo.stderr
