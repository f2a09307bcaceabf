"""Data prep at scale: a synthetic corpus of a given size built from the real samples, with
duplicates planted at known Jaccard levels, through clean -> dedup -> tokenize on Ray.

    python bench/scale.py --sizes 0.1,1 --workers 2            # one table row per size (GB)
    python bench/scale.py --sizes 0.1,1,4 --work out/bench-scale   # resumes: finished rows are reused

Corpus: every document of ../shared/data/raw (Wikipedia through our reader and extractor, web
JSONL/WARC/WET text) with at least 100 words is a base document. A background document is a base
document with about half of its adjacent word pairs swapped (characters, for Chinese), so its
word statistics (and the quality filters' decisions) stay real while its word 5-grams are new:
two background documents share about 5% of their 5-grams. Planted copies of background
documents: 3% exact copies, and 1% each near copies at word 5-gram Jaccard 0.95, 0.9, 0.85,
0.8, 0.7 and 0.5 (words replaced at random; the Jaccard written to the ground truth is measured
on the copy). Shards of about 8 MB of JSONL (zstd), documents placed in random shards, so pairs
cross shards. The ground truth (`truth.jsonl`) is written beside the shards.

Per size it prints docs/s and MB/s per core (uncompressed JSONL, whole job and per step), the
peak RSS of the driver and of the largest Ray worker, the bytes Ray spilled, and dedup
recall/precision against the ground truth. A pair counts as found when not both documents are
kept; precision counts a dropped document as wrong when no planted pair explains it. It also
measures MB/s per core of the clean step on the largest real Wikipedia sample (bz2 bytes) and
prints the hours a 22 GB enwiki dump would take on 16, 64 and 256 cores.

Everything lands under --work: `<size>GB/corpus/` (kept between runs), `<size>GB/out/` and
`<size>GB/result.json`; a size with a result.json is not re-run (--force re-runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root: pipeline imports

from pipeline.config import load_config  # noqa: E402
from pipeline.data.config import DataConfig  # noqa: E402
from pipeline.data.dedup import NOSPACE_SCRIPTS, normalized_words  # noqa: E402
from pipeline.io import read_jsonl_zst, write_jsonl_zst  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAW = REPO.parent / "shared" / "data" / "raw"
SHARD_BYTES = 8 << 20  # small enough that every size has many shards per worker
PLANTS = [("exact", 1.0, 0.03)] + [("near", j, 0.01) for j in (0.95, 0.9, 0.85, 0.8, 0.7, 0.5)]
BUCKETS = [("exact", None), (">=0.95", 0.95), ("0.90-0.95", 0.9), ("0.85-0.90", 0.85), ("0.80-0.85", 0.8)]
BUCKETS += [("0.70-0.80", 0.7), ("0.50-0.70", 0.5), ("<0.50", 0.0)]
BOILERPLATE = [
    "Home | About | Contact",
    "Share this: Facebook Twitter Email",
    "Skip to main content",
    "All rights reserved.",
    "Cookies help us deliver our services.",
]
_UNITS = re.compile(rf"\s+|[{NOSPACE_SCRIPTS}]|[^\s{NOSPACE_SCRIPTS}]+")
ENWIKI_GB = 22


# ---------------------------------------------------------------- corpus


def base_documents(work: Path) -> list[str]:
    """Texts of every real sample document with at least 100 words, cached in `work/base.jsonl.zst`."""
    cache = work / "base.jsonl.zst"
    if not cache.is_file():
        from pipeline.data.config import ReadConfig
        from pipeline.data.formats import detect_format, extraction_stages, open_reader
        from pipeline.data.stage import run_stages

        texts = []
        files = sorted(p for p in RAW.glob("w*/**/*") if p.is_file() and not p.name.endswith(".md"))
        for path in files:
            fmt = detect_format(path)
            reader = open_reader(path, fmt, ReadConfig())
            docs, _ = run_stages(extraction_stages(fmt, reader.site, ReadConfig()), list(reader))
            texts += [d.text for d in docs if len(normalized_words(d.text)) >= 100]
        write_jsonl_zst(cache, [{"text": t} for t in texts])
    return [r["text"] for r in read_jsonl_zst(cache)]


def perturb(text: str, rng: random.Random) -> str:
    """Swap about half of the adjacent word pairs (characters in Chinese) and maybe add a boilerplate line."""
    units = _UNITS.findall(text)
    words = [i for i, u in enumerate(units) if not u.isspace()]
    bits = rng.getrandbits(max(len(words) // 2, 1))
    for k in range(len(words) // 2):
        if bits >> k & 1:
            a, b = words[2 * k], words[2 * k + 1]
            units[a], units[b] = units[b], units[a]
    out = "".join(units)
    if rng.random() < 0.3:
        out = rng.choice(BOILERPLATE) + "\n" + out
    return out


def near_copy(text: str, target: float, rng: random.Random) -> str:
    """Replace random words so that the word 5-gram Jaccard to `text` is about `target`."""
    units = _UNITS.findall(text)
    words = [i for i, u in enumerate(units) if not u.isspace()]
    m = max(len(words) - 4, 1)
    for _ in range(max(1, round(m * (1 - target) / (5 * (1 + target))))):
        units[rng.choice(words)] = units[rng.choice(words)] + "x"
    return "".join(units)


def jaccard(a: str, b: str) -> float:
    def grams(t):
        w = normalized_words(t)
        return {tuple(w[i : i + 5]) for i in range(max(len(w) - 4, 1))}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / max(len(sa | sb), 1)


class Slots:
    """Document (shard, j) of the corpus as a pure function of (seed, shard, j)."""

    def __init__(self, base: list[str], shards: int, per_shard: int, seed: int = 0):
        self.base, self.shards, self.per_shard, self.seed = base, shards, per_shard, seed

    def rng(self, shard: int, j: int) -> random.Random:
        return random.Random(f"{self.seed}/{shard}/{j}")

    def kind(self, shard: int, j: int) -> tuple[str, float] | None:
        """("exact" | "near", level) for a planted copy, None for a background document."""
        r = self.rng(shard, j).random()
        for kind, level, rate in PLANTS:
            if r < rate:
                return kind, level
            r -= rate
        return None

    def background(self, shard: int, j: int) -> str:
        rng = self.rng(shard, j)
        rng.random()  # the draw kind() used
        return perturb(self.base[rng.randrange(len(self.base))], rng)

    def document(self, shard: int, j: int) -> tuple[str, dict | None]:
        """(text, ground-truth row or None)."""
        planted = self.kind(shard, j)
        if planted is None:
            return self.background(shard, j), None
        rng = self.rng(shard, j)
        rng.random()
        while True:  # a background source anywhere in the corpus
            src = (rng.randrange(self.shards), rng.randrange(self.per_shard))
            if self.kind(*src) is None:
                break
        source = self.background(*src)
        kind, level = planted
        text = source if kind == "exact" else near_copy(source, level, rng)
        truth = {"id": doc_id(shard, j), "source": doc_id(*src), "kind": kind, "target": level}
        truth["jaccard"] = 1.0 if kind == "exact" else round(jaccard(source, text), 4)
        return text, truth


def doc_id(shard: int, j: int) -> str:
    return f"s{shard:04d}-{j:07d}"


_SLOTS: Slots | None = None  # set in each generator process by _init


def _init(slots: Slots) -> None:
    global _SLOTS
    _SLOTS = slots


def write_shard(args: tuple) -> tuple[list[dict], int]:
    """Write shard `shard` of the corpus; returns its ground-truth rows and its uncompressed bytes."""
    shard, folder = args
    rows, truth = [], []
    for j in range(_SLOTS.per_shard):
        text, t = _SLOTS.document(shard, j)
        rows.append({"id": doc_id(shard, j), "text": text, "source": "bench"})
        if t:
            truth.append(t)
    write_jsonl_zst(folder / f"s{shard:04d}.jsonl.zst", rows)
    return truth, sum(len((json.dumps(r, ensure_ascii=False) + "\n").encode()) for r in rows)


def build_corpus(work: Path, size_gb: float, workers: int) -> dict:
    """Write (or reuse) `work/<size>GB/corpus`: shards, truth.jsonl, corpus.json."""
    folder = work / f"{size_gb:g}GB" / "corpus"
    done = folder / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    base = base_documents(work)
    mean = sum(len(json.dumps(t, ensure_ascii=False)) + 40 for t in base) / len(base)
    total = size_gb * 1e9
    shards = workers * math.ceil(total / SHARD_BYTES / workers)  # a multiple of the workers: no idle tail
    slots = Slots(base, shards, max(1, round(total / shards / mean)))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    with Pool(workers, initializer=_init, initargs=(slots,)) as pool:
        parts = pool.map(write_shard, [(s, folder) for s in range(shards)])
    truth = [t for rows, _ in parts for t in rows]
    raw = sum(n for _, n in parts)
    with open(folder / "truth.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(t) + "\n" for t in truth)
    info = {"shards": shards, "documents": shards * slots.per_shard, "bytes": raw, "planted": len(truth)}
    info["seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- one run (in its own process)


def run_one(size_dir: Path, workers: int, tokenizer: Path) -> dict:
    """prepare_data over the corpus in this (fresh) process, with RSS sampling; returns measurements."""
    import resource

    from pipeline.data.runner import prepare_data, start_ray

    out = size_dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"output_dir={out}",
        f"inputs=[{size_dir / 'corpus' / '*.jsonl.zst'}]",
        "steps=[clean,dedup,tokenize]",
        f"tokenize.tokenizer={tokenizer}",
        f"ray.num_cpus={workers}",
        "ray.object_store_memory=1000000000",
        f"ray.spill_dir={size_dir / 'spill'}",
    ]
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "all_samples.yaml", overrides)
    start_ray(cfg.ray)
    tree = ProcessTree()
    tree.start()
    cpu = time.process_time()
    report = prepare_data(cfg)
    tree.stop()
    result = {
        "seconds": report["seconds"],
        "cpu_seconds": tree.cpu_seconds + time.process_time() - cpu,  # Ray's processes and the driver
        "steps": {s: report[s]["seconds"] for s in cfg.steps},
        "documents_in": report["clean"]["totals"]["in"],
        "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": tree.peak / 2**20,
        "spilled_mb": spilled_bytes() / 2**20,
        "dedup_plan": report["dedup"].get("plan"),
    }
    import ray

    ray.shutdown()
    return result


class ProcessTree:
    """This process's descendants (the Ray instance and its workers), sampled twice a second:
    the largest worker's peak RSS (VmHWM) and the CPU seconds of all of them."""

    def __init__(self):
        self.peak, self._cpu, self._base, self._stop = 0, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._sample()
        self._base = dict(self._cpu)  # Ray's start-up is not the job's
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of every descendant seen (a process that ended counts up to its last sample)."""
        return sum(v - self._base.get(pid, 0.0) for pid, v in self._cpu.items())

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def _sample(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
                if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::"):
                    self.peak = max(self.peak, _hwm(proc.pid))
            except (psutil.Error, OSError):
                continue


def _hwm(pid: int) -> int:
    """Peak resident bytes of a process (VmHWM), 0 when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def spilled_bytes() -> int:
    """Bytes Ray spilled to disk in this session (its private memory-stats API; -1 when unavailable)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return get_memory_info_reply(state).store_stats.spilled_bytes_total
    except Exception:  # a private API: a bench must still print its other numbers
        return -1


# ---------------------------------------------------------------- evaluation


def ids_in(folder: Path) -> set[str]:
    """Document ids (without the `<shard>/` prefix the reader adds) of every shard in `folder`."""
    import zstandard

    ids = set()
    for path in sorted(folder.glob("*.jsonl.zst")):
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw:
            import io

            for line in io.TextIOWrapper(raw, encoding="utf-8"):
                full = line[8 : line.index('"', 8)]  # lines start with {"id": "
                ids.add(full.rsplit("/", 1)[-1])
    return ids


def evaluate(size_dir: Path) -> dict:
    """Recall per planted level and precision, from the ids that clean and dedup kept."""
    survived = ids_in(size_dir / "out" / "cleaned")
    kept = ids_in(size_dir / "out" / "deduped")
    truth = [json.loads(line) for line in (size_dir / "corpus" / "truth.jsonl").read_text().splitlines()]
    pairs = [t for t in truth if t["id"] in survived and t["source"] in survived]
    found = {name: [0, 0, 0.0] for name, _ in BUCKETS}  # found, pairs, sum of Jaccard
    explained_strict, explained = set(), set()
    for t in pairs:
        name = _bucket(t)
        hit = not (t["id"] in kept and t["source"] in kept)
        found[name][0] += hit
        found[name][1] += 1
        found[name][2] += t["jaccard"]
        members = {t["id"], t["source"]} - kept
        explained |= members
        if t["kind"] == "exact" or t["jaccard"] >= 0.85:
            explained_strict |= members
    dropped = survived - kept
    wrong = dropped - explained
    hi = [found[n][:2] for n, lo in BUCKETS if lo is not None and lo >= 0.85]
    return {
        "recall": {n: (f / c if c else None, c, js / c if c else None) for n, (f, c, js) in found.items()},
        "recall_exact": found["exact"][0] / max(found["exact"][1], 1),
        "recall_near_085": sum(f for f, _ in hi) / max(sum(c for _, c in hi), 1),
        "precision": 1 - len(wrong) / max(len(dropped), 1),
        "precision_085": len(explained_strict) / max(len(explained_strict) + len(wrong), 1),
        "dropped": len(dropped),
        "unexplained_drops": len(wrong),
    }


def _bucket(t: dict) -> str:
    if t["kind"] == "exact":
        return "exact"
    return next(name for name, lo in BUCKETS[1:] if t["jaccard"] >= lo)


# ---------------------------------------------------------------- Wikipedia, tokenizer, table


def wikipedia_rate(work: Path) -> dict:
    """MB/s on one core of the clean step (our all_samples chain, with signatures) on the largest wiki sample."""
    from pipeline.data.shards import Unit, clean_file, clean_hash

    path = max(RAW.glob("wiki/*.bz2"), key=lambda p: p.stat().st_size)
    out = work / "wiki-rate"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "all_samples.yaml", [f"output_dir={out}"])
    for _ in range(2):  # the second run: lid.176 and the parsers are loaded already
        shutil.rmtree(out, ignore_errors=True)
        cpu = time.process_time()
        clean_file(Unit(path), out, cfg, clean_hash(cfg))
        secs = time.process_time() - cpu  # CPU seconds: the machine is shared, wall time is not ours
    mbps = path.stat().st_size / 1e6 / secs
    hours = {c: ENWIKI_GB * 1e3 / mbps / c / 3600 for c in (16, 64, 256)}
    return {
        "file": path.name,
        "mb": path.stat().st_size / 1e6,
        "cpu_s": secs,
        "mb_per_s": mbps,
        "hours": hours,
    }


def tokenizer_dir(work: Path) -> Path:
    """A SentencePiece tokenizer (8k pieces) trained once on the base documents."""
    from pipeline.tokenizer.config import TokenizerConfig
    from pipeline.tokenizer.train import train_tokenizer

    folder = work / "tokenizer" / "scale"
    if not (folder / "tokenizer.model").is_file():
        base_documents(work)
        cfg = TokenizerConfig(
            name="scale", inputs=[str(work / "base.jsonl.zst")], output_root=work / "tokenizer"
        )
        cfg.max_chars = 20_000_000
        train_tokenizer(cfg)
    return folder


def print_table(rows: list[tuple[float, dict]], workers: int) -> None:
    print(f"\nper size, {workers} Ray workers; MB = uncompressed JSONL; per core = per CPU second of the")
    print("driver and every Ray process (the machine is shared: wall time / workers is shown too)")
    print(
        "size  docs      MB     wall s  CPU s   docs/core-s  MB/core-s  MB/s/core(wall)  clean/dedup/tok s  "
        "driver MB  worker MB  spill MB  exact R  near R>=.85  P      P>=.85"
    )
    for size, r in rows:
        c, m, e = r["corpus"], r["run"], r["eval"]
        cpu = m.get("cpu_seconds") or float("nan")
        steps = "/".join(f"{m['steps'][s]:.0f}" for s in ("clean", "dedup", "tokenize"))
        print(
            f"{size:<5g} {c['documents']:<9d} {c['bytes'] / 1e6:<6.0f} {m['seconds']:<7.0f} {cpu:<7.0f} "
            f"{c['documents'] / cpu:<12.1f} {c['bytes'] / 1e6 / cpu:<10.3f} "
            f"{c['bytes'] / 1e6 / m['seconds'] / workers:<16.3f} {steps:<18} "
            f"{m['driver_rss_mb']:<10.0f} {m['worker_rss_mb']:<10.0f} {m['spilled_mb']:<9.0f} "
            f"{e['recall_exact']:<8.3f} {e['recall_near_085']:<12.3f} {e['precision']:<6.3f} {e['precision_085']:.3f}"
        )
    for size, r in rows:
        curve = ", ".join(
            f"{n} {f:.2f} (n={c}; 1-(1-J^8)^14 at mean J: {1 - (1 - j**8) ** 14:.2f})"
            for n, (f, c, j) in r["eval"]["recall"].items()
            if c and n != "exact"
        )
        print(f"{size:g} GB, share of planted pairs found by their Jaccard: {curve}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="0.1", help="corpus sizes in GB, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-scale")
    parser.add_argument("--force", action="store_true", help="re-run sizes that already have a result")
    parser.add_argument("--run-one", type=Path, help=argparse.SUPPRESS)  # internal: one run, in a child
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args.workers, args.tokenizer)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [(float(s), measure(args.work, float(s), args.workers, args.force)) for s in args.sizes.split(",")]
    print_table(rows, args.workers)
    wiki = wikipedia_rate(args.work)
    print(
        f"\nWikipedia clean step on one core: {wiki['file']} ({wiki['mb']:.1f} MB bz2) in {wiki['cpu_s']:.1f} "
        f"CPU s = {wiki['mb_per_s']:.3f} MB/s/core; a {ENWIKI_GB} GB enwiki multistream dump: "
        + ", ".join(f"{h:.1f} h on {c} cores" for c, h in wiki["hours"].items())
    )


def measure(work: Path, size: float, workers: int, force: bool) -> dict:
    """The row for one size: corpus, one prepare_data run in a child process, evaluation (cached)."""
    size_dir = work / f"{size:g}GB"
    result = size_dir / "result.json"
    if result.is_file() and not force:
        return json.loads(result.read_text())
    corpus = build_corpus(work, size, workers)
    tok = tokenizer_dir(work)
    cmd = [
        sys.executable,
        __file__,
        "--run-one",
        str(size_dir),
        "--workers",
        str(workers),
        "--tokenizer",
        str(tok),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRISTMILL_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed for {size} GB:\n{proc.stderr[-4000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"corpus": corpus, "run": run, "eval": evaluate(size_dir)}
    result.write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
