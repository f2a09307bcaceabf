"""End to end on CPU, fp32 ZeRO-3 unless said otherwise, so numbers can be compared tightly.

Runs (module scope; 4 launcher runs of about 15-20 s on 2 cores, 3 one-process runs of ~8 s):
  full      2 ranks, micro 2 x grad accum 2, 8 steps uninterrupted, lm-eval tasks at steps 4 and 8
  split     2 ranks, SIGUSR1 to rank 0 only at step >= 2: every rank stops, saves, exits 75;
            then resumed on 2 ranks to step 8 (keep_last=1)
  one       1 rank, micro 1 x grad accum 8, activation checkpointing   (1 rank == 2 ranks)
  one_big   1 rank, micro 8 x grad accum 1      (accumulation 8 x 1 == 1 x 8)
  shrink    split's preemption checkpoint resumed on 1 rank (universal checkpoint)
  tp        2 ranks, AutoTP 2 with ZeRO-1: sharded weights, same loss as unsharded; then fine-tuned
            from (2 ranks, bf16 ZeRO-2) with rank 0's init export slower than the collective timeout
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from dist_helpers import (
    REPO,
    check,
    free_port,
    launcher_cmd,
    make_corpus,
    read_losses,
    remove_shm,
    run_launcher,
    run_single,
    worker_env,
)

from pipeline.runtime.faults import REQUEUE_EXIT_CODE
from pipeline.runtime.metrics import read_metrics

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
STEPS = 8
TASKS, TASK_LIMIT = ["gristmill_cloze", "gristmill_ppl"], 16
EVAL_TASKS = (  # lm-eval in the loop of `full` (at steps 4 and 8): `split` has none and must equal it
    f"train.eval_tasks=[{','.join(TASKS)}]",
    "train.eval_tasks_every=4",
    f"train.eval_tasks_limit={TASK_LIMIT}",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def overrides(corpus: Path, runs: Path, name: str, max_steps: int = STEPS, *extra: str) -> list[str]:
    return [
        "launch/pretrain.py",
        "--config",
        str(TINY_CPU),
        f"data.tokens={corpus}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"train.max_steps={max_steps}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "parallel.precision=fp32",
        "optim.warmup_steps=2",
        f"optim.schedule_steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=4",
        "train.save_every=4",
        "train.eval_batches=2",
        *extra,
    ]


def preempted_run(args: list[str], run_dir: Path, at_step: int = 2, timeout: int = 600) -> int:
    """Launch 2 ranks, send SIGUSR1 to rank 0's worker only once `at_step` is logged; the runner's rc."""
    port = free_port()
    env = worker_env({"GRISTMILL_FAULTS": "step_sleep=0.4"})  # room to signal mid-run
    proc = subprocess.Popen(
        launcher_cmd(args, 2, port),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
            if steps and max(steps) >= at_step:
                break
            time.sleep(0.1)
        rank0 = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "--local_rank=0" in " ".join(p.cmdline())
        ]
        assert rank0, "rank 0 worker not found"
        rank0[0].send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        remove_shm(port)
    if proc.returncode != REQUEUE_EXIT_CODE:
        pytest.fail(f"rc={proc.returncode}, want {REQUEUE_EXIT_CODE}\n{out[-4000:]}")
    return proc.returncode


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    check(run_launcher(overrides(corpus, runs, "full", STEPS, *EVAL_TASKS), timeout=400))
    preempted_run(overrides(corpus, runs, "split"), runs / "split")
    status = json.loads((runs / "split" / "status.json").read_text())
    k, root = status["step"], runs / "split" / "checkpoints"
    seen = {
        "status": status,
        "latest": (root / "latest").read_text().strip(),
        "files": sorted(p.name for p in (root / f"step_{k}").iterdir()),
    }
    (runs / "preempted.json").write_text(json.dumps(seen))
    shutil.copytree(runs / "split", runs / "shrink")  # the preemption checkpoint, before the resume
    (runs / "shrink" / "metrics.jsonl").unlink()
    check(run_launcher(overrides(corpus, runs, "split", STEPS, "train.keep_last=1"), timeout=400))
    check(
        run_single(
            overrides(
                corpus, runs, "one", STEPS, "batch.micro_size=1", "parallel.activation_checkpointing=true"
            )
        )
    )
    check(run_single(overrides(corpus, runs, "one_big", STEPS, "batch.micro_size=8")))
    shrink = run_single(overrides(corpus, runs, "shrink"))
    check(shrink)
    (runs / "shrink.log").write_text(shrink.stderr)
    return runs


@pytest.mark.slow
@pytest.mark.dist
def test_loss_falls_and_metrics_rows(runs):
    rows = read_metrics(runs / "full")
    train = read_losses(runs / "full")
    assert sorted(train) == list(range(1, STEPS + 1))
    assert train[8] < train[1] - 0.3, train
    keys = {
        "lr",
        "grad_norm",
        "tokens",
        "samples",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
        "data_wait_s",
        "mem_peak_mib",
        "skipped_nonfinite",
        "elapsed_s",
    }
    assert keys <= set(rows[0])
    assert rows[0]["mfu"] == "n/a"  # a CPU is not in the peak table: no made-up MFU
    assert rows[0]["mem_peak_mib"] > 0 and rows[0]["tflops_per_device"] > 0
    last = [r for r in rows if "loss" in r][-1]
    assert last["tokens"] == 8 * 8 * 128 and last["skipped_nonfinite"] == 0  # every token a target
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    saves = [r for r in rows if r.get("event") == "checkpoint"]  # each save's duration (preemption lead time)
    assert [(r["step"], r["tag"]) for r in saves] == [(4, "step_4"), (8, "step_8")]
    assert all(0 < r["save_s"] < 300 for r in saves)
    assert evals[1]["eval_ppl"] == pytest.approx(math.exp(evals[1]["eval_loss"]))
    assert json.loads((runs / "full" / "status.json").read_text())["status"] == "completed"
    layout = json.loads((runs / "full" / "layout.json").read_text())
    assert layout["zero_stage"] == 3 and layout["born_partitioned"] is True  # built under zero.Init


@pytest.mark.slow
@pytest.mark.dist
def test_signal_to_one_rank_stops_all_with_a_checkpoint(runs):
    seen = json.loads((runs / "preempted.json").read_text())
    k = seen["status"]["step"]
    assert 2 <= k < STEPS and seen["latest"] == f"step_{k}"
    assert seen["status"]["status"] == "preempted" and seen["status"]["exit_code"] == REQUEUE_EXIT_CODE
    assert seen["status"]["signal"] == signal.SIGUSR1 and seen["status"]["checkpoint"] == f"step_{k}"
    for r in (0, 1):  # both ranks wrote their shards: rank 1 stopped on rank 0's signal
        assert f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in seen["files"]
        assert f"rng_rank{r}.pt" in seen["files"]


@pytest.mark.slow
@pytest.mark.dist
def test_checkpoint_layout_and_latest(runs):
    root = runs / "split" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_8"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_8"]  # keep_last=1 pruned the rest
    files = {p.name for p in (root / "step_8").iterdir()}
    for r in (0, 1):
        assert f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" in files
        assert f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in files
        assert f"rng_rank{r}.pt" in files
    assert "parity.pt" in files
    state = json.loads((root / "step_8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["consumed_samples"] == 64 and state["consumed_tokens"] == 64 * 128
    assert (state["world_size"], state["dp_size"], state["global_batch"], state["seq_len"]) == (2, 2, 8, 128)
    assert state["lr_schedule"]["total_steps"] == STEPS and state["loss_scale"] == 1.0
    assert (runs / "split" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_resume_is_bit_identical(runs):
    from pipeline.runtime.engine import lazy_state_dict

    split, full = read_losses(runs / "split"), read_losses(runs / "full")
    assert sorted(split) == list(range(1, STEPS + 1))
    assert split == full  # exact: same floats at every step, before and after the stop
    a = lazy_state_dict(runs / "split" / "checkpoints", "step_8")
    b = lazy_state_dict(runs / "full" / "checkpoints", "step_8")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].contiguous(), b[name].contiguous()), name


@pytest.mark.slow
@pytest.mark.dist
def test_rank_count_and_accumulation_do_not_change_the_loss(runs):
    full, one, big = (read_losses(runs / n) for n in ("full", "one", "one_big"))
    assert json.loads((runs / "one" / "layout.json").read_text())["activation_checkpointing"] is True
    for step in range(1, STEPS + 1):
        # 1 rank (8 x 1, recomputing activations) vs 2 ranks (2 x 2 x 2)
        assert one[step] == pytest.approx(full[step], rel=1e-5), step
        assert big[step] == pytest.approx(one[step], rel=1e-5), step  # accumulation 8 x 1 vs 1 x 8


@pytest.mark.slow
@pytest.mark.dist
def test_resume_two_ranks_on_one(runs):
    k = json.loads((runs / "preempted.json").read_text())["status"]["step"]
    shrink, full = read_losses(runs / "shrink"), read_losses(runs / "full")
    assert sorted(shrink) == list(range(k + 1, STEPS + 1))
    for step in shrink:
        assert shrink[step] == pytest.approx(full[step], rel=1e-5), step
    root = runs / "shrink" / "checkpoints"
    assert f"converting {root / f'step_{k}'} to a universal checkpoint" in (runs / "shrink.log").read_text()
    state = json.loads((root / "step_8" / "trainer_state.json").read_text())
    assert (state["world_size"], state["dp_size"], state["consumed_samples"]) == (1, 1, 64)


@pytest.mark.slow
@pytest.mark.dist
def test_export_parity_and_eval_loss(runs, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.export import export_hf
    from pipeline.train.loader import TokenLoader, open_split

    out = export_hf(runs / "split", tmp_path / "hf", max_shard_bytes=200_000)  # several shards
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.model",
    } <= names
    assert not {"spm.vocab", "trainer_state.json"} & names  # allow-listed tokenizer files only
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


@pytest.mark.slow
@pytest.mark.dist
def test_in_loop_eval_tasks_equal_the_harness_on_the_export(runs, tmp_path):
    """lm-eval tasks run in the loop of a 2-rank ZeRO-3 run (every rank in lockstep) give, at the last
    step, what the harness gives on the exported folder; training is unchanged by them
    (test_resume_is_bit_identical compares `full` with `split`, which runs none)."""
    from pipeline.deploy.harness import evaluate_folder
    from pipeline.train.export import export_hf

    rows = [r for r in read_metrics(runs / "full") if "gristmill_cloze/acc" in r]
    assert [r["step"] for r in rows] == [4, 8]
    want = evaluate_folder(export_hf(runs / "full", tmp_path / "hf"), TASKS, limit=TASK_LIMIT)
    assert set(want) == set(rows[1]) - {"step"} and "gristmill_ppl/bits_per_byte" in want
    for key, value in want.items():
        assert rows[1][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
@pytest.mark.dist
def test_export_fails_on_logit_mismatch(runs, tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.train.export import export_hf

    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    parity = run / "checkpoints" / "step_8" / "parity.pt"
    ref = torch.load(parity, weights_only=True)
    ref["logits"][0, 0, 0] += 1.0  # the "training model" disagrees with what was saved
    torch.save(ref, parity)
    with pytest.raises(CheckpointError, match="differ from the training model"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def tp_run(corpus, runs) -> Path:
    """AutoTP 2 (ZeRO-1, untied embeddings: AutoTP splits lm_head) and the same model unsharded on 1 rank."""
    tp = ("parallel.zero_stage=1", "model.overrides.tie_embeddings=false")
    check(run_launcher(overrides(corpus, runs, "tp", 4, "parallel.tp_size=2", *tp), timeout=400))
    check(run_single(overrides(corpus, runs, "tp_ref", 4, *tp)))
    return runs / "tp"


@pytest.mark.slow
@pytest.mark.dist
def test_autotp_shards_and_matches_unsharded(tp_run, runs, tmp_path):
    from pipeline.train.export import export_hf

    layout = json.loads((tp_run / "layout.json").read_text())
    assert (layout["tp_size"], layout["dp_size"], layout["zero_stage"]) == (2, 1, 1)
    assert layout["born_partitioned"] is False  # ZeRO-1: full weights, then AutoTP slices them
    assert set(layout["built"]["dtypes"]) == {"float32"}  # the training precision, before DeepSpeed
    shapes = {k.split("layers.0.")[-1]: v for k, v in layout["params"].items() if "layers.0." in k}
    # tiny: hidden 64, 4 heads of 16, 2 kv heads, SwiGLU 192 -> halves of the output (column) or input (row) dim
    assert shapes["self_attn.q_proj.weight"] == [32, 64] and shapes["self_attn.k_proj.weight"] == [16, 64]
    assert shapes["mlp.gate_proj.weight"] == [96, 64] and shapes["mlp.up_proj.weight"] == [96, 64]
    assert shapes["self_attn.o_proj.weight"] == [64, 32] and shapes["mlp.down_proj.weight"] == [64, 96]
    assert shapes["self_attn.v_proj.weight"] == [16, 64]
    params = layout["params"]
    assert params["lm_head.weight"] == [150, 64] and params["model.embed_tokens.weight"] == [300, 64]
    tp, ref = read_losses(tp_run), read_losses(runs / "tp_ref")
    assert sorted(tp) == [1, 2, 3, 4]
    for step in tp:  # the same model and batches, unsharded on 1 rank (ZeRO-1 initialises like AutoTP)
        assert tp[step] == pytest.approx(ref[step], rel=1e-5), step
    out = export_hf(tp_run, tmp_path / "hf")  # through the universal format; logits parity checked inside
    assert (out / "model.safetensors").is_file()


def test_check_prints_the_plan(corpus, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = importlib.util.spec_from_file_location("launch_pretrain", REPO / "launch" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = [
        "--config",
        str(TINY_CPU),
        f"data.tokens={corpus}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
    ]
    mod.main([*args, "--check", "--local_rank=0"])
    out = capsys.readouterr().out
    assert (
        "global 8 = micro 2 x dp 2 x grad accum 2" in out
        and "vocab 300" in out
        and "memory per device" in out
    )
    mod.main(
        [
            *args,
            "--check",
            "--world-size",
            "4",
            "parallel.tp_size=2",
            "parallel.zero_stage=1",
            "model.overrides.tie_embeddings=false",
        ]
    )
    out = capsys.readouterr().out
    assert "data parallel 2 x tensor parallel 2" in out and "ZeRO-1" in out
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.dist
def test_report_png_plots_the_runs_metrics(runs, tmp_path, monkeypatch):
    """The curves in the figure are metrics.jsonl's (split was stopped and resumed: a step trained
    twice is plotted once, with its last row), and the PNG on disk is that figure."""
    import matplotlib.figure
    import matplotlib.image as mpimg

    from pipeline.runtime.report import render_report

    figures, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *a, **k: figures.append((fig, k.get("dpi", fig.dpi))) or savefig(fig, *a, **k),
    )
    out = render_report(runs / "split", tmp_path / "report.png")
    rows = [json.loads(line) for line in (runs / "split" / "metrics.jsonl").read_text().splitlines()]

    def want(key: str) -> list[tuple[float, float]]:
        last = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
        return sorted(last.items())

    ((fig, dpi),) = figures
    ax_loss, ax_lr, _, ax_norm = fig.axes[:4]
    plotted = {line.get_label(): line.get_xydata().tolist() for line in ax_loss.get_lines()}
    assert plotted["train"] == [list(p) for p in want("loss")] and len(plotted["train"]) >= STEPS - 1
    assert plotted["validation"] == [list(p) for p in want("eval_loss")] and plotted["validation"]
    assert ax_lr.get_lines()[0].get_xydata().tolist() == [list(p) for p in want("lr")]
    assert ax_norm.get_lines()[0].get_xydata().tolist() == [list(p) for p in want("grad_norm")]
    height, width = mpimg.imread(out).shape[:2]
    assert (width, height) == tuple(round(v * dpi) for v in fig.get_size_inches())


@pytest.mark.slow
@pytest.mark.dist
def test_finetune_from_an_autotp_run_with_slow_rank0_work(tp_run, tmp_path):
    """Issue 18: fine-tuning from an AutoTP run hung (rank 0's init export reached a barrier of the
    universal conversion), and rank-0-only work longer than the collective timeout failed the job.
    Here rank 0 converts and exports the AutoTP run with an injected delay longer than the timeout
    (12 s against 9 s) while rank 1 waits outside any collective; the bf16 ZeRO-2 model is built in
    bf16 before DeepSpeed wraps it, and the final export streams it in bf16."""
    from finetune_helpers import run_finetune
    from safetensors.torch import load_file

    pre, run = tmp_path / "pre", tmp_path / "ft"
    shutil.copytree(tp_run, pre, ignore=shutil.ignore_patterns("universal_*"))  # the conversion happens here
    overrides = [
        f"init_from={pre}",
        f"run.dir={tmp_path}",
        "run.name=ft",
        f"out={run / 'hf'}",
        "parallel.zero_stage=2",
        "parallel.precision=bf16",
        "parallel.collective_timeout_min=0.15",
        "data.seq_len=256",  # the corpus tokenizer's 300 pieces make long prompts
        "train.max_steps=2",
        "train.eval_every=0",
        "train.log_every=1",
    ]
    faults = {"GRISTMILL_FAULTS": "main_sleep=12;main_sleep_at=init_export"}
    proc = run_finetune(REPO / "configs" / "finetune" / "sft_tiny.yaml", overrides, ranks=2, env=faults)
    check(proc)
    log = proc.stdout + proc.stderr
    assert "injected 12.0 s delay before init_export" in log
    assert (pre / "checkpoints" / "universal_step_4").is_dir() and (
        run / "init_step_4" / "config.json"
    ).is_file()
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    layout = json.loads((run / "layout.json").read_text())
    assert layout["zero_stage"] == 2 and set(layout["built"]["dtypes"]) == {"bfloat16"}
    weights = load_file(run / "hf" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # the training dtype, not fp32
    assert "export parity (bf16 export of a bf16 run)" in log
