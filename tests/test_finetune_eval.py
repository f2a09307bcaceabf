"""launch/evaluate.py: perplexity of a model folder on a text file, a JSONL file and a token shard
(the same tokens give the same number), checked against a direct computation; bad inputs raise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import ft_init  # noqa: F401

from pipeline.data.indexed import bin_path, dtype_for_vocab, write_indexed
from pipeline.errors import DataError
from pipeline.finetune.generate import load_model
from pipeline.finetune.perplexity import load_tokens, perplexity

TEXT = "Python is a programming language. Its modules handle files, paths, text and numbers.\n" * 3


def direct_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Mean NLL over non-overlapping windows, one window at a time (no batching, no padding)."""
    total, n = 0.0, 0
    for i in range(0, len(ids), seq_len):
        w = torch.tensor([ids[i : i + seq_len]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=w).logits[0, :-1]
        total += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    return total / n, n


def test_text_jsonl_and_shard_agree_with_direct_computation(ft_init, tmp_path, capsys):  # noqa: F811
    from launch import evaluate as cli

    model, tok = load_model(ft_init)
    ids = [tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False), tok.eos_token_id]
    nll, n = direct_nll(model, ids, seq_len=16)

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cli.main(["--model", str(ft_init), "--data", str(text), "--seq-len", "16", "--batch-size", "3"])
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_scored"] == n and out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)

    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": TEXT}) + "\nnot json\n")
    assert load_tokens(jl, tok, ft_init).tolist() == ids
    named = tmp_path / "a.jsonl"  # another field, as --field names it (an instruction set's answers)
    named.write_text(json.dumps({"instruction": "x", "output": TEXT}) + "\n")
    assert load_tokens(named, tok, ft_init, field="output").tolist() == ids
    cli.main(["--model", str(ft_init), "--data", str(named), "--field", "output", "--seq-len", "16"])
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(nll, rel=1e-5)

    prefix = tmp_path / "shard"
    write_indexed(prefix, [np.array(ids)], dtype_for_vocab(len(tok)))
    from_shard = perplexity(model, load_tokens(bin_path(prefix), tok, ft_init), seq_len=16)
    assert from_shard["nll"] == pytest.approx(nll, rel=1e-5) and from_shard["tokens_scored"] == n


def test_bad_inputs_raise(ft_init, tmp_path):  # noqa: F811
    model, tok = load_model(ft_init)
    with pytest.raises(DataError, match="not a text file, token folder"):
        load_tokens(tmp_path / "missing.txt", tok, ft_init)
    (tmp_path / "e.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(DataError, match="e.jsonl: no JSONL line has a string `text`"):
        load_tokens(tmp_path / "e.jsonl", tok, ft_init)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        perplexity(model, np.array([1, 2, 10**6]), seq_len=8)


def test_a_missing_deploy_library_is_one_clear_line():
    from pipeline.deploy import require
    from pipeline.errors import ConfigError

    require("json", "type")  # installed: nothing happens
    with pytest.raises(
        ConfigError, match=r"^type: needs the 'no_such_lib_x' package.*pip install -e '\.\[deploy\]'"
    ):
        require("no_such_lib_x", "type")


def test_token_folder_split_and_tokenizer_check(ft_init, tmp_path):  # noqa: F811
    """A token folder's manifest is verified and its tokenizer must be the model's."""
    from dist_helpers import write_token_dir

    model, tok = load_model(ft_init)
    ids = np.array([tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False), tok.eos_token_id])
    half = len(ids) // 2
    tokens = write_token_dir(
        tmp_path / "tokens",
        {"train": [[ids[:5]]], "valid": [[ids[:half]], [ids[half:]]]},
        vocab_size=len(tok),
        tokenizer_dir=ft_init,
    )
    assert load_tokens(tokens, tok, ft_init, split="valid").tolist() == ids.tolist()
    other = write_token_dir(tmp_path / "other", {"valid": [[ids]]}, vocab_size=len(tok))  # stub tokenizer
    with pytest.raises(DataError, match="fingerprint|tokenizer"):
        load_tokens(other, tok, ft_init)
