"""Fine-tuning runs and generation.

Through the real launcher, `deepspeed --num_gpus 2 launch/finetune.py` trains LoRA adapters (ZeRO-3,
2 CPU ranks) on the real Alpaca demo set (or the shipped sample) rendered with the chat template and
packed; the loss falls, only adapter weights change, the merged export gives the adapter model's
logits and generates with plain transformers.

Resume (module scope, 4 one-process SFT runs, fp32 ZeRO-3 with gradient accumulation, early stopping
after 2 evals without improvement): `ref` runs uninterrupted (beside the others); `resumed` is killed with SIGKILL at a
random step, restarted and stopped with SIGUSR1 (checkpoint, exit 75), then restarted to the end.
Both end bit for bit equal: losses, evals, early stop, final weights and the export of the best
checkpoint. The cheap tests check the config, the prompt building and batched generation in-process.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from finetune_helpers import (  # noqa: F401
    ALPACA_EN,
    SAMPLE,
    ft_init,
    metrics_rows,
    run_finetune,
    start_finetune,
)

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.generate import Prompt, generate, generate_batch, load_model, prompt_ids, read_prompts
from pipeline.finetune.sft import format_prompt
from pipeline.finetune.trainer import total_steps

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "sft_tiny.yaml"
LORA_CONFIG = REPO / "configs" / "finetune" / "lora_chat_tiny.yaml"


@pytest.fixture(scope="module")
def init_model(ft_init):  # noqa: F811
    return ft_init


def test_config_file_loads_and_rejects_bad_init(init_model, tmp_path):
    cfg = load_config(FinetuneConfig, CONFIG, [f"init_from={init_model}"])
    assert cfg.run_dir == Path("runs/sft_tiny") and cfg.out_dir == Path("runs/sft_tiny/hf")
    assert cfg.parallel.zero_stage == 3 and cfg.train.max_steps
    with pytest.raises(ConfigError, match="init_from: .* neither a Hugging Face folder"):
        load_config(FinetuneConfig, CONFIG, [f"init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="data.valid_fraction: must be in"):
        load_config(FinetuneConfig, CONFIG, [f"init_from={init_model}", "data.valid_fraction=1.5"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(FinetuneConfig, CONFIG, [f"init_from={init_model}", "train.max_steps=0"])


def test_total_steps_and_batch_divisibility(init_model):
    cfg = load_config(
        FinetuneConfig,
        CONFIG,
        [f"init_from={init_model}", "train.max_steps=null", "train.epochs=2", "batch.global_size=8"],
    )
    assert total_steps(cfg, num_train=100, dp_size=2) == 2 * (100 // 8)
    cfg.batch.global_size = 6
    with pytest.raises(ConfigError, match="batch.global_size: must be divisible"):
        total_steps(cfg, num_train=100, dp_size=2)


def test_generate_uses_the_training_prompt_and_is_seeded(init_model):
    model, tokenizer = load_model(init_model)
    ids = prompt_ids(tokenizer, "Say hi.", input="x")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer.encode(format_prompt("Say hi.", "x"), add_special_tokens=False)
    assert prompt_ids(tokenizer, "raw text", instruction=False)[1:] == tokenizer.encode(
        "raw text", add_special_tokens=False
    )
    chat = tokenizer.decode(prompt_ids(tokenizer, "Say hi.", mode="chat"))
    assert chat == "<|bos|><|user|>\nSay hi.\n<|assistant|>\n"  # the template's generation prompt
    a = generate(model, tokenizer, "Say hi.", max_new_tokens=8, seed=1)
    assert a == generate(model, tokenizer, "Say hi.", max_new_tokens=8, seed=1)
    assert isinstance(generate(model, tokenizer, "Say hi.", max_new_tokens=4, temperature=0), str)
    with pytest.raises(DataError, match="no config.json"):
        load_model(init_model.parent)


def test_batched_generation_matches_one_by_one(init_model, tmp_path, capsys):
    """Left-padded batches give each prompt the greedy completion it gets alone; the CLI reads a file."""
    from launch import generate as cli

    model, tokenizer = load_model(init_model)
    prompts = [
        Prompt("Name a colour."),
        Prompt("", messages=(("user", "Hi"),)),
        Prompt("What does os.path.join do?"),
    ]
    batch = generate_batch(model, tokenizer, prompts, mode="chat", max_new_tokens=6, temperature=0)
    alone = [
        generate_batch(model, tokenizer, [p], mode="chat", max_new_tokens=6, temperature=0)[0]
        for p in prompts
    ]
    assert batch == alone
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Name a colour."}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert read_prompts(path)[1] == Prompt("", "", (("user", "Hi"),))
    cli.main(
        [
            "--model",
            str(init_model),
            "--chat",
            "--prompts-file",
            str(path),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["completion"] for x in lines] == batch[:2] and lines[1]["prompt"] == "Hi"
    path.write_text("not json\n")
    with pytest.raises(DataError, match="p.jsonl:1"):
        read_prompts(path)


@pytest.mark.slow
@pytest.mark.dist
def test_lora_chat_packed_through_launcher(init_model, raw_samples_or_sample, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    overrides = [
        f"init_from={init_model}",
        f"data.path={raw_samples_or_sample}",
        f"run.dir={runs}",
        "run.name=t",
        f"out={tmp_path / 'hf'}",
        "train.max_steps=24",
        "train.eval_every=8",
        # early stopping made certain: no eval can beat the first by 10 nats, so the run stops at the
        # second eval (step 16 of 24) and keeps step 8's checkpoint, which is the one exported
        "train.patience=1",
        "train.min_delta=10",
        "parallel.precision=fp32",
    ]
    proc = run_finetune(LORA_CONFIG, overrides, ranks=2, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rows = metrics_rows(runs / "t")
    data = rows[0]
    assert data["event"] == "data" and data["truncated"] > 0
    assert data["train_examples"] < data["train_examples_packed"]  # rows hold several examples
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < losses[0] - 0.15, losses  # measured (1 rank): 5.79 -> 5.56
    assert len(evals) == 2 and evals[-1] < evals[0]
    stops = [r for r in rows if r.get("event") == "early_stop"]
    assert stops == [{"event": "early_stop", "step": 16, "best_step": 8}] and rows[-1]["step"] == 16
    best = json.loads((runs / "t" / "best.json").read_text())
    assert best["tag"] == "step_8" and best["stopped_early"] and best["best"] == evals[0]
    ckpts = runs / "t" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_16"  # where the run stopped (to resume)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_16", "step_8"]  # and the best one

    init = AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    init_sd, merged_sd = init.state_dict(), merged.state_dict()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    changed = {k for k in init_sd if not torch.equal(init_sd[k], merged_sd[k])}
    assert changed and all(k.split(".")[-2] in targets for k in changed), sorted(changed)[:5]

    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(init_model, dtype=torch.float32), runs / "t" / "adapter"
    ).eval()
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )

    model, tokenizer = load_model(tmp_path / "hf")
    text = generate(model, tokenizer, "Give three tips for staying healthy.", chat=True, max_new_tokens=12)
    assert isinstance(text, str) and text == generate(
        model, tokenizer, "Give three tips for staying healthy.", chat=True, max_new_tokens=12
    )


@pytest.fixture
def raw_samples_or_sample() -> Path:
    """The real Alpaca demo file when ../shared/data/raw is there, else the shipped sample."""
    from finetune_helpers import RAW

    return RAW / ALPACA_EN if (RAW / ALPACA_EN).is_file() else SAMPLE


# ---------------------------------------------------------------- exact resume

RESUME_STEPS = 8  # early stopping ends both runs at step 6: evals at 2 (best), 4, 6 (patience 2)


def resume_overrides(init: Path, runs: Path, name: str) -> list[str]:
    return [
        f"init_from={init}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"out={runs / name / 'hf'}",
        "parallel.precision=fp32",
        "data.seq_len=64",
        "batch.global_size=4",
        "batch.micro_size=2",  # gradient accumulation 2
        f"train.max_steps={RESUME_STEPS}",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_max_batches=2",
        "train.save_every=2",
        "train.keep_last=1",
        "train.patience=2",
        "train.min_delta=10",  # no eval beats the first by 10 nats: the stop step is certain
    ]


def loss_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in metrics_rows(run_dir) if "loss" in r] if path.is_file() else []


def run_until(proc, run_dir: Path, done, what: str, log: Path, timeout: float = 400) -> None:
    """Wait until done(steps logged so far) holds; fail with the process output if it ends first."""
    deadline = time.monotonic() + timeout
    while not done(loss_steps(run_dir)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{what}: rc={proc.returncode}\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def finished(proc, log: Path, timeout: float = 600) -> str:
    """Wait for the process; its output."""
    proc.wait(timeout=timeout)
    return log.read_text()


@pytest.fixture(scope="module")
def resumed_runs(init_model, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("ft_resume")
    logs = {k: runs / f"{k}.log" for k in ("ref", "first", "second")}
    ref = start_finetune(CONFIG, resume_overrides(init_model, runs, "ref"), logs["ref"])  # beside the chain
    args, run_dir = resume_overrides(init_model, runs, "resumed"), runs / "resumed"
    slow = {"GRISTMILL_FAULTS": "step_sleep=0.4"}  # room to act between steps; numerics unchanged
    kill_at = random.SystemRandom().choice([3, 4])
    first = start_finetune(CONFIG, args, logs["first"], env=slow)
    run_until(
        first, run_dir, lambda s: s and max(s) >= kill_at, f"attempt 1 (kill at {kill_at})", logs["first"]
    )
    first.kill()  # SIGKILL: no handler runs, the latest complete checkpoint is all that survives
    first.wait()
    before = len(loss_steps(run_dir))
    second = start_finetune(CONFIG, args, logs["second"], env=slow)
    run_until(second, run_dir, lambda s: len(s) > before, "attempt 2", logs["second"])
    second.send_signal(signal.SIGUSR1)
    out2 = finished(second, logs["second"])
    preempted = json.loads((run_dir / "status.json").read_text())
    third = run_finetune(CONFIG, args)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-5000:]
    out = finished(ref, logs["ref"])
    assert ref.returncode == 0, out[-5000:]
    return {"runs": runs, "kill_at": kill_at, "rc2": second.returncode, "out2": out2, "preempted": preempted}


def last_per_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics_rows(run_dir) if key in r}


@pytest.mark.slow
@pytest.mark.dist
def test_killed_and_signalled_finetune_resumes_bit_for_bit(resumed_runs):
    from safetensors.torch import load_file

    from pipeline.runtime.engine import lazy_state_dict

    runs, kill_at = resumed_runs["runs"], resumed_runs["kill_at"]
    ref, got = runs / "ref", runs / "resumed"
    assert resumed_runs["rc2"] == 75, resumed_runs["out2"][-3000:]
    assert "resumed from step_" in resumed_runs["out2"]
    pre = resumed_runs["preempted"]
    assert pre["status"] == "preempted" and pre["signal"] == signal.SIGUSR1 and 3 <= pre["step"] < 6
    assert sorted(last_per_step(ref, "loss")) == list(range(1, 7))  # early stop at 6 of 8
    for key in ("loss", "eval_loss", "lr", "grad_norm"):
        assert last_per_step(got, key) == last_per_step(ref, key), (key, kill_at)
    assert len(loss_steps(got)) > 6  # steps after the last checkpoint ran again after the kill
    best_ref, best_got = (json.loads((r / "best.json").read_text()) for r in (ref, got))
    assert best_got == best_ref and best_ref["tag"] == "step_2" and best_ref["stopped_early"]
    status = json.loads((got / "status.json").read_text())
    assert (status["status"], status["step"], status["best_checkpoint"]) == ("completed", 6, "step_2")
    a, b = (lazy_state_dict(r / "checkpoints", "step_6") for r in (ref, got))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].contiguous(), b[name].contiguous()), (name, kill_at)
    x, y = (load_file(r / "hf" / "model.safetensors") for r in (ref, got))  # both export step_2
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.dist
def test_finetune_metrics_make_the_report(resumed_runs, tmp_path):
    from pipeline.runtime.report import render_report

    rows = metrics_rows(resumed_runs["runs"] / "resumed")
    assert sum(r.get("event") == "data" for r in rows) == 3  # one accounting row per start
    train = [r for r in rows if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["skipped_nonfinite"] == 0 for r in train)
    assert render_report(resumed_runs["runs"] / "resumed", tmp_path / "r.png").stat().st_size > 0
