"""Multi-node DeepSpeed without Slurm, as the README shows it: one `deepspeed --hostfile` launcher per
node with `--no_ssh --node_rank N` and rank 0's address. Here the two "nodes" are two launcher
processes on this machine over loopback, one rank each (2 CPU ranks, ZeRO-3, gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import REPO, encode_docs, free_port, make_tokenizer_dir, tiny_corpus, write_token_dir

from pipeline.runtime.metrics import read_metrics

TINY_CPU = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    texts = tiny_corpus(300)
    tok = make_tokenizer_dir(root / "tokenizer", texts, vocab_size=300)
    docs = encode_docs(tok, texts)
    return write_token_dir(
        root / "tokens", {"train": [docs[:280]], "valid": [docs[280:]]}, vocab_size=300, tokenizer_dir=tok
    )


def launch_node(node_rank: int, hostfile: Path, port: int, logs: Path, args: list[str]) -> subprocess.Popen:
    """What an operator runs on node `node_rank` (no ssh: every node starts its own launcher)."""
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "-q",
        f"--hostfile={hostfile}",
        "--no_ssh",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        f"--enable_each_rank_log={logs / f'node{node_rank}'}",
        "launch/pretrain.py",
        *args,
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
@pytest.mark.dist
def test_hostfile_launch_on_two_nodes_over_loopback(corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names need not resolve with --no_ssh
    run_dir = tmp_path / "runs" / "two_nodes"
    args = [
        "--config",
        str(TINY_CPU),
        f"data.tokens={corpus}",
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "train.max_steps=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "optim.warmup_steps=1",
    ]
    port = free_port()
    procs = [launch_node(r, hostfile, port, tmp_path / "logs", args) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two node launchers did not finish within 240 s")
    finally:
        for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            seg.unlink(missing_ok=True)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r} launcher rc={p.returncode}\n{out[-3000:]}"
    # node 1's launcher started global rank 1 (its own LOCAL_RANK 0), node 0's rank 0
    for node in (0, 1):
        names = [f.name for f in (tmp_path / "logs" / f"node{node}").iterdir()]
        assert len(names) == 1 and names[0].endswith(f"_rank{node}.log"), names
    ckpt = run_dir / "checkpoints" / "step_4"
    assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= {
        p.name for p in ckpt.iterdir()
    }
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]
