"""Write constraints.txt: the installed version of every package gristmill[dev,deploy] pulls in (what
`launch/setup.sh dev` installs; torch excluded), from the environment the tests just passed in. Run
it after adding or upgrading a dependency.

    .venv/bin/python launch/freeze_constraints.py          # rewrites constraints.txt in the repo root
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NOT_PINNED = {"torch", "setuptools", "pip"}  # torch: GPU users keep their CUDA build
HEADER = """\
# The versions CI tested (Python {python}, torch {torch}): every package gristmill[dev,deploy] pulls in,
# pinned. launch/setup.sh installs with `-c constraints.txt` (`--unpinned` skips it). torch is not
# here: setup installs the CPU build itself, and GPU users keep pip's CUDA build.
# Written by `python launch/freeze_constraints.py` from the environment the tests passed in.
"""


def closure(requirements: list[str]) -> dict[str, str]:
    """name -> installed version of the requirements and, recursively, of what they require."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()  # parent_extras: the extras its requirer was installed with
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras or {""}):
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # a dependency of another platform or Python
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        pins[key[0]] = dist.version
        todo += [(Requirement(r), key[1]) for r in dist.requires or []]
    return pins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "constraints.txt")
    args = parser.parse_args(argv)
    import platform

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = closure(project["dependencies"] + extras["dev"] + extras.get("deploy", []))
    header = HEADER.format(python=platform.python_version(), torch=md.version("torch"))
    lines = [f"{name}=={pins[name]}" for name in sorted(pins) if name not in NOT_PINNED]
    args.out.write_text(header + "\n".join(lines) + "\n")
    print(f"{args.out}: {len(lines)} pins")


if __name__ == "__main__":
    main()
