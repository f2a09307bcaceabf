"""Shared pieces of the fine-tuning tests: a tiny "pretrained" model folder built once per session,
and runners for launch/finetune.py (one plain process, or 2 ranks under the deepspeed launcher).

The init folder is what `init_from` accepts: a random-init 2-layer LlamaForCausalLM saved with
`save_pretrained`, next to a real SentencePiece tokenizer trained by pipeline.tokenizer on the
sample instructions (plus the real Alpaca and VADER texts when ../shared/data/raw is present), so
it has our special tokens, chat roles and chat template.
"""

from __future__ import annotations

import atexit
import functools
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"  # where tests/conftest.py's raw_samples points
SAMPLE = REPO / "tests" / "data" / "sample" / "instructions.jsonl"
VADER_TWEETS = Path("sft") / "classification" / "vader-tweets_GroundTruth.tsv"
ALPACA_EN = Path("sft") / "alpaca_en_demo.json"


def tokenizer_lines(raw: Path | None) -> list[str]:
    """Training lines: the sample instructions, plus real Alpaca and VADER text when available."""
    lines = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:800]:
        rec = json.loads(line)
        lines += [rec["instruction"], rec.get("input", ""), rec["output"]]
    if raw is not None and (raw / ALPACA_EN).is_file():
        for rec in json.loads((raw / ALPACA_EN).read_text(encoding="utf-8"))[:400]:
            lines += [rec["instruction"], rec["input"], rec["output"]]
    if raw is not None and (raw / VADER_TWEETS).is_file():
        rows = (raw / VADER_TWEETS).read_text(encoding="utf-8").splitlines()
        lines += [r.split("\t")[-1] for r in rows[:2000]]
    return [x for text in lines for x in text.split("\n") if x.strip()]


def make_tokenizer(folder: Path, lines: list[str], vocab_size: int = 1000) -> Path:
    """A tokenizer folder written the way launch/train_tokenizer.py writes one (model + HF files)."""
    from pipeline.tokenizer import hf
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_model

    cfg = TokenizerConfig(name="ft", inputs=["-"], vocab_size=vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_model(lines, cfg))
    hf.write_hf_files(folder, special_tokens=cfg.special_tokens)
    return folder


def make_init_model(folder: Path, raw: Path | None, seed: int = 0) -> Path:
    """Tokenizer + random-init tiny LlamaForCausalLM in one HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(make_tokenizer(folder, tokenizer_lines(raw)))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    pretrain_briefly(model, tok, tokenizer_lines(raw))
    model.save_pretrained(folder)
    return folder


def pretrain_briefly(
    model, tok, lines: list[str], steps: int = 60, seq_len: int = 64, batch: int = 16
) -> None:
    """A few AdamW steps of next-token training on the lines (seconds on a CPU), so the model is
    "pretrained-like": fine-tuning starts from weights that know the vocabulary, not from noise."""
    import torch

    ids = [
        i for line in lines[:3000] for i in [tok.bos_token_id, *tok.encode(line, add_special_tokens=False)]
    ]
    stream = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)  # (N, T)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = stream[torch.randint(len(stream), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@functools.cache
def shared_init_model(raw: Path | None) -> Path:
    """One init folder per test process (several test modules share it); removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="gristmill-ft-"))
    atexit.register(shutil.rmtree, root, True)
    return make_init_model(root / "init", raw)


@pytest.fixture(scope="session")
def ft_init() -> Path:
    """The shared init folder (built with the real raw texts when ../shared/data/raw exists)."""
    return shared_init_model(RAW if RAW.is_dir() else None)


@pytest.fixture(scope="session")
def ft_tok(ft_init):
    """The tokenizer of the shared init folder (our special tokens, chat roles and template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ft_init)


def tiny_llama(task: str = "sft", vocab_size: int = 64, seed: int = 0):
    """A random 2-layer, 32-wide Llama (no tokenizer): a causal LM, or a 3-class classifier."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return (LlamaForSequenceClassification if task == "classify" else LlamaForCausalLM)(cfg).float()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm(port: int) -> None:
    """Delete the shared-memory segments DeepSpeed's CPU allreduce leaves for `port` (66 MiB each)."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.unlink(path)


def finetune_cmd(config: str | Path, overrides: list[str], ranks: int, port: int) -> list[str]:
    """launch/finetune.py as one plain process (a 1-rank group), or `ranks` ranks under the launcher."""
    args = ["launch/finetune.py", "--config", str(config), *overrides]
    if ranks == 1:
        return [sys.executable, *args]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "-q", "--num_gpus", str(ranks), "--master_port", str(port), *args]


def finetune_env(extra: dict | None = None) -> dict:
    """CPU ranks, offline, one thread each; no launcher variables or fault injection inherited."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GRISTMILL_FAULTS"):
        env.pop(key, None)
    return {**env, **(extra or {})}


def run_finetune(
    config: str | Path, overrides: list[str], *, ranks: int = 1, timeout: int = 300, env: dict | None = None
):
    """Run launch/finetune.py to the end; returns the CompletedProcess (the caller checks returncode)."""
    port = free_port()
    try:
        return subprocess.run(
            finetune_cmd(config, overrides, ranks, port),
            cwd=REPO,
            env=finetune_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        remove_shm(port)


def start_finetune(
    config: str | Path, overrides: list[str], log: Path, *, env: dict | None = None
) -> subprocess.Popen:
    """launch/finetune.py as one plain process in the background, stdout and stderr into `log` (a file,
    not a pipe: nobody has to drain it while the test waits)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            finetune_cmd(config, overrides, 1, 0),
            cwd=REPO,
            env=finetune_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
