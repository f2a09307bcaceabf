"""pipeline/dist.py is the only door to torch.distributed collectives, and its helpers work.

The source walk (AST) finds any call of a collective outside pipeline/dist.py: through
`torch.distributed.x`, an alias (`import torch.distributed as td`, `from torch import distributed`),
a name imported from it (`from torch.distributed import all_reduce as ar`), or deepspeed.comm.
The helpers run on 2 gloo ranks in spawned processes.
"""

from __future__ import annotations

import ast
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
DOOR = REPO / "pipeline" / "dist.py"
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "new_group",
    "destroy_process_group",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, called name) of every torch.distributed/deepspeed.comm collective called in source."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> distributed module it stands for
    functions: dict[str, str] = {}  # local name -> collective it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    modules[a.asname or a.name] = a.name
                elif a.asname is None:
                    modules.setdefault(a.name.split(".")[0], a.name.split(".")[0])  # `import torch`
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    modules[a.asname or a.name] = full
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    functions[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        resolved = f"{modules[head]}.{rest}" if head in modules and rest else name
        owner, _, fn = resolved.rpartition(".")
        if (owner in DIST_MODULES and fn in COLLECTIVES) or (not owner and fn in functions):
            found.append((node.lineno, name))
    return found


def test_the_walker_catches_every_spelling():
    src = """
import torch
import torch.distributed as td
from torch import distributed
from torch.distributed import all_reduce as ar, barrier
import deepspeed.comm as dcomm
from pipeline import dist
torch.distributed.all_reduce(x)
td.broadcast(x, 0)
distributed.all_gather(xs, x)
ar(x)
barrier()
dcomm.reduce_scatter(a, b)
dist.barrier()              # the door: allowed
td.get_rank()               # not a collective
"""
    got = [name for _, name in collective_calls(src)]
    assert got == [
        "torch.distributed.all_reduce",
        "td.broadcast",
        "distributed.all_gather",
        "ar",
        "barrier",
        "dcomm.reduce_scatter",
    ]


def test_no_collective_outside_the_door():
    offenders = []
    for folder in ("pipeline", "launch", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == DOOR:
                continue
            for line, name in collective_calls(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}(...)")
    assert not offenders, "collectives must go through pipeline/dist.py:\n" + "\n".join(offenders)


def test_helpers_without_a_process_group(monkeypatch):
    from pipeline import dist

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([3.0])
    assert dist.all_reduce_sum_(t) is t and t.item() == 3.0
    assert dist.sum_floats([1, 2.5]) == [1.0, 2.5] and dist.max_floats([4]) == [4.0]
    assert dist.comm_device() == torch.device("cpu")
    dist.barrier()
    dist.shutdown()


def _ranks_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from pipeline import dist

    dist.init_side_group()  # gloo main group: nothing to create
    t = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
    same = dist.all_reduce_sum_(t)
    i = dist.all_reduce_max_(torch.tensor([rank], dtype=torch.int64))
    row = {
        "sum": same.tolist(),
        "same_tensor": same is t,
        "max": i.tolist(),
        "dtype": str(i.dtype),
        "floats": dist.sum_floats([2**53 - 1 if rank == 0 else 0, 0.5]),
        "max_floats": dist.max_floats([rank * 3.0]),
        "comm": str(dist.comm_device()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.shutdown()


@pytest.mark.dist
def test_helpers_on_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ranks_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for row in rows:
        assert row["sum"] == [3.0, 10.0] and row["same_tensor"] and row["max"] == [1]
        assert row["dtype"] == "torch.int64" and row["comm"] == "cpu"
        assert row["floats"] == [2.0**53 - 1, 1.0] and row["max_floats"] == [3.0]
