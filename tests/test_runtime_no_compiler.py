"""A fresh machine without a working C/C++ compiler still trains: 2 CPU ranks through the deepspeed
launcher with CC/CXX=/bin/false and an empty extensions folder. DeepSpeed's shared-memory collective
op cannot be built, so the ranks use gloo's own collectives (one warning, from rank 0), and the
default optimizer (torch's AdamW) needs no build either."""

from __future__ import annotations

import pytest
from dist_helpers import REPO, check, make_corpus, read_losses, run_launcher

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def test_two_cpu_ranks_train_without_a_compiler(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=200)
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    args = [
        "launch/pretrain.py",
        "--config",
        str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml"),
        f"data.tokens={corpus}",
        f"run.dir={tmp_path / 'runs'}",
        "run.name=nocc",
        f"model.file={REPO / 'configs/model/tiny.yaml'}",
        "data.seq_len=64",
        "parallel.precision=fp32",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "train.max_steps=6",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.eval_batches=1",
        "train.progress=false",
    ]
    env = {"CC": "/bin/false", "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = run_launcher(args, num_ranks=2, timeout=300, env=env)
    check(proc)
    output = proc.stdout + proc.stderr
    assert output.count("CPU collectives: DeepSpeed's shared-memory op could not be built") == 1, output[
        -3000:
    ]
    assert "using gloo's own all-reduce" in output
    losses = read_losses(tmp_path / "runs" / "nocc")
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] - 0.3, losses
    assert not list(ext.rglob("*.so")), "something was compiled"
