"""Test helpers for the trainer: a tiny real tokenizer, token shards + manifest, the DeepSpeed launcher.

Shards and manifest.json are written here directly in the manifest schema (DESIGN contracts),
with pipeline.data.indexed, so trainer tests do not depend on the data-prep job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.indexed import bin_path, dtype_for_vocab, idx_path, write_indexed
from pipeline.io import sha256_file, write_json

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "river",
    "mill",
    "grain",
    "stone",
    "water",
    "wheel",
    "flour",
    "miller",
    "town",
    "bread",
    "north",
    "south",
    "old",
    "new",
    "king",
    "church",
    "year",
    "war",
    "people",
    "city",
    "valley",
    "bridge",
    "road",
    "market",
    "harvest",
    "field",
    "farm",
    "the",
    "of",
    "and",
    "in",
    "a",
]


def tiny_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences with enough repetition that a tiny model learns them fast."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        start = int(rng.integers(len(WORDS)))
        words = [WORDS[(start + 3 * k) % len(WORDS)] for k in range(int(rng.integers(8, 40)))]
        docs.append(f"Document {i}. " + " ".join(words) + ".")
    return docs


def make_tokenizer_dir(
    folder: Path, texts: list[str], vocab_size: int = 300, character_coverage: float = 0.9995
) -> Path:
    """Train a real SentencePiece BPE model and add the HF files so AutoTokenizer loads it offline."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(folder / "spm"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=character_coverage,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        minloglevel=2,
    )
    (folder / "spm.model").rename(folder / "tokenizer.model")
    (folder / "spm.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def encode_docs(tokenizer_dir: Path, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text followed by EOS (the data-prep convention)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    return [np.array(ids + [sp.eos_id()]) for ids in sp.encode(texts)]


def write_token_dir(
    tokens_dir: Path,
    splits: dict[str, list[list[np.ndarray]]],
    *,
    vocab_size: int,
    tokenizer_dir: Path | None = None,
    special: tuple[int, int, int] = (2, 3, 0),
) -> Path:
    """Write shards `<split>_<k>.bin/.idx` for each split's list of shards, plus manifest.json."""
    dtype = dtype_for_vocab(vocab_size)
    entries: dict[str, list[dict]] = {}
    for split, shards in splits.items():
        entries[split] = []
        for k, docs in enumerate(shards):
            prefix = f"{split}_{k}"
            n_docs, n_tok = write_indexed(tokens_dir / prefix, docs, dtype)
            sums = {
                "bin": sha256_file(bin_path(tokens_dir / prefix)),
                "idx": sha256_file(idx_path(tokens_dir / prefix)),
            }
            entries[split].append({"prefix": prefix, "documents": n_docs, "tokens": n_tok, "sha256": sums})
    if tokenizer_dir is None:  # a stand-in file, so fingerprint checks still have something to hash
        tokenizer_dir = tokens_dir.parent / "stub_tokenizer"
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        (tokenizer_dir / "tokenizer.model").write_bytes(b"not a real sentencepiece model")
    tok_path, fingerprint = str(tokenizer_dir), sha256_file(tokenizer_dir / "tokenizer.model")
    bos, eos, pad = special
    write_json(
        tokens_dir / "manifest.json",
        {
            "format": "megatron-indexed-v1",
            "dtype": dtype.name,
            "tokenizer": {
                "path": tok_path,
                "fingerprint": fingerprint,
                "vocab_size": vocab_size,
                "bos_id": bos,
                "eos_id": eos,
                "pad_id": pad,
            },
            "splits": entries,
            "totals": {
                s: {"documents": sum(e["documents"] for e in es), "tokens": sum(e["tokens"] for e in es)}
                for s, es in entries.items()
            },
            "config": {},
            "lineage": {"inputs": []},
        },
    )
    return tokens_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(
    args: list[str], *, num_ranks: int = 2, timeout: int = 300, cwd: Path = REPO, env: dict | None = None
):
    """`deepspeed -q --num_gpus N --master_port <free> <args>` on CPU; removes its /dev/shm segments."""
    port = free_port()
    try:
        return subprocess.run(
            launcher_cmd(args, num_ranks, port),
            env=worker_env(env),
            cwd=cwd,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
    finally:
        remove_shm(port)


def launcher_cmd(args: list[str], num_ranks: int, port: int) -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [str(deepspeed), "-q", "--num_gpus", str(num_ranks), "--master_port", str(port), *args]


def remove_shm(port: int) -> None:
    """Delete DeepSpeed's shared-memory allreduce segments of a run on this master port."""
    for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        seg.unlink(missing_ok=True)


def make_corpus(root: Path, n_docs: int = 400, vocab_size: int = 300) -> Path:
    """A real SentencePiece tokenizer and token shards (2 train shards, 1 valid) from tiny documents."""
    texts = tiny_corpus(n_docs)
    tok = make_tokenizer_dir(root / "tokenizer", texts, vocab_size=vocab_size)
    docs = encode_docs(tok, texts)
    cut = n_docs * 19 // 20
    splits = {"train": [docs[: n_docs // 2], docs[n_docs // 2 : cut]], "valid": [docs[cut:]]}
    return write_token_dir(root / "tokens", splits, vocab_size=vocab_size, tokenizer_dir=tok)


def worker_env(extra: dict | None = None) -> dict:
    """Environment of a trainer process on CPU: offline, one thread per rank, the repo importable."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("GRISTMILL_FAULTS", None)
    env.update(extra or {})
    return env


# fp16 on CPUs whose DeepSpeed accelerator refuses it, for tests only (tests/cpu_fp16/sitecustomize.py)
CPU_FP16_ENV = {
    "GRISTMILL_TEST_CPU_FP16": "emulate",
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO / "tests" / "cpu_fp16"), str(REPO), os.environ.get("PYTHONPATH")])
    ),
}


def run_single(args: list[str], *, env: dict | None = None, timeout: int = 300):
    """`python <args>` as one rank without the launcher (a 1-rank process group on a free port)."""
    return subprocess.run(
        [sys.executable, *args],
        env=worker_env(env),
        cwd=REPO,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def check(proc, rc: int = 0) -> None:
    """Fail the test with the tails of a launcher's stdout and stderr unless it exited with `rc`."""
    if proc.returncode != rc:
        pytest.fail(
            f"rc={proc.returncode} (want {rc})\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )


def run_ranks(fn: Callable, world_size: int = 2, timeout: float = 300, **kwargs) -> None:
    """Run module-level `fn(rank, world_size, **kwargs)` in `world_size` spawned processes that form a
    CPU process group (the environment the deepspeed launcher gives a rank: RANK, WORLD_SIZE,
    MASTER_PORT, ..., DS_ACCELERATOR=cpu, offline, one thread each). A rank's exception fails the test
    with its traceback; a run past `timeout` seconds is killed and fails it (never a hang)."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(
        _rank_main, args=(fn, world_size, port, kwargs), nprocs=world_size, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"{fn.__name__}: {world_size} ranks still running after {timeout:.0f} s; killed")
    finally:
        remove_shm(port)


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, kwargs: dict) -> None:
    import torch

    env = worker_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    env.update(LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(env)
    os.environ.pop("GRISTMILL_FAULTS", None)
    torch.set_num_threads(1)
    fn(rank, world_size, **kwargs)
