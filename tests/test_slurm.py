"""The launch/slurm/*.sbatch scripts on a real Slurm (22.05, Debian's packages): two fake nodes
n1, n2 on this host (tests/slurm_harness.py), one task per node.

- pretrain.sbatch trains on 2 nodes and checkpoints, with per-rank logs under the run dir;
- the same job preempted twice, once through the batch shell (`scancel -b --signal=USR1`, what
  `#SBATCH --signal=B:USR1@300` delivers) and once straight to the ranks (`scancel --signal=USR1`),
  checkpoints, requeues itself, resumes and ends with the loss curve of the uninterrupted job;
- plain `scancel` (TERM) makes the ranks checkpoint but ends the job without a requeue;
- finetune.sbatch fine-tunes a tiny model on 2 nodes and exports it; the same job sent USR1
  checkpoints, requeues itself, resumes from its checkpoint (not from init_from) and ends with the
  losses of the uninterrupted job;
- prepare_data.sbatch starts a 2-node Ray cluster, prepares the sample dump through it (the same
  bytes as a local run) and stops Ray, also when the job fails.

Off unless GRISTMILL_SLURM_TESTS=1 (3.5 minutes on 2 quiet cores, about 7 on busy ones); skipped with the reason when
Slurm cannot be installed or started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import REPO, encode_docs, make_tokenizer_dir, tiny_corpus, write_token_dir
from slurm_harness import SlurmCluster, end_processes, processes_with_env, slurm_cluster_or_skip

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
SFT_TINY = REPO / "configs" / "finetune" / "sft_tiny.yaml"
WIKI = REPO / "configs" / "data" / "wiki_sample.yaml"
STEPS = 8
JOB_TIMEOUT = 420  # seconds; a 2-rank start on 2 busy cores can take a minute


def srun_rank_env(**slurm: str) -> dict[str, str]:
    """srun_rank.sh run with the variables srun sets (no Slurm needed); the environment the rank gets."""
    script = REPO / "launch" / "slurm" / "srun_rank.sh"
    out = subprocess.run(
        ["bash", str(script), "env"],
        env={"PATH": os.environ["PATH"], **slurm},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize(
    ("tasks_per_node", "node", "procid", "local", "want_local_size"),
    [("1(x2)", 1, 1, 0, 1), ("8(x4)", 2, 17, 1, 8), ("2(x3),1", 3, 6, 0, 1), ("4,2", 1, 5, 1, 2)],
)
def test_srun_rank_maps_slurm_task_ids(tasks_per_node, node, procid, local, want_local_size):
    got = srun_rank_env(
        SLURM_PROCID=str(procid),
        SLURM_NTASKS="32",
        SLURM_LOCALID=str(local),
        SLURM_NODEID=str(node),
        SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
        SLURM_CPUS_PER_TASK="6",
    )
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == (str(procid), "32", str(local))
    assert got["LOCAL_WORLD_SIZE"] == str(want_local_size) and got["NODE_RANK"] == str(node)
    assert got["OMP_NUM_THREADS"] == "6"


@pytest.mark.parametrize(
    ("visible", "want"),
    [
        ("0,1,2,3,4,5,6,7", "5"),  # every task sees the node's 8 GPUs: its local id picks one
        ("5", "0"),  # --gpus-per-task=1 / --gpu-bind: one GPU, device 0
        ("GPU-3f1c2d4e-aaaa-bbbb-cccc-000000000005", "0"),  # bound by UUID
        ("10,11", "0"),  # --gpus-per-task=2: its own pair, the first of them
        (None, "5"),  # CPU ranks
    ],
)
def test_srun_rank_uses_the_device_a_bound_task_sees(visible, want):
    slurm = dict(
        SLURM_PROCID="13",
        SLURM_NTASKS="16",
        SLURM_LOCALID="5",
        SLURM_NODEID="1",
        SLURM_TASKS_PER_NODE="8(x2)",
    )
    got = srun_rank_env(**slurm, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    assert got["LOCAL_RANK"] == want and got["RANK"] == "13"


def job_ports(salt: int, job_ids: list[int], ephemeral: str) -> list[int]:
    """gm_job_port from common.sh for each job id, under a kernel ephemeral port range."""
    loop = (
        f"for j in {' '.join(map(str, job_ids))}; do SLURM_JOB_ID=$j gm_job_port {salt} '{ephemeral}'; done"
    )
    cmd = f". launch/slurm/common.sh; {loop}"
    out = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def test_master_port_is_outside_the_ephemeral_range_and_the_same_for_every_task():
    jobs = list(range(1, 4000, 13))
    ports = job_ports(0, jobs, "32768 60999") + job_ports(3, jobs, "32768 60999")
    assert min(ports) >= 20000 and max(ports) < 32768 and len(set(ports)) > 300
    assert job_ports(0, jobs, "32768 60999") == ports[: len(jobs)]  # every task derives the same port
    assert job_ports(1, [7], "32768 60999") != job_ports(0, [7], "32768 60999")  # a requeued try moves on
    wide = job_ports(0, jobs, "10000 60999")  # a site whose ephemeral range starts lower
    assert min(wide) >= 61000 and max(wide) <= 65535


def test_harness_finds_and_ends_everything_a_cluster_started(tmp_path):
    """No Slurm needed: processes are found by the cluster's SLURM_CONF in their environment, and
    ended even when they ignore TERM (a stuck slurmstepd, a Ray head)."""
    conf = str(tmp_path / "etc" / "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & wait"], env=env)
    plain = subprocess.Popen(["sleep", "60"], env=env)
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, "SLURM_CONF": conf + ".other"})
    try:
        deadline = time.monotonic() + 5
        while len(found := processes_with_env("SLURM_CONF", conf)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # bash's sleep child
        assert {stubborn.pid, plain.pid} < set(found) and other.pid not in found, found
        assert end_processes(found, grace=0.5) == {}
        assert stubborn.wait(5) == -9 and plain.wait(5) == -15 and other.poll() is None
        assert processes_with_env("SLURM_CONF", conf) == {}
    finally:
        for p in (stubborn, plain, other):
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def cluster():
    c = slurm_cluster_or_skip(nodes=2, cpus=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def corpus(work) -> Path:
    """A real SentencePiece tokenizer and token shards from 400 tiny documents."""
    texts = tiny_corpus(400)
    tok = make_tokenizer_dir(work / "tokenizer", texts, vocab_size=300)
    docs = encode_docs(tok, texts)
    splits = {"train": [docs[:200], docs[200:380]], "valid": [docs[380:]]}
    return write_token_dir(work / "tokens", splits, vocab_size=300, tokenizer_dir=tok)


def job_env(**extra: str) -> dict[str, str]:
    """What the tests export to jobs (sbatch passes the environment on): this interpreter, CPU ranks."""
    return {
        "GRISTMILL_PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def pretrain_args(corpus: Path, runs: Path, name: str) -> list[str]:
    return [
        str(TINY_CPU),
        f"data.tokens={corpus}",
        f"run.dir={runs}",
        f"run.name={name}",
        f"train.max_steps={STEPS}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "parallel.precision=fp32",
        "optim.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=4",
        "train.save_every=4",
        "train.eval_batches=2",
    ]


def submit(
    cluster: SlurmCluster, work: Path, script: str, args: list[str], sbatch: list[str] = (), **env
) -> str:
    out = f"--output={work}/slurm-%j.out"
    # the training scripts ask for 8 CPUs per task; these fake nodes have 2
    cpus = [] if script == "prepare_data.sbatch" else ["--cpus-per-task=2"]
    return cluster.sbatch(
        [*cpus, *sbatch, out, str(REPO / "launch" / "slurm" / script), *args], env=job_env(**env), cwd=REPO
    )


def finish(cluster: SlurmCluster, work: Path, job: str, expect: str = "COMPLETED") -> dict[str, str]:
    """Wait for the job to end; unless it ended as `expect`, make sure none of its processes is left
    (cancel and wait), then fail with its output and the daemons' logs."""
    try:
        info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, JOB_TIMEOUT)
    except TimeoutError as exc:  # wait() has cancelled it
        info = {"JobState": f"timeout: {exc}"}
    if info["JobState"] != expect:
        cluster.cancel(job)
        out = (work / f"slurm-{job}.out").read_text() if (work / f"slurm-{job}.out").exists() else ""
        logs = f"{out}\n{job_logs(work, job)}\n{cluster.log_tail(1500)}"
        pytest.fail(f"job {job}: {info.get('JobState')} (expected {expect}): {info}\n{logs}")
    return info


def job_logs(root: Path, job: str) -> str:
    """Every job/rank/ray log of the job under root, for failure messages."""
    parts = []
    for f in sorted(root.rglob(f"logs/slurm-{job}/*/*.log")):
        parts.append(f"--- {f.relative_to(root)}\n{f.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step trained twice (after a stop between checkpoints) keeps its last row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(cluster, work, corpus) -> Path:
    """An uninterrupted 8-step pretraining job on 2 nodes; its run dir."""
    job = submit(cluster, work, "pretrain.sbatch", pretrain_args(corpus, work / "runs", "ref"), ["--nodes=2"])
    finish(cluster, work, job)
    return work / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_on_two_nodes_trains_and_checkpoints(reference):
    root = reference / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{STEPS}"
    files = {p.name for p in (root / f"step_{STEPS}").iterdir()}
    for r in (0, 1):
        assert f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" in files
    loss = losses(reference)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.3, loss
    (try0,) = (reference / "logs").glob("slurm-*/try0")
    assert {"job.log", "rank0.log", "rank1.log"} <= {p.name for p in try0.iterdir()}
    job_log = (try0 / "job.log").read_text()
    assert "2 ranks on 2 nodes, 2 CPUs each" in job_log and "done" in job_log
    assert "network: " in job_log
    assert "saved step_8" in (try0 / "rank0.log").read_text()


def loss_rows(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"loss"' in line for line in metrics.read_text().splitlines())


def preempt(cluster: SlurmCluster, job: str, run_dir: Path, batch_only: bool, rows_before: int) -> int:
    """Once this try has trained a step (a new metrics row), send USR1; wait for the requeue and make
    the job eligible at once. Returns the metrics rows at the stop."""
    restarts = int(cluster.job(job).get("Restarts", 0))
    deadline = time.monotonic() + JOB_TIMEOUT
    while loss_rows(run_dir) <= rows_before:  # before that, the ranks may not have their handler yet
        state = cluster.job(job).get("JobState")
        if time.monotonic() > deadline or state not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise TimeoutError(f"try {restarts}: no new step (job {state})")
        time.sleep(0.3)
    cluster.run(["scancel", "--signal=USR1", *(["--batch"] if batch_only else []), job])
    info = cluster.wait(job, {"PENDING"}, 120)
    assert int(info["Restarts"]) == restarts + 1
    # Slurm holds a requeued job for cred_expire (10 s here, 120 s by default). Starting it at once is
    # fine, but not within the second of the requeue: that start gets "Job credential revoked".
    time.sleep(2.5)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
    return loss_rows(run_dir)


@pytest.fixture(scope="module")
def preempted(cluster, work, corpus) -> tuple[Path, str]:
    """The reference job again, sent USR1 through the batch shell, then straight to the ranks."""
    run_dir = work / "runs" / "preempted"
    args = pretrain_args(corpus, work / "runs", "preempted")
    job = submit(cluster, work, "pretrain.sbatch", args, ["--nodes=2"], GRISTMILL_FAULTS="step_sleep=0.5")
    try:
        rows = preempt(cluster, job, run_dir, batch_only=True, rows_before=1)
        preempt(cluster, job, run_dir, batch_only=False, rows_before=rows)
    except (TimeoutError, AssertionError) as exc:
        cluster.cancel(job)
        pytest.fail(f"{exc}\n{job_logs(work, job)}")
    finish(cluster, work, job)
    return run_dir, job


@pytest.mark.slow
@pytest.mark.dist
def test_preempted_job_requeues_and_matches_uninterrupted(preempted, reference, cluster):
    run_dir, job = preempted
    assert cluster.job(job)["Restarts"] == "2"
    tries = sorted(p.name for p in (run_dir / "logs" / f"slurm-{job}").iterdir())
    assert tries == ["try0", "try1", "try2"]
    logs = {t: (run_dir / "logs" / f"slurm-{job}" / t / "job.log").read_text() for t in tries}
    assert "got SIGUSR1; forwarding it to the ranks" in logs["try0"]  # the batch-shell path
    assert "got SIGUSR1" not in logs["try1"]  # straight to the ranks: they ask for the requeue
    for t in ("try0", "try1"):
        assert "ranks stopped (status 75); requeueing" in logs[t], logs[t]
    for t in ("try1", "try2"):
        assert "resumed from step_" in (run_dir / "logs" / f"slurm-{job}" / t / "rank0.log").read_text()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def make_init_model(folder: Path) -> Path:
    """A random 2-layer Llama in an HF folder, with a real tokenizer trained on the instruction sample."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    rows = [
        json.loads(line) for line in (REPO / "tests/data/sample/instructions.jsonl").read_text().splitlines()
    ]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows[:600]]
    tok = AutoTokenizer.from_pretrained(make_tokenizer_dir(folder, texts, vocab_size=512))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.dist
def test_scancel_checkpoints_and_ends_the_job_without_requeue(cluster, work, corpus):
    run_dir = work / "runs" / "cancelled"
    args = pretrain_args(corpus, work / "runs", "cancelled")
    job = submit(cluster, work, "pretrain.sbatch", args, ["--nodes=2"], GRISTMILL_FAULTS="step_sleep=0.5")
    deadline = time.monotonic() + JOB_TIMEOUT
    while loss_rows(run_dir) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    cluster.run(["scancel", job])  # TERM to the script and every rank, KILL after KillWait (10 s)
    info = cluster.wait(job, {"CANCELLED", "COMPLETED", "FAILED"}, 120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    try0 = run_dir / "logs" / f"slurm-{job}" / "try0"
    job_log = (try0 / "job.log").read_text()
    assert "got SIGTERM" in job_log and "requeueing" not in job_log, job_log
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["signal"], status["exit_code"]) == ("preempted", 15, 75), status
    # the ranks' checkpoint at the stop, which a resubmitted job resumes from
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == status["checkpoint"]
    assert status["step"] >= 2


def finetune_args(init: Path, work: Path, name: str) -> list[str]:
    return [
        str(SFT_TINY),
        f"init_from={init}",
        f"run.dir={work / 'runs'}",
        f"run.name={name}",
        f"out={work / (name + '_hf')}",
        "parallel.precision=fp32",
        "train.max_steps=6",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_max_batches=1",
        "train.save_every=2",
    ]


@pytest.fixture(scope="module")
def ft_reference(cluster, work) -> Path:
    """An uninterrupted 6-step fine-tuning job on 2 nodes; its run dir."""
    init = make_init_model(work / "ft_init")
    job = submit(cluster, work, "finetune.sbatch", finetune_args(init, work, "sft"), ["--nodes=2"])
    finish(cluster, work, job)
    return work / "runs" / "sft"


@pytest.mark.slow
@pytest.mark.dist
def test_finetune_on_two_nodes(ft_reference, work):
    assert {"config.json", "model.safetensors"} <= {p.name for p in (work / "sft_hf").iterdir()}
    (try0,) = (ft_reference / "logs").glob("slurm-*/try0")
    assert {"job.log", "rank0.log", "rank1.log"} <= {p.name for p in try0.iterdir()}
    assert "2 ranks on 2 nodes" in (try0 / "job.log").read_text()


@pytest.mark.slow
@pytest.mark.dist
def test_preempted_finetune_requeues_and_matches_uninterrupted(cluster, work, ft_reference):
    run_dir = work / "runs" / "sft_pre"
    args = finetune_args(work / "ft_init", work, "sft_pre")
    job = submit(cluster, work, "finetune.sbatch", args, ["--nodes=2"], GRISTMILL_FAULTS="step_sleep=0.5")
    try:
        preempt(cluster, job, run_dir, batch_only=True, rows_before=1)
    except (TimeoutError, AssertionError) as exc:
        pytest.fail(f"{exc}\n{job_logs(work, job)}")
    finish(cluster, work, job)
    assert cluster.job(job)["Restarts"] == "1"
    logs = run_dir / "logs" / f"slurm-{job}"
    assert "ranks stopped (status 75); requeueing" in (logs / "try0" / "job.log").read_text()
    assert "resumed from step_" in (logs / "try1" / "rank0.log").read_text()  # not from init_from
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    got, want = losses(run_dir), losses(ft_reference)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert (work / "sft_pre_hf" / "model.safetensors").is_file()


def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention marker (the job's Ray temp dir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(text)
    return found


def data_args(out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [str(WIKI), f"output_dir={out}", f"tokenize.tokenizer={tokenizer}", *extra]


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_data_through_a_ray_cluster_started_by_the_job(cluster, work, corpus, ray_local):
    from pipeline.config import load_config
    from pipeline.data.config import DataConfig
    from pipeline.data.runner import prepare_data

    tokenizer = work / "tokenizer"
    ray_tmp = Path(f"/tmp/gm-ray-test-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    job = submit(
        cluster, work, "prepare_data.sbatch", data_args(work / "prep", tokenizer), GM_RAY_TMPDIR=str(ray_tmp)
    )
    try:
        finish(cluster, work, job)
        log = (work / "prep" / "logs" / f"slurm-{job}" / "try0" / "job.log").read_text()
        assert "2 nodes alive" in log and "ray: stopped" in log, log
        assert not ray_processes(str(ray_tmp)), "Ray processes outlived the job"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    prepare_data(
        load_config(DataConfig, WIKI, [f"output_dir={work / 'local'}", f"tokenize.tokenizer={tokenizer}"])
    )
    for sub in ("cleaned", "tokens"):
        made = sorted(p.relative_to(work / "prep") for p in (work / "prep" / sub).rglob("*") if p.is_file())
        assert made, f"the job wrote nothing under {sub}/"
        for rel in made:
            if rel.suffix in (".zst", ".bin", ".idx"):
                assert (work / "prep" / rel).read_bytes() == (work / "local" / rel).read_bytes(), rel


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_data_failure_still_stops_ray(cluster, work):
    ray_tmp = Path(f"/tmp/gm-ray-fail-{os.getpid()}")
    args = data_args(
        work / "prep_bad", work / "no-such-tokenizer", "steps=[clean]", "inputs=[/nonexistent/*.xml.bz2]"
    )
    job = submit(cluster, work, "prepare_data.sbatch", args, GM_RAY_TMPDIR=str(ray_tmp))
    try:
        finish(cluster, work, job, expect="FAILED")
        log = (work / "prep_bad" / "logs" / f"slurm-{job}" / "try0" / "job.log").read_text()
        assert "data prep failed" in log and "ray: stopped" in log, log
        assert not ray_processes(str(ray_tmp)), "Ray processes outlived the failed job"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
