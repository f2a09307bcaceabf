"""The layers hold (an AST walk of the imports, no module is executed):

- pipeline/runtime (the loop, engine, checkpoints, ...) imports neither pipeline.train nor
  pipeline.finetune: both build on it, never the other way round;
- pipeline/finetune uses public names only of pipeline.runtime and pipeline.train (no `_private`
  name, and no module of theirs that is itself private);
- deepspeed is imported by pipeline/runtime/engine.py alone;
- every torch.load reads with weights_only=True (no pickle code runs from a checkpoint file).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path, source: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import in a file (or in `source` as if it were
    that file), relative imports resolved against the file's package."""
    package = path.relative_to(REPO).parent.parts  # ("pipeline", "finetune")
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from ..x import y
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out += [(node.lineno, module, a.name) for a in node.names]
    return out


def files(package: str) -> list[Path]:
    return sorted((REPO / "pipeline" / package).rglob("*.py"))


def is_private(module: str, name: str | None) -> bool:
    parts = module.split(".") + ([name] if name else [])
    return any(p.startswith("_") and not p.startswith("__") for p in parts)


def test_runtime_depends_on_neither_train_nor_finetune():
    bad = [
        f"{p.relative_to(REPO)}:{line}: {mod}"
        for p in files("runtime")
        for line, mod, name in imports(p)
        if mod.startswith(("pipeline.train", "pipeline.finetune"))
        or (mod == "pipeline" and name in ("train", "finetune"))
    ]
    assert not bad, bad


def test_finetune_uses_only_public_names_of_runtime_and_train():
    bad, used = [], set()
    for p in files("finetune"):
        for line, mod, name in imports(p):
            if mod.startswith(("pipeline.train", "pipeline.runtime")):
                used.add(mod)
                if is_private(mod, name):
                    bad.append(f"{p.relative_to(REPO)}:{line}: from {mod} import {name}")
    assert not bad, bad
    assert "pipeline.runtime.trainer" in used and "pipeline.runtime.task" in used  # it runs on the runtime


def test_deepspeed_has_one_door():
    door = REPO / "pipeline" / "runtime" / "engine.py"
    bad = [
        f"{p.relative_to(REPO)}:{line}: {mod}"
        for folder in ("pipeline", "launch", "bench")
        for p in sorted((REPO / folder).rglob("*.py"))
        if p != door
        for line, mod, _ in imports(p)
        if mod.split(".")[0] == "deepspeed"
    ]
    assert not bad, bad


def test_the_checks_see_private_and_relative_imports():
    assert is_private("pipeline.train.trainer", "_loaders") and is_private("pipeline.train._x", "y")
    assert not is_private("pipeline.train.export", "export_hf")
    probe = REPO / "pipeline" / "finetune" / "probe.py"  # never written: its source is given
    src = "from ..train.trainer import _loaders\nfrom . import tasks\nimport deepspeed\n"
    got = [(m, n) for _, m, n in imports(probe, src)]
    assert got == [
        ("pipeline.train.trainer", "_loaders"),
        ("pipeline.finetune", "tasks"),
        ("deepspeed", None),
    ]


def unsafe_loads(source: str) -> list[int]:
    """Lines of torch.load(...) calls without a literal weights_only=True."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                bad.append(node.lineno)
    return bad


def test_torch_load_only_with_weights_only():
    assert unsafe_loads(
        "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)"
    ) == [1, 2]
    bad = [
        f"{p.relative_to(REPO)}:{line}"
        for folder in ("pipeline", "launch", "bench")
        for p in sorted((REPO / folder).rglob("*.py"))
        for line in unsafe_loads(p.read_text(encoding="utf-8"))
    ]
    assert not bad, bad
