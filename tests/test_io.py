"""Atomic writes, stale-temp cleanup, checksums and zstd JSON lines (pipeline/io.py)."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from pipeline import io
from pipeline.errors import DataError


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_write(target, "w") as fh:
        fh.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp left behind
    with io.atomic_write(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"


def test_atomic_dir_promotes_whole_directory(tmp_path):
    dest = tmp_path / "ckpt"
    with pytest.raises(ValueError), io.atomic_dir(dest) as d:
        (d / "part").write_text("x")
        raise ValueError
    assert not dest.exists()
    with io.atomic_dir(dest) as d:
        (d / "part").write_text("x")
    assert (dest / "part").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_remove_stale_temps(tmp_path):
    (tmp_path / f"{io.TMP_PREFIX}shard.jsonl.zst.abc").write_text("partial")
    (tmp_path / f"{io.TMP_PREFIX}dir.x").mkdir()
    (tmp_path / "keep.jsonl.zst").write_text("done")
    assert io.remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jsonl.zst"]


def test_sha256_and_jsonl_zst_round_trip(tmp_path):
    rows = [{"id": "w/1", "text": "héllo\nworld"}, {"id": "w/2", "text": "数学"}]
    path = tmp_path / "x.jsonl.zst"
    io.write_jsonl_zst(path, rows)
    assert list(io.read_jsonl_zst(path)) == rows
    assert io.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    first = path.read_bytes()
    io.write_jsonl_zst(path, rows)
    assert path.read_bytes() == first  # deterministic bytes


def test_truncated_zst_raises_after_its_complete_rows(tmp_path):
    rows = [{"id": i, "text": "word " * 200} for i in range(300)]
    path = tmp_path / "rows.jsonl.zst"
    io.write_jsonl_zst(path, rows)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(DataError, match="rows.jsonl.zst: unreadable: truncated zstd"):
        seen.extend(io.read_jsonl_zst(path))
    assert seen == rows[: len(seen)]


def test_concatenated_zst_frames_read_in_order(tmp_path):
    a, b, both = tmp_path / "a.zst", tmp_path / "b.zst", tmp_path / "both.jsonl.zst"
    io.write_jsonl_zst(a, [{"n": 1}])
    io.write_jsonl_zst(b, [{"n": 2}, {"n": 3}])
    both.write_bytes(a.read_bytes() + b.read_bytes())
    assert [r["n"] for r in io.read_jsonl_zst(both)] == [1, 2, 3]


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_users_umask_not_owner_only(tmp_path, mask, file_mode, dir_mode):
    """Shards, exports, config.yaml and status.json all go through these writers: on a shared
    filesystem the group must be able to read them as it can any other file of the user's."""
    import torch
    from safetensors.torch import save_file

    from pipeline.config import save_config
    from pipeline.data.config import CleanConfig

    old = os.umask(mask)
    try:
        assert io.umask() == mask
        with io.atomic_write(tmp_path / "shard.bin") as fh:
            fh.write(b"x")
        io.write_json(tmp_path / "status.json", {"status": "running"})
        save_config(CleanConfig(), tmp_path / "config.yaml")
        with io.atomic_dir(tmp_path / "export") as d:
            (d / "model.safetensors").write_bytes(b"x")
            save_file({"w": torch.zeros(2)}, d / "real.safetensors")  # safetensors itself writes 0600
    finally:
        os.umask(old)
    for name in (
        "shard.bin",
        "status.json",
        "config.yaml",
        "export/model.safetensors",
        "export/real.safetensors",
    ):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == dir_mode
