"""The whole chain of README command (a) on the shipped sample, through the real entry points:
Ray data prep -> SentencePiece -> Megatron token shards -> DeepSpeed ZeRO-3 pretraining on 2 CPU
ranks -> SFT -> Hugging Face export -> generation. Outputs go to a temporary directory; the steps
are fewer than the sample configs ask for, the code paths are the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import REPO, run_launcher

from pipeline.data.indexed import IndexedDataset
from pipeline.data.manifest import load_manifest, verify_manifest
from pipeline.io import read_jsonl_zst

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.ray]

PRETRAIN_STEPS = 30
SFT_STEPS = 8


def python(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def deepspeed(*args: str) -> None:
    proc = run_launcher(list(args), timeout=400)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    data = ["--config", "configs/data/wiki_sample.yaml", f"output_dir={root}/out", "ray.num_cpus=2"]
    python("launch/prepare_data.py", *data, "steps=[clean]")
    python(
        "launch/train_tokenizer.py",
        "--config",
        "configs/tokenizer/wiki_sample.yaml",
        f"inputs=[{root}/out/cleaned]",
        f"output_root={root}/tok",
    )
    python("launch/prepare_data.py", *data, f"tokenize.tokenizer={root}/tok/wiki_sample")
    deepspeed(
        "launch/pretrain.py",
        "--config",
        "configs/pretrain/wiki_sample.yaml",
        f"data.tokens={root}/out/tokens",
        f"run.dir={root}/runs",
        f"train.max_steps={PRETRAIN_STEPS}",
        "train.log_every=5",
        f"train.eval_every={PRETRAIN_STEPS}",
        f"train.save_every={PRETRAIN_STEPS}",
    )
    deepspeed(
        "launch/finetune.py",
        "--config",
        "configs/finetune/sft_sample.yaml",
        f"init_from={root}/runs/wiki_sample",
        f"out={root}/sft/hf",
        f"run.dir={root}/runs",
        f"train.max_steps={SFT_STEPS}",
        f"train.eval_every={SFT_STEPS}",
    )
    return root


def test_token_shards_decode_back_to_the_cleaned_text(chain):
    from transformers import AutoTokenizer

    cleaned = sorted(
        row["text"] for f in (chain / "out/cleaned").glob("*.jsonl.zst") for row in read_jsonl_zst(f)
    )
    assert len(cleaned) > 200
    tokens = chain / "out/tokens"
    manifest = verify_manifest(tokens)
    assert manifest == load_manifest(tokens)
    tok = AutoTokenizer.from_pretrained(chain / "tok/wiki_sample")
    decoded = []
    for split in manifest["splits"].values():
        for entry in split:
            ds = IndexedDataset(tokens / entry["prefix"])
            for i in range(len(ds)):
                ids = ds[i].tolist()
                assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
                decoded.append(tok.decode(ids[:-1]))
    assert sorted(decoded) == cleaned


def test_pretraining_loss_fell_and_a_checkpoint_was_saved(chain):
    run = chain / "runs/wiki_sample"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= PRETRAIN_STEPS // 5
    assert losses[-1] < losses[0] - 0.5, losses
    assert (run / "checkpoints" / f"step_{PRETRAIN_STEPS}").is_dir()
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{PRETRAIN_STEPS}"


def test_finetuned_export_loads_and_generates(chain):
    """The export generates real tokens: the greedy continuation of generate.py's prompt, token by
    token from the model's own logits, no special or unknown tokens in it, and generate.py prints
    exactly its text."""
    import torch

    from pipeline.finetune.generate import load_model, prompt_ids

    hf = chain / "sft/hf"
    model, tok = load_model(hf)
    prompt = "What is json for?"
    ids = prompt_ids(tok, prompt, mode="instruction")
    new: list[int] = []
    with torch.no_grad():
        for _ in range(16):  # greedy decoding by hand: argmax of the last position's logits
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert new, "the model's first greedy token is EOS"
    special = {tok.unk_token_id, tok.bos_token_id, tok.pad_token_id}
    assert not special & set(new) and max(new) < len(tok), new
    text = python(
        "launch/generate.py",
        "--model",
        str(hf),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    )
    assert text.strip() == tok.decode(new, skip_special_tokens=True).strip()
