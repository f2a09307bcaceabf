"""pipeline/dist.py is the only door to torch.distributed collectives, and its helpers work.

The source walk (AST) finds any call of a collective outside pipeline/dist.py: through
`torch.distributed.x`, an alias (`import torch.distributed as td`, `from torch import distributed`),
a name imported from it (`from torch.distributed import all_reduce as ar`), or deepspeed.comm.
The helpers run on 2 gloo ranks in spawned processes; so does `run_on_main` (rank-0-only work the
other ranks wait for by polling a file), under a collective timeout shorter than the work.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import socket
import time
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


def run_two_ranks(worker, out: Path) -> list[dict]:
    """worker(rank, 2, port, out) in 2 spawned processes; the rows they wrote to out/rank<r>.json."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.dist
def test_helpers_on_two_gloo_ranks(tmp_path):
    rows = run_two_ranks(_ranks_worker, tmp_path)
    for row in rows:
        assert row["sum"] == [3.0, 10.0] and row["same_tensor"] and row["max"] == [1]
        assert row["dtype"] == "torch.int64" and row["comm"] == "cpu"
        assert row["floats"] == [2.0**53 - 1, 1.0] and row["max_floats"] == [3.0]


def test_rank0_work_refuses_collectives_also_without_a_group(tmp_path, monkeypatch):
    """A collective inside rank-0-only work is the hang of issue 18 item 3; it must fail in one process too."""
    from pipeline import dist

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.run_on_main(lambda: {"n": 1}, tmp_path, "work") == {"n": 1}
    with pytest.raises(
        RuntimeError, match=r"collective barrier\(\) called inside rank-0-only work \(export\)"
    ):
        dist.run_on_main(dist.barrier, tmp_path, "export")
    with pytest.raises(RuntimeError, match="all_reduce"):
        dist.run_on_main(lambda: dist.sum_floats([1.0]), tmp_path, "export")
    dist.barrier()  # allowed again once the work is over


WORK_S, TIMEOUT_S = 3.0, 1.5  # rank 0's work takes twice the collective timeout


def _main_only_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Path(out, f"ready{rank}").touch()  # start together: the short timeout also bounds the rendezvous
    while not all(Path(out, f"ready{r}").exists() for r in range(world)):
        time.sleep(0.01)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    from pipeline import dist
    from pipeline.errors import DataError

    dist.POLL_S = 0.05
    row: dict = {"result": dist.run_on_main(lambda: time.sleep(WORK_S) or {"n": 7}, out, "slow work")}
    row["in_step"] = dist.sum_floats([1.0])  # a collective right after: the ranks are together again

    def bad():
        raise DataError("shard x: sha256 mismatch")

    for name, work, kind in (("error", bad, DataError), ("nested", dist.barrier, RuntimeError)):
        try:
            dist.run_on_main(work, out, name)
        except kind as exc:
            row[name] = str(exc)
    row["markers_left"] = sorted(p.name for p in Path(out).glob(".main-*"))
    # the control: the same wait inside a collective exceeds the timeout
    if rank == 0:
        time.sleep(WORK_S)
    else:
        try:
            dist.barrier()
            row["barrier"] = "passed"
        except Exception as exc:  # noqa: BLE001  gloo's timeout error
            row["barrier"] = type(exc).__name__
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    os._exit(0)  # after a timed-out collective the group cannot be shut down cleanly


@pytest.mark.dist
def test_rank0_work_longer_than_the_collective_timeout(tmp_path):
    rows = run_two_ranks(_main_only_worker, tmp_path)
    for rank, row in enumerate(rows):
        assert row["result"] == {"n": 7} and row["in_step"] == [2.0], row
        assert "shard x: sha256 mismatch" in row["error"] and row["markers_left"] == []
        assert "called inside rank-0-only work (nested)" in row["nested"]
        if rank:  # rank 1 learned of rank 0's errors, with the user error's class
            assert row["error"].startswith("rank 0 failed during error: ")
    assert rows[1]["barrier"] not in (None, "passed"), rows[1]  # without the polling: a timeout
