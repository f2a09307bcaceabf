"""Tokenize-stage throughput against SentencePiece's own encode, measured in the same run.

(Named tokenization.py, not tokenize.py: `python bench/<x>.py` puts bench/ first on sys.path, where
a tokenize.py would shadow the standard library's `tokenize` for every bench script that imports torch.)

    python bench/tokenization.py                      # 24 MB of the real web samples, 8 shards, 8,000-piece BPE
    python bench/tokenization.py --mb 64 --tokenizer tokenizers/wiki_sample

The stage is what the data-prep job runs for tokenization: one Ray task per cleaned shard
(`tokenize_file`: read the zstd JSONL, encode, write .bin/.idx with checksums), then the
manifest. Ray is used directly rather than through runner.py, so the clean step is not needed. The
baseline is `SentencePieceProcessor.encode` alone (one thread, batches of `--batch-size`) over
the same texts already in memory: the limit for this tokenizer on one core. Ray start-up and a
warm-up run are not timed. Prints characters/s and the ratios; goals: stage on 1 worker >= 0.8
of encode, stage on 2 workers >= 1.8 x the stage on 1 worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RAW = REPO.parent / "shared" / "data" / "raw"
SAMPLE = REPO / "tests" / "data" / "sample" / "instructions.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--raw", type=Path, default=RAW, help="raw samples folder (its web/*.jsonl* texts are used)"
    )
    p.add_argument("--mb", type=float, default=24, help="megabytes of text, cycling through the samples")
    p.add_argument("--shards", type=int, default=8, help="cleaned shards the text is split into")
    p.add_argument("--tokenizer", type=Path, help="a tokenizers/<name> folder (default: train one here)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary of the tokenizer trained here")
    p.add_argument("--batch-size", type=int, default=512, help="documents per encode call (both sides)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each measurement (best is kept)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    return p.parse_args(argv)


def real_texts(raw: Path) -> list[str]:
    """Web texts (C4, Dolma, RedPajama, CCNet, OSCAR multilingual) from the raw samples, else the test sample."""
    import gzip

    import zstandard

    texts = []
    for path in sorted((raw / "web").glob("*.jsonl*")):
        opener = {".gz": gzip.open, ".zst": zstandard.open}.get(path.suffix, open)
        with opener(path, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        texts += [r.get("text") or r.get("content") or "" for r in rows]
    if not texts:  # no raw samples here: the shipped instruction sample
        rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
        texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    return [t for t in texts if t]


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[list[Path], Path, list[str]]:
    """Cleaned shards of about `--mb` MB of real text, and a tokenizer; returns (shards, tokenizer, texts)."""
    from pipeline.io import write_jsonl_zst
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_tokenizer

    base, texts, size = real_texts(args.raw), [], 0
    while size < args.mb * 1e6:
        texts.append(base[len(texts) % len(base)])
        size += len(texts[-1].encode("utf-8"))
    shards = []
    for k in range(args.shards):
        rows = [
            {"id": f"bench/{i}", "text": texts[i], "source": "bench", "meta": {}}
            for i in range(k, len(texts), args.shards)
        ]
        shards.append(work / "cleaned" / f"part-{k}.jsonl.zst")
        write_jsonl_zst(shards[-1], rows)
    tok = args.tokenizer or train_tokenizer(
        TokenizerConfig(
            name="bench",
            inputs=[str(work / "cleaned")],
            output_root=work,
            vocab_size=args.vocab,
            sample_docs=len(base),
            max_chars=5_000_000,
        )
    )
    return shards, Path(tok), texts


def time_encode(tok: Path, texts: list[str], batch: int, repeats: int) -> tuple[float, float, int]:
    """Best wall seconds of SentencePiece encode over all texts (one thread), its CPU seconds, and the tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    best, cpu, tokens = float("inf"), 0.0, 0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(
            len(ids)
            for i in range(0, len(texts), batch)
            for ids in sp.encode(texts[i : i + batch], num_threads=1)
        )
        if time.perf_counter() - t0 < best:
            best, cpu = time.perf_counter() - t0, time.process_time() - c0
    return best, cpu, tokens


def tokenize_shard(src: Path, out: Path, cfg) -> tuple[list[dict], float]:
    """tokenize_file, and the CPU seconds it used in this worker."""
    from pipeline.data.tokenize import tokenize_file

    t0 = time.process_time()
    entries = tokenize_file(src, out, cfg)
    return entries, time.process_time() - t0


def time_stage(
    shards: list[Path], tok: Path, workers: int, batch: int, repeats: int
) -> tuple[float, float, dict]:
    """Best wall seconds of the tokenize stage (one Ray task per shard, then the manifest) on `workers`
    CPUs, the CPU seconds of its tasks in that run, and the manifest totals."""
    import ray

    from pipeline.data.config import TokenizeConfig
    from pipeline.data.manifest import write_manifest

    cfg = TokenizeConfig(tokenizer=tok, valid_fraction=0.01, batch_size=batch)
    out = shards[0].parent.parent / "tokens"
    ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    task = ray.remote(num_cpus=1)(tokenize_shard)
    try:
        best, cpu = float("inf"), 0.0
        for run in range(repeats + 1):  # run 0 warms up the workers (process start, imports)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            results = ray.get([task.remote(s, out, cfg) for s in shards])
            entries = [e for shard_entries, _ in results for e in shard_entries]
            manifest = write_manifest(out, entries, tokenizer_dir=tok, config={}, lineage={"inputs": []})
            if run and time.perf_counter() - t0 < best:
                best, cpu = time.perf_counter() - t0, sum(c for _, c in results)
    finally:
        ray.shutdown()
    return best, cpu, json.loads(manifest.read_text())["totals"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for key, value in {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "1",
    }.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        shards, tok, texts = prepare_inputs(args, work)
        t_enc, c_enc, tokens = time_encode(tok, texts, args.batch_size, args.repeats + 1)
        t1, c1, totals = time_stage(shards, tok, 1, args.batch_size, args.repeats)
        t2, _, _ = time_stage(shards, tok, 2, args.batch_size, args.repeats)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(
        args,
        texts,
        tokens,
        totals,
        {"encode": t_enc, "stage_1_worker": t1, "stage_2_workers": t2},
        (c_enc, c1),
    )


def report(
    args, texts: list[str], tokens: int, totals: dict, seconds: dict, cpu: tuple[float, float]
) -> None:
    """Print rates, the goal ratios (wall clock) and the per-core ratio on CPU time (robust to a busy machine)."""
    chars = sum(map(len, texts))
    written = sum(t["tokens"] - t["documents"] for t in totals.values())  # minus one EOS per document
    rates = {k: chars / s for k, s in seconds.items()}
    print(
        f"text: {len(texts)} documents, {chars / 1e6:.1f} M chars, {tokens / 1e6:.2f} M tokens in {args.shards} "
        f"shards; the stage wrote the same tokens (+ EOS): {written == tokens}"
    )
    for name, rate in rates.items():
        print(f"{name:16s} {rate / 1e6:7.2f} M chars/s (wall)")
    r1, r2 = rates["stage_1_worker"] / rates["encode"], rates["stage_2_workers"] / rates["stage_1_worker"]
    r_cpu = cpu[0] / cpu[1]
    print(f"ratio stage(1 worker) / encode    = {r1:.2f}  (goal >= 0.8)")
    print(f"ratio stage(2 workers) / stage(1) = {r2:.2f}  (goal >= 1.8; {os.cpu_count()} CPUs here)")
    print(f"ratio on CPU time, stage / encode = {r_cpu:.2f}  (per core, whatever else runs on the machine)")
    summary = {"chars": chars, "tokens": tokens, **{k: round(v) for k, v in rates.items()}}
    summary.update(
        ratio_1_worker_vs_encode=round(r1, 3), ratio_2_vs_1_workers=round(r2, 3), ratio_cpu=round(r_cpu, 3)
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
