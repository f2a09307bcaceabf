"""End-to-end data prep (raw files -> cleaned shards) on 1 and then 2 Ray workers.

    python bench/prepare.py [--copies 3] [--steps clean] [--workers 1 2]

The input is every wiki and web sample in ../shared/data/raw (all readers), copied `--copies`
times under new names so a run lasts long enough to time, through the same chain as
configs/data/all_samples.yaml (extraction, langid, Gopher, C4, FineWeb, PII; dedup with
`--steps clean dedup`). Ray is started before the clock starts, once per worker count, so the
times are the job's own. Prints docs/s, MB/s per core and the speedup over 1 worker; the output
bytes of every run are compared too (they must not depend on the number of workers).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

# the repo root instead of bench/: pipeline imports, and no bench module can shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

import ray  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.config import DataConfig  # noqa: E402
from pipeline.data.runner import prepare_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
PATTERNS = ["wiki/*.xml*", "web/*.warc.gz", "web/*.warc.wet.gz", "web/*.jsonl*", "web/c4-shards/*.json.gz"]


def make_corpus(folder: Path, copies: int) -> int:
    size = 0
    for c in range(copies):
        for pattern in PATTERNS:
            for src in sorted(RAW.glob(pattern)):
                dst = folder / f"c{c:02d}-{src.name}"
                shutil.copy(src, dst)
                size += dst.stat().st_size
    return size


def run(folder: Path, out: Path, workers: int, steps: list[str]) -> tuple[float, dict]:
    overrides = [f"output_dir={out}", f"ray.num_cpus={workers}", f"steps=[{','.join(steps)}]"]
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "all_samples.yaml", overrides)
    cfg.inputs = [str(folder / "*")]
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    try:
        start = time.perf_counter()
        report = prepare_data(cfg)
        return time.perf_counter() - start, report
    finally:
        ray.shutdown()


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*.jsonl.zst")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--steps", nargs="+", default=["clean"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "raw"
        folder.mkdir()
        mb = make_corpus(folder, args.copies) / 1e6
        times, digests = {}, {}
        for w in args.workers:
            secs, report = run(folder, Path(tmp) / f"out{w}", w, args.steps)
            docs = report["clean"]["totals"]["in"]
            times[w], digests[w] = secs, digest(Path(tmp) / f"out{w}")
            print(
                f"{w} worker(s): {secs:6.1f} s  {docs / secs:7.0f} docs/s  {mb / secs:5.2f} MB/s "
                f"({docs / secs / w:6.0f} docs/s/core, {mb / secs / w:5.2f} MB/s/core)  output {digests[w]}"
            )
    base = min(args.workers)
    for w in args.workers:
        if w != base:
            print(f"speedup {w} vs {base} worker(s): {times[base] / times[w]:.2f}x")
    print(
        f"input: {mb:.1f} MB raw, {len(args.workers)} runs; same output bytes: {len(set(digests.values())) == 1}"
    )


if __name__ == "__main__":
    main()
