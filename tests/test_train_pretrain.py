"""End to end through the real `deepspeed` launcher on 2 CPU ranks (ZeRO-3): the loss falls, the
checkpoint layout and `latest` are right, a resumed run continues exactly like an uninterrupted
one, and the HF export reproduces the run's validation loss. Plus `--check`, which starts nothing.

Three launcher runs in all (about 20 s each on 2 cores; the first one on a fresh machine also
builds DeepSpeed's shm op, ~30 s). fp32 so that resume and export can be compared tightly.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from dist_helpers import REPO, encode_docs, make_tokenizer_dir, run_launcher, tiny_corpus, write_token_dir

from pipeline.train.metrics import read_metrics

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A real SentencePiece tokenizer and token shards (2 train shards, 1 valid) from 400 tiny documents."""
    root = tmp_path_factory.mktemp("corpus")
    texts = tiny_corpus(400)
    tok = make_tokenizer_dir(root / "tokenizer", texts, vocab_size=300)
    docs = encode_docs(tok, texts)
    splits = {"train": [docs[:200], docs[200:380]], "valid": [docs[380:]]}
    return write_token_dir(root / "tokens", splits, vocab_size=300, tokenizer_dir=tok)


def overrides(corpus: Path, runs: Path, name: str, max_steps: int, *extra: str) -> list[str]:
    return [
        f"data.tokens={corpus}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"train.max_steps={max_steps}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "parallel.precision=fp32",
        "optim.warmup_steps=2",
        "optim.schedule_steps=8",
        "train.log_every=1",
        "train.eval_every=4",
        "train.save_every=4",
        "train.eval_batches=2",
        *extra,
    ]


def launch(args: list[str]) -> None:
    proc = run_launcher(["launch/pretrain.py", "--config", str(TINY_CPU), *args], timeout=400)
    if proc.returncode != 0:
        pytest.fail(
            f"launcher rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    """`split`: 4 steps, then resumed to 8 with keep_last=1; `full`: 8 steps uninterrupted."""
    runs = tmp_path_factory.mktemp("runs")
    launch(overrides(corpus, runs, "split", 4))
    launch(overrides(corpus, runs, "split", 8, "train.keep_last=1"))
    launch(overrides(corpus, runs, "full", 8))
    return runs


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
@pytest.mark.dist
def test_loss_falls_and_metrics_rows(runs):
    rows = read_metrics(runs / "full")
    train = losses(runs / "full")
    assert sorted(train) == list(range(1, 9))
    assert train[8] < train[1] - 0.3, train
    assert {"lr", "tokens", "samples", "tokens_per_s", "elapsed_s"} <= set(rows[0])
    assert rows[-2]["tokens"] == 8 * 8 * 128  # steps x global batch x seq_len, every token a target
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(math.exp(evals[1]["eval_loss"]))


@pytest.mark.slow
@pytest.mark.dist
def test_checkpoint_layout_and_latest(runs):
    root = runs / "split" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_8"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_8"]  # keep_last=1 pruned step_4
    files = {p.name for p in (root / "step_8").iterdir()}
    for r in (0, 1):
        assert f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" in files
        assert f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in files
        assert f"rng_rank{r}.pt" in files
    state = json.loads((root / "step_8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["consumed_samples"] == 64 and state["consumed_tokens"] == 64 * 128
    assert (runs / "split" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_resume_continues_exactly(runs):
    split, full = losses(runs / "split"), losses(runs / "full")
    assert sorted(split) == list(range(1, 9))
    for step in range(1, 9):
        assert split[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.dist
def test_export_reproduces_eval_loss(runs, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.export import export_hf
    from pipeline.train.loader import TokenLoader, open_split

    out = export_hf(runs / "split", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    valid = TokenLoader(open_split(corpus, "valid"), 128, seed=1234, shuffle=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for mb in valid.micro_batches(0, 2 * 8, 2, 0, 1):  # eval_batches x global_size samples
            logits = model(input_ids=mb["input_ids"]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), mb["shift_labels"].reshape(-1), reduction="sum"
                )
            )
            n += mb["shift_labels"].numel()
    run_eval = [r["eval_loss"] for r in read_metrics(runs / "split") if "eval_loss" in r][-1]
    assert total / n == pytest.approx(run_eval, abs=1e-4)


def test_check_prints_the_plan(corpus, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = importlib.util.spec_from_file_location("launch_pretrain", REPO / "launch" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(
        [
            "--config",
            str(TINY_CPU),
            f"data.tokens={corpus}",
            f"model.file={REPO / 'configs/model/tiny.yaml'}",
            "--check",
            "--local_rank=0",
        ]
    )
    out = capsys.readouterr().out
    assert "global 8 = micro 2 x dp 2 x grad accum 2" in out and "vocab 300" in out
    assert not torch.distributed.is_initialized()
