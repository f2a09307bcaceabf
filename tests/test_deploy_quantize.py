"""Weight-only quantization with torchao (pipeline/deploy/quantize.py): the comparison that
launch/evaluate.py --quantize prints, byte accounting of quantized tensors, and the exported folder."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import ft_init  # noqa: F401

from pipeline.deploy.quantize import export_quantized, load_quantized, tensor_bytes, weight_bytes
from pipeline.errors import DataError

TEXT = "The os module gives access to files and paths. 标准库的 json 模块把对象编码成文本。\n" * 6


def linear_bytes(model) -> int:
    return sum(
        tensor_bytes(m.weight)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )


def test_int8_bytes_are_a_quarter_of_fp32_plus_scales(ft_init):  # noqa: F811
    from pipeline.finetune.generate import load_model

    original = load_model(ft_init)[0]
    int8 = load_quantized(ft_init, "int8")
    n_weights = sum(
        m.weight.numel()
        for n, m in original.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    n_rows = sum(
        m.weight.shape[0]
        for n, m in original.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert linear_bytes(original) == 4 * n_weights
    assert n_weights <= linear_bytes(int8) <= n_weights + 8 * n_rows  # 1 byte a weight + per-row scale
    assert weight_bytes(int8) < weight_bytes(original)
    # the tied embedding / lm_head stays one shared fp32 tensor
    assert int8.lm_head.weight is int8.model.embed_tokens.weight


def test_evaluate_prints_original_and_quantized_side_by_side(ft_init, tmp_path, capsys):  # noqa: F811
    from launch import evaluate as cli

    data = tmp_path / "eval.txt"
    data.write_text(TEXT, encoding="utf-8")
    cli.main(
        [
            "--model",
            str(ft_init),
            "--data",
            str(data),
            "--seq-len",
            "64",
            "--quantize",
            "int8",
            "int4",
            "--decode-tokens",
            "8",
        ]
    )
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["model"] for r in rows] == ["original", "int8", "int4"]
    assert "decode tok/s" in captured.err and "int4" in captured.err
    base, int8, int4 = rows
    assert base["tokens_scored"] == int8["tokens_scored"] == int4["tokens_scored"] > 100
    assert abs(int8["ppl_change_pct"]) < 2.0 and abs(int4["ppl_change_pct"]) < 10.0
    assert int8["weight_mb"] < base["weight_mb"] and int4["weight_mb"] < base["weight_mb"]
    assert all(r["decode_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0 for r in rows)


def test_bad_quantize_arguments(ft_init, tmp_path):  # noqa: F811
    from launch import evaluate as cli

    with pytest.raises(SystemExit, match="unknown schemes"):
        cli.main(["--model", str(ft_init), "--data", str(tmp_path), "--quantize", "int3"])
    with pytest.raises(SystemExit, match="needs --data"):
        cli.main(["--model", str(ft_init), "--quantize", "int8"])


def test_exported_int8_folder_reloads_quantized(ft_init, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = export_quantized(ft_init, tmp_path / "q", "int8")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    with pytest.raises(DataError, match="config.json"):
        export_quantized(tmp_path, tmp_path / "q2", "int8")
