"""DPO and the PEFT methods in the one training loop.

One spawned process group of 2 CPU ranks (ZeRO-3, fp32) runs `finetune(cfg)` for every case in turn
(the module fixture), and the tests read what the runs left behind:
- each PEFT method (LoRA with DPO, IA3 and prompt tuning with SFT, prefix tuning with DPO) trains
  its own parameters and nothing else: its checkpoints hold only those, every one of them moves,
  the merged export (LoRA, IA3) differs from the starting weights only in the adapted layers, the
  unmerged one (prefix, prompt) keeps them bit for bit, and each export, reloaded the way a user
  would (generate.load_model: transformers + peft for an adapter), gives the training model's logits;
- DPO (full weights and LoRA) raises the reward margin on held-out pairs and logs rewards in
  metrics.jsonl; a LoRA DPO run stopped after 3 steps and started again ends bit for bit where an
  uninterrupted one does (its checkpoints hold only the adapters), reading the reference
  log-probs it wrote instead of recomputing them.
The cheap tests build the DPO task in-process and check the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks
from finetune_helpers import ft_init, ft_tok, metrics_rows  # noqa: F401  (fixtures)

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.finetune.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "sample"
SFT, DPO = "configs/finetune/sft_tiny.yaml", "configs/finetune/dpo_tiny.yaml"
OWN = {  # names of each method's parameters
    "lora": (".lora_A.", ".lora_B."),
    "ia3": (".ia3_l.",),
    "prefix": ("prompt_encoder.",),
    "prompt": ("prompt_encoder.",),
}
METHOD_RUNS = {"lora": "dpo_lora", "ia3": "sft_ia3", "prefix": "dpo_prefix", "prompt": "sft_prompt"}


def head(src: Path, dst: Path, n: int) -> Path:
    """The first n lines of a JSONL file (small data: each case costs seconds, not minutes)."""
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def cases(init: Path, runs: Path) -> list[tuple[str, list[str]]]:
    """(config, overrides) of every run, in order; dpo_resumed runs twice (stopped at 3, then to 6),
    dpo_lora is its uninterrupted twin."""
    sft_data, dpo_data = head(SAMPLE / "instructions.jsonl", runs / "sft.jsonl", 64), runs / "dpo.jsonl"
    head(SAMPLE / "preferences.jsonl", dpo_data, 96)
    common = [f"init_from={init}", f"run.dir={runs}", "parallel.precision=fp32", "parallel.zero_stage=3"]
    common += ["batch.global_size=4", "batch.micro_size=1", "data.seq_len=64", "train.log_every=1"]
    common += ["train.eval_max_batches=4", "train.progress=false", "optim.warmup_steps=0", "optim.lr=1e-2"]

    def run(config: str, name: str, *extra: str) -> tuple[str, list[str]]:
        data = sft_data if config == SFT else dpo_data
        return config, [*common, f"data.path={data}", f"run.name={name}", f"out={runs / name / 'hf'}", *extra]

    short = ["train.max_steps=3", "train.save_every=1", "train.keep_last=3", "train.eval_every=3"]
    held_out = ["data.valid_fraction=0.25", "train.eval_max_batches=null"]  # ~20 pairs
    six = [*held_out, "method=lora", "optim.schedule_steps=6", "train.eval_every=3", "train.save_every=3"]
    return [
        run(SFT, "sft_ia3", "method=ia3", *short),
        run(DPO, "dpo_prefix", "method=prefix", *short, *held_out),
        run(SFT, "sft_prompt", "method=prompt", *short),
        run(DPO, "dpo_full", "method=full", "optim.lr=3e-4", *short, *held_out),
        run(DPO, "dpo_lora", "train.max_steps=6", *six),
        run(DPO, "dpo_resumed", "train.max_steps=3", *six),
        run(DPO, "dpo_resumed", "train.max_steps=6", *six),
    ]


def train_all(rank: int, world_size: int, jobs: list[tuple[str, list[str]]], runs: str) -> None:
    """One rank of the process group: every case in turn, as launch/finetune.py runs one."""
    from pipeline import dist
    from pipeline.finetune.trainer import finetune

    seen = []
    for config, overrides in jobs:
        cfg = load_config(FinetuneConfig, REPO / config, overrides)
        result = finetune(cfg)
        assert result.status == "completed", (cfg.run.name, result.status)
        ref = cfg.run_dir / "dpo_reference.pt"
        seen.append([cfg.run.name, ref.stat().st_mtime_ns if ref.is_file() else None])
    if rank == 0:
        Path(runs, "seen.json").write_text(json.dumps(seen))
    dist.shutdown()


@pytest.fixture(scope="module")
def runs(ft_init, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("ft_tasks")
    run_ranks(train_all, 2, timeout=600, jobs=cases(ft_init, root), runs=str(root))
    return root


def states(run_dir: Path) -> tuple[dict, dict]:
    """The consolidated states of a run's first and last kept checkpoints (name -> fp32 tensor)."""
    from pipeline.runtime.engine import consolidated_state_dict

    tags = sorted((p.name for p in (run_dir / "checkpoints").glob("step_*")), key=lambda t: int(t[5:]))
    return tuple(consolidated_state_dict(run_dir / "checkpoints", t) for t in (tags[0], tags[-1]))


def exported_tag(run_dir: Path) -> str:
    status = json.loads((run_dir / "status.json").read_text())
    return status.get("best_checkpoint", status["checkpoint"])


def check_export_reloads(run_dir: Path) -> None:
    """The export as a user loads it gives the training model's logits on the recorded batch."""
    from pipeline.finetune.generate import load_model

    parity = torch.load(run_dir / "checkpoints" / exported_tag(run_dir) / "parity.pt", weights_only=True)
    model, _ = load_model(run_dir / "hf")
    with torch.no_grad():
        got = model(input_ids=parity["input_ids"]).logits
    torch.testing.assert_close(got, parity["logits"], atol=2e-4, rtol=1e-4)


@pytest.mark.dist
@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_peft_method_trains_only_its_parameters_and_exports(method, runs, ft_init):  # noqa: F811
    from safetensors.torch import load_file

    run_dir = runs / METHOD_RUNS[method]
    first, last = states(run_dir)
    assert first.keys() == last.keys() and first  # the checkpoint holds what trains, and nothing frozen
    assert all(any(tag in k for tag in OWN[method]) for k in last), sorted(last)[:4]
    assert [k for k in last if torch.equal(first[k], last[k])] == []  # every one of them moved
    init = load_file(ft_init / "model.safetensors")
    out = load_file(run_dir / "hf" / "model.safetensors")
    changed = {k for k in init if not torch.equal(init[k], out[k])}
    if method in ("lora", "ia3"):  # merged: only the adapted layers' weights differ from the start
        targets = {"lora": ("_proj",), "ia3": ("k_proj", "v_proj", "down_proj")}[method]
        assert changed and all(k.split(".")[-2].endswith(targets) for k in changed), sorted(changed)
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    else:  # base + adapter: the base is the starting model, bit for bit
        assert out.keys() == init.keys() and not changed
        assert (run_dir / "hf" / "adapter" / "adapter_model.safetensors").is_file()
    check_export_reloads(run_dir)


def evals(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_rows(run_dir) if "eval_loss" in r}


@pytest.mark.dist
@pytest.mark.parametrize("name", ["dpo_full", "dpo_lora"])
def test_dpo_raises_the_held_out_margin_and_logs_rewards(name, runs):
    rows = metrics_rows(runs / name)
    data = rows[0]
    assert data["event"] == "data" and data["records"] == 96 and data["valid_examples"] >= 12
    train = [r for r in rows if "loss" in r]
    assert all(
        {"reward_accuracy", "reward_margin", "reward_chosen", "logp_rejected"} <= r.keys() for r in train
    )
    by_step = evals(runs / name)
    last = by_step[max(by_step)]
    # the reference is the starting model, so every margin starts at exactly 0
    assert last["eval_pairs"] == data["valid_examples"]
    assert last["eval_reward_margin"] > 0 and last["eval_reward_accuracy"] > 0.5, last
    if name == "dpo_lora":
        assert last["eval_reward_margin"] > by_step[3]["eval_reward_margin"] > 0
    else:
        check_export_reloads(runs / name)


@pytest.mark.dist
def test_dpo_stopped_and_restarted_ends_bit_for_bit_equal(runs):
    from safetensors.torch import load_file

    from pipeline.runtime.engine import consolidated_state_dict

    ref, got = runs / "dpo_lora", runs / "dpo_resumed"
    for key in ("loss", "eval_loss", "reward_margin", "eval_reward_margin", "grad_norm", "lr"):
        want = {r["step"]: r[key] for r in metrics_rows(ref) if key in r}
        assert {r["step"]: r[key] for r in metrics_rows(got) if key in r} == want and want, key
    a, b = (consolidated_state_dict(r / "checkpoints", "step_6") for r in (ref, got))  # the LoRA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, y = (load_file(r / "hf" / "model.safetensors") for r in (ref, got))  # both export the best
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert (ref / "dpo_reference.pt").read_bytes() == (got / "dpo_reference.pt").read_bytes()
    # the reference file's mtime after the stop and after the restart: read again, not rewritten
    mtimes = [m for name, m in json.loads((runs / "seen.json").read_text()) if name == "dpo_resumed"]
    assert len(mtimes) == 2 and mtimes[0] is not None and mtimes[0] == mtimes[1]


# ---------------------------------------------------------------- in process


def test_dpo_task_builds_and_batches_pairs_by_step(ft_init, ft_tok, tmp_path):  # noqa: F811
    from pipeline.finetune.tasks import TASKS, build_task

    path = tmp_path / "p.jsonl"
    lines = (SAMPLE / "preferences.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path.write_text("\n".join([*lines, "{oops", '{"prompt": "p", "chosen": "a"}']) + "\n", encoding="utf-8")
    cfg = load_config(
        FinetuneConfig,
        REPO / DPO,
        [f"init_from={ft_init}", f"data.path={path}", "data.seq_len=64", "batch.global_size=4"],
    )
    assert TASKS["dpo"].name == "dpo"
    t = build_task(cfg, ft_init, ft_tok)
    info = t.info
    assert info["records"] == 40 and info["bad_json"] == info["missing_chosen_or_rejected"] == 1
    assert info["train_examples"] + info["valid_examples"] + info.get("prompt_too_long", 0) == 40
    whole = t.micro_batches(2, 0, 1)  # one rank: the global batch of step 2, micro batches of 2 pairs
    halves = t.micro_batches(2, 0, 2) + t.micro_batches(2, 1, 2)
    assert [b["input_ids"].shape for b in whole] == [(4, 64)] * 2  # 2 pairs = chosen rows, then rejected
    key = lambda b: sorted(map(tuple, b["input_ids"].tolist()))  # noqa: E731
    assert sorted(r for b in halves for r in key(b)) == sorted(r for b in whole for r in key(b))
    assert sum(t.count_targets(b) for b in whole) == 4 and "ref_chosen" not in whole[0]  # not set up yet


def test_config_takes_every_method_and_names_bad_keys(ft_init, tmp_path):  # noqa: F811
    from pipeline.finetune.trainer import prepare

    for method in ("full", "lora", "qlora", "prefix", "prompt", "ia3"):
        cfg = load_config(FinetuneConfig, REPO / DPO, [f"init_from={ft_init}", f"method={method}"])
        assert (cfg.task, cfg.method) == ("dpo", method) and not hasattr(cfg, "lora")
    with pytest.raises(ConfigError, match=r"lora: unknown key"):
        load_config(FinetuneConfig, None, [f"init_from={ft_init}", "lora.rank=4"])
    with pytest.raises(ConfigError, match="data.pack: packing is for sft"):
        load_config(FinetuneConfig, REPO / DPO, [f"init_from={ft_init}", "data.pack=true"])
    if not torch.cuda.is_available():  # refused before any data is read or model built
        cfg = load_config(
            FinetuneConfig, REPO / DPO, [f"init_from={ft_init}", "method=qlora", "data.path=nope"]
        )
        with pytest.raises(ConfigError, match="method: qlora .* needs a CUDA GPU"):
            prepare(cfg)
