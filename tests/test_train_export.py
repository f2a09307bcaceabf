"""The streaming safetensors writer (shard plan, index, dtype) and the --check memory arithmetic."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pipeline.train.export import shard_plan, write_safetensors


def test_shard_plan_caps_bytes_and_keeps_order():
    shapes = {"a": torch.Size([10]), "b": torch.Size([10]), "c": torch.Size([30]), "d": torch.Size([5])}
    assert shard_plan(shapes, 4, max_bytes=80) == [["a", "b"], ["c"], ["d"]]  # c alone exceeds the cap
    assert shard_plan(shapes, 2, max_bytes=10**6) == [["a", "b", "c", "d"]]


def test_write_safetensors_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(16, 8, generator=g) for i in range(5)}
    names = write_safetensors(tensors, tmp_path, torch.bfloat16, max_shard_bytes=600)
    assert len(names) == 3 and names[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 16 * 8 * 2
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert set(index["weight_map"]) == set(tensors) == set(loaded)
    for k, t in tensors.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], t.to(torch.bfloat16))
    single = tmp_path / "one"
    single.mkdir()
    assert write_safetensors(tensors, single, torch.float32, 10**9) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
