"""The steps of a data-prep job, each a function of a `runner.Job` that returns its report section.

`STEPS` maps the names `DataConfig.steps` may list to these functions; the runner calls them in
order. A step never imports Ray: it runs its tasks through `job.map` and shares read-only
objects through `job.share`. Two shapes cover the stages we have and the ones planned:

- per shard (clean, tokenize): one task per input, output named after it;
- job-wide (dedup): per-shard side outputs written during clean (signatures), tasks that
  combine them (partitions, buckets) with nothing but small counters coming back to the
  driver, then one task per shard that applies the decisions.

A stage that needs one read-only object in every worker (decontamination's n-gram index) builds
it once, `job.share(name, obj)`, and passes `job.shared(name)` in its calls: the task receives
the object (numpy arrays without a copy); `run_clean` does this for the filters' `SHARED`
objects. A job-wide threshold follows dedup's shape: `select` (keep the best `top_fraction` by
the learned quality score) reads the scores written beside each shard, reduces each shard to
fixed-size histograms (the driver adds them up and sets the threshold once), then runs one task
per shard that applies it. Either way: a function here, one `STEPS` entry, and its name in
`DataConfig.steps`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import config_hash, to_dict
from pipeline.data import dedup, quality_model
from pipeline.data.config import TokenizeConfig
from pipeline.data.decontam import MATCHED, NgramIndex
from pipeline.data.document import Counts
from pipeline.data.filters import build_shared
from pipeline.data.shards import Unit, clean_file, clean_hash, score_path, shard_paths, sig_path, unit_name
from pipeline.errors import DataError
from pipeline.io import remove_stale_temps, write_json

if TYPE_CHECKING:
    from pipeline.data.runner import Job

log = logging.getLogger(__name__)
FIND_BYTES_PER_KEY = 48
"""Peak bytes a dedup find task holds per index key it reads (42 measured with tracemalloc)."""


def run_clean(job: Job) -> dict:
    """One task per unit: read, extract, filter, write `cleaned/<stem>.jsonl.zst` (+ signatures)."""
    cleaned_dir = job.out / "cleaned"
    cleaned_dir.mkdir(parents=True, exist_ok=True)
    if n := remove_stale_temps(cleaned_dir):
        log.info("removed %d temporary files left by an interrupted run in %s", n, cleaned_dir)
    h = clean_hash(job.cfg)
    shared = build_shared(job.cfg.filters)  # decontam's n-gram index: built once, never per task
    job.share("filters", shared)
    # absolute paths: a worker on another node (or in another working directory) finds the same files
    units = [Unit(u.path.resolve(), u.byte_range) for u in job.units]
    calls = [(u, cleaned_dir.resolve(), job.cfg, h, job.shared("filters")) for u in units]
    results = job.map(clean_file, calls, "clean", [unit_bytes(u) for u in units], lambda s: s["totals"]["in"])
    remove_stale_temps(cleaned_dir)  # every task is done: a temp file is what a killed, retried attempt left
    summary = summarize_clean({u.name: stats for u, stats in zip(job.units, results)})
    if "decontam" in shared:
        summary["decontam"] = decontam_summary(summary["shards"], shared["decontam"])
    return summary


def decontam_summary(shards: dict[str, dict], index: NgramIndex) -> dict:
    """Per evaluation set: what was indexed, and the documents that matched it per input file."""
    hits: dict[str, dict[str, int]] = {name: {} for name in index.names}
    for stats in shards.values():
        noted = next((e.get("noted", {}) for e in stats["stages"] if e["name"] == "decontam"), {})
        for key, n in noted.items():
            if key.startswith(MATCHED) and key[len(MATCHED) :] in hits:
                per_input = hits[key[len(MATCHED) :]]
                per_input[stats["input"]] = per_input.get(stats["input"], 0) + n
    return {
        name: {**{k: v for k, v in index.stats[name].items() if k != "path"}, "matched": hits[name]}
        for name in index.names
    }


def unit_bytes(unit: Unit) -> int:
    """Input bytes of a unit: its byte range, its file, or the files of its folder."""
    if unit.byte_range is not None:
        return unit.byte_range[1] - unit.byte_range[0]
    if unit.path.is_dir():
        return sum(p.stat().st_size for p in unit.path.rglob("*") if p.is_file())
    return unit.path.stat().st_size


def run_dedup(job: Job) -> dict:
    """Find duplicates over every cleaned shard (partition, component and bucket tasks), then
    rewrite each shard without them; the driver only ever holds counters."""
    cfg = job.cfg.dedup
    cleaned, deduped, work = job.out / "cleaned", job.out / "deduped", job.out / "dedup-work"
    deduped.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(deduped)
    order = sorted(job.units, key=unit_name)  # shard number = position in name order: the keep rule's order
    sigs = [sig_path(cleaned, u).resolve() for u in order]
    if missing := [str(p) for p in sigs if not p.is_file()]:
        raise DataError(
            f"dedup signatures missing: {', '.join(missing)}; run the clean step with dedup in steps"
        )
    h = config_hash(
        {
            "clean": clean_hash(job.cfg),
            "dedup": cfg.decision_settings(),
            "shards": [unit_name(u) for u in order],
        }
    )
    targets = [deduped_paths(deduped, u) for u in order]
    if all(_dedup_done(stats, h) for _, stats in targets) and (deduped / "clusters.json").is_file():
        log.info("dedup: every shard already done with this config, skipped")
        return _summarize_dedup(order, targets, _read_json(deduped / "clusters.json"), skipped=True)
    shutil.rmtree(work, ignore_errors=True)  # decisions are recomputed whole; shards already written stay
    work = work.resolve()
    parts = cfg.partitions or dedup_partitions(sigs, cfg.task_memory_mb, job.workers)
    found = dedup.decide(job.map, sigs, parts, work, cfg.exact, cfg.near)
    calls = [
        (
            shard_paths(cleaned, u)[0].resolve(),
            dst.resolve(),
            stats.resolve(),
            dedup.drops_path(work, i),
            h,
            _carried(job, cleaned, deduped, u),
        )
        for i, (u, (dst, stats)) in enumerate(zip(order, targets))
        if not _dedup_done(stats, h)
    ]
    job.map(
        dedup.apply_dedup,
        calls,
        "dedup: write",
        [c[0].stat().st_size for c in calls],
        lambda s: s["counts"]["in"],
    )
    remove_stale_temps(deduped)
    plan = {k: found.pop(k) for k in ("partitions", "buckets", "rounds")}  # these vary with the workers
    write_json(deduped / "clusters.json", found)
    shutil.rmtree(work, ignore_errors=True)
    return {**_summarize_dedup(order, targets, found, skipped=False), "plan": plan}


def _carried(job: Job, cleaned: Path, deduped: Path, unit: Unit) -> tuple:
    """The per-row files dedup rewrites with a shard: its quality scores, when `select` follows."""
    if "select" not in job.cfg.steps:
        return ()
    return ((score_path(cleaned, unit).resolve(), score_path(deduped, unit).resolve()),)


def dedup_partitions(sigs: list[Path], task_memory_mb: int, workers: int) -> int:
    """Enough partitions that one holds at most `task_memory_mb` of index keys, and at least one per worker."""
    keys = sum(p.stat().st_size for p in sigs) // 16  # a key and its tag: 16 bytes
    return max(workers, math.ceil(keys * FIND_BYTES_PER_KEY / (task_memory_mb << 20)))


def deduped_paths(deduped_dir: Path, src: str | Path | Unit) -> tuple[Path, Path]:
    """(`<stem>.jsonl.zst`, `<stem>.stats.json`) in `deduped_dir` for input `src`."""
    stem = unit_name(src)
    return deduped_dir / f"{stem}.jsonl.zst", deduped_dir / f"{stem}.stats.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dedup_done(stats_path: Path, h: str) -> bool:
    stats = _read_json(stats_path)
    return (
        bool(stats)
        and stats.get("config_hash") == h
        and stats_path.with_suffix("").with_suffix(".jsonl.zst").is_file()
    )


def _summarize_dedup(order: list[Unit], targets: list, found: dict, skipped: bool) -> dict:
    shards = {unit_name(u): _read_json(stats)["counts"] for u, (_, stats) in zip(order, targets)}
    totals = Counts.merge([Counts.from_dict(c) for c in shards.values()])
    return {
        "totals": totals.to_dict(),
        "clusters": {k: found[k] for k in ("clusters", "documents_in_clusters", "largest", "size_histogram")},
        "bytes_out": sum(dst.stat().st_size for dst, _ in targets),
        "skipped": skipped,
        "shards": shards,
    }


def summarize_clean(shards: dict[str, dict]) -> dict:
    """Sum per-shard stats into per-stage and total counters for the report."""
    stages = _funnel_stages(shards)
    totals = Counts.merge([Counts.from_dict(s["totals"]) for s in shards.values()])
    return {
        "stages": [{"name": name, **c.to_dict()} for name, c in stages.items()],
        "totals": totals.to_dict(),
        "bytes_in": sum(s["bytes_in"] for s in shards.values()),
        "bytes_out": sum(s["bytes_out"] for s in shards.values()),
        "shards_skipped": sum(bool(s.get("skipped")) for s in shards.values()),
        "shards": shards,
    }


def _funnel_stages(shards: dict[str, dict]) -> dict[str, Counts]:
    """Per-stage counters summed over shards whose chains differ (wikitext here, html there): a
    shard without a stage passes its documents through it, so each row's in = the previous row's kept."""
    order: list[str] = []
    for stats in shards.values():
        names = [e["name"] for e in stats["stages"]]
        for i, name in enumerate(names):
            if name not in order:
                order.insert(order.index(names[i - 1]) + 1 if i else 0, name)
    totals = {name: Counts() for name in order}
    for stats in shards.values():
        own = {e["name"]: Counts.from_dict(e) for e in stats["stages"]}
        carried = 0
        for name in order:
            counts = own.get(name) or Counts(kept=carried)
            totals[name].add(counts)
            carried = counts.kept
    return totals


def run_tokenize(job: Job) -> dict:
    """One task per cleaned (or deduped) shard: token shards, then one manifest over all of them."""
    from pipeline.data.manifest import write_manifest  # lazy: the clean step works without sentencepiece

    cfg = job.cfg
    cleaned = [shard_paths(last_folder(job, "tokenize"), u)[0] for u in job.units]
    if missing := [str(p) for p in cleaned if not p.is_file()]:
        raise DataError(
            f"cleaned shards missing: {', '.join(missing)}; run the clean step first (steps=[clean,tokenize])"
        )
    tokens_dir = job.out / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(tokens_dir)
    tok = replace(cfg.tokenize, tokenizer=Path(cfg.tokenize.tokenizer).resolve())
    calls = [(src.resolve(), tokens_dir.resolve(), tok) for src in cleaned]
    per_shard = job.map(tokenize_shard, calls, "tokenize", [p.stat().st_size for p in cleaned])
    remove_stale_temps(tokens_dir)
    entries = [entry for shard_entries in per_shard for entry in shard_entries]
    lineage = {"inputs": [{"name": p.name, "bytes": unit_bytes(Unit(p))} for p in job.inputs]}
    manifest = write_manifest(
        tokens_dir, entries, tokenizer_dir=Path(cfg.tokenize.tokenizer), config=to_dict(cfg), lineage=lineage
    )
    return {"manifest": str(manifest), "entries": len(entries)}


def tokenize_shard(src: Path, tokens_dir: Path, tok: TokenizeConfig) -> list[dict]:
    """Token shards of one cleaned shard (the tokenize task)."""
    from pipeline.data.tokenize import tokenize_file

    return tokenize_file(src, tokens_dir, tok, shard_tokens=tok.shard_tokens)


def last_folder(job: Job, step: str) -> Path:
    """Where the shards `step` reads are: the folder of the last step before it in `steps`."""
    earlier = job.cfg.steps[: job.cfg.steps.index(step)]
    for name, folder in (("select", "selected"), ("dedup", "deduped")):
        if name in earlier:
            return job.out / folder
    return job.out / "cleaned"


def run_select(job: Job) -> dict:
    """Keep the job's best `filters.quality_model.top_fraction` by quality score: histograms of the
    scores beside every shard -> one threshold -> one task per shard writes `selected/<stem>`."""
    cfg, src_dir, selected = job.cfg.filters.quality_model, last_folder(job, "select"), job.out / "selected"
    selected.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(selected)
    order = sorted(job.units, key=unit_name)
    shards = [(shard_paths(src_dir, u)[0].resolve(), score_path(src_dir, u).resolve()) for u in order]
    if missing := [str(p) for pair in shards for p in pair if not p.is_file()]:
        raise DataError(f"select: missing {', '.join(missing)}; run clean (and dedup) with select in steps")
    cut = quality_model.find_threshold(job.map, [scores for _, scores in shards], cfg.top_fraction)
    dedup_on = "dedup" in job.cfg.steps
    upstream = {
        "clean": clean_hash(job.cfg),
        "dedup": job.cfg.dedup.decision_settings() if dedup_on else None,
    }
    h = config_hash({**upstream, "threshold": cut["threshold"]})
    calls = [
        (*pair, *[p.resolve() for p in shard_paths(selected, u)], cut["threshold"], h)
        for pair, u in zip(shards, order)
    ]
    results = job.map(
        quality_model.apply_select,
        calls,
        "select: write",
        [p.stat().st_size for p, _ in shards],
        lambda s: s["counts"]["in"],
    )
    remove_stale_temps(selected)
    shard_counts = {unit_name(u): r["counts"] for u, r in zip(order, results)}
    totals = Counts.merge([Counts.from_dict(c) for c in shard_counts.values()])
    return {
        "totals": totals.to_dict(),
        "cut": {**cut, "threshold": cut["threshold"] / quality_model.SCALE},
        "bytes_out": sum(r["bytes_out"] for r in results),
        "shards_skipped": sum(bool(r.get("skipped")) for r in results),
        "shards": shard_counts,
    }


STEPS = {"clean": run_clean, "dedup": run_dedup, "select": run_select, "tokenize": run_tokenize}
"""Step name (as `DataConfig.steps` lists it) -> its function; the job runs them in config order."""


def log_funnel(report: dict) -> None:
    """Log the per-stage funnel and one line per step."""
    if clean := report.get("clean"):
        for c in clean["stages"]:
            log.info(
                "  %-10s in %8d  kept %8d  dropped %s  errors %s",
                c["name"], c["in"], c["kept"], c["dropped"] or "-", c["errors"] or "-",
            )  # fmt: skip
        t = clean["totals"]
        log.info(
            "clean: %d documents in, %d kept (%.1f%%), %d shards (%d already done), %.1f MB -> %.1f MB",
            t["in"], t["kept"], 100 * t["kept"] / max(t["in"], 1), len(clean["shards"]),
            clean["shards_skipped"], clean["bytes_in"] / 1e6, clean["bytes_out"] / 1e6,
        )  # fmt: skip
    if d := report.get("dedup"):
        log.info(
            "dedup: %d in, %d kept, dropped %s, %d clusters",
            d["totals"]["in"], d["totals"]["kept"], d["totals"]["dropped"] or "-", d["clusters"]["clusters"],
        )  # fmt: skip
    if (sel := report.get("select")) and (c := sel["cut"]):
        log.info(
            "select: best %.0f%% of %d scored documents: score >= %.6f keeps %d (%d in, %d kept after select)",
            100 * c["top_fraction"], c["scored"], c["threshold"], c["kept"], sel["totals"]["in"], sel["totals"]["kept"],
        )  # fmt: skip
    if t := report.get("tokenize"):
        log.info("tokenize: %d shard entries, manifest %s", t["entries"], t["manifest"])
    log.info("report: %.1f s", report["seconds"])
