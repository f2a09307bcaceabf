"""The data-prep job on Ray: one task per input file to clean, dedup partition tasks and one
task per shard to drop duplicates, one per shard to tokenize.

This is the only module that imports ray. It validates the inputs before anything starts,
starts a local Ray instance (or joins `ray.address`, or one already running in this process),
keeps at most `ray.num_cpus` tasks in flight (with a progress bar showing docs/s), and sums the
per-shard counters into `report.json`, `report.md` and `report.png`. Work is split by input file
(and dedup by key partition) and each output is named after its input, so the bytes written never
depend on how many workers ran (DESIGN invariant 2).
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray

from pipeline.config import config_hash, save_config, to_dict
from pipeline.data import dedup, quality_model
from pipeline.data.config import TRAIN_HINT, DataConfig, RayConfig, TokenizeConfig
from pipeline.data.decontam import build_index
from pipeline.data.document import Counts
from pipeline.data.readers import input_stem
from pipeline.data.report import write_reports
from pipeline.data.shards import Unit, clean_file, clean_hash, shard_paths, sig_path, unit_name
from pipeline.data.stage import add_stats
from pipeline.errors import ConfigError, DataError, GristmillError
from pipeline.io import remove_stale_temps, sha256_file, write_json
from pipeline.log import progress

log = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig) -> dict:
    """Run the configured steps and return the report (also written to `output_dir/report.json`)."""
    inputs = resolve_inputs(cfg.inputs)
    units = work_units(inputs, cfg)
    _check_tokenizer(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start = time.perf_counter()
    started = _start_ray(cfg.ray)
    try:
        report: dict = {"name": cfg.name, "steps": list(cfg.steps), "inputs": [str(p) for p in inputs]}
        if "clean" in cfg.steps:
            report["clean"] = _run_clean(cfg, units, out / "cleaned")
        if "dedup" in cfg.steps:
            report["dedup"] = _run_dedup(cfg, units, out)
        if _selects(cfg):
            report["select"] = _run_select(cfg, units, out)
        if "tokenize" in cfg.steps:
            report["tokenize"] = _run_tokenize(cfg, inputs, units, out)
    finally:
        if started:
            ray.shutdown()
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "report.json", report)
    write_reports(out, report)
    _log_funnel(report)
    return report


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand files and globs (sorted) into input files; DataError naming a missing file or empty glob."""
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        if Path(pattern).is_dir():  # a dataset saved by datasets.save_to_disk
            files.append(Path(pattern))
        elif any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"inputs[{i}]: no file matches {pattern!r}")
            files.extend(matches)
        elif Path(pattern).is_file():
            files.append(Path(pattern))
        else:
            raise DataError(f"inputs[{i}]: input file not found: {pattern}")
    files = list(dict.fromkeys(files))  # a file named twice is read once
    stems: dict[str, Path] = {}
    for f in files:
        other = stems.setdefault(input_stem(f), f)
        if other != f:
            raise DataError(
                f"inputs {other} and {f} would both write cleaned/{input_stem(f)}.jsonl.zst; rename one"
            )
    return files


def work_units(inputs: list[Path], cfg: DataConfig) -> list[Unit]:
    """One unit per input file, except multistream Wikipedia dumps: one per range of bz2 streams."""
    from pipeline.data.formats import detect_format
    from pipeline.data.multistream import index_path, stream_ranges

    units: list[Unit] = []
    for path in inputs:
        fmt = detect_format(path) if cfg.format == "auto" else cfg.format
        if fmt == "wikipedia" and index_path(path) is not None:
            units += [Unit(path, r) for r in stream_ranges(path, cfg.read.streams_per_task)]
        else:
            units.append(Unit(path))
    return units


def _check_tokenizer(cfg: DataConfig) -> None:
    tok = cfg.tokenize.tokenizer
    if "tokenize" in cfg.steps and (tok is None or not (Path(tok) / "tokenizer.model").is_file()):
        raise ConfigError("tokenize.tokenizer", f"{tok} has no tokenizer.model; {TRAIN_HINT}")


def _start_ray(ray_cfg: RayConfig) -> bool:
    """Join or start Ray; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=False)
    return True


@ray.remote(num_cpus=1)
def _clean_task(src: Unit, cleaned_dir: Path, cfg: DataConfig, cfg_hash: str, index) -> dict:
    # `index` arrives as the object-store copy of the driver's NgramIndex (numpy arrays, no copy)
    return clean_file(src, cleaned_dir, cfg, cfg_hash, index)


@ray.remote(num_cpus=1)
def _find_dups_task(sigs: list[Path], part: int, parts: int, exact: bool, near: bool) -> dict:
    return dedup.find_duplicates(sigs, part, parts, exact, near)


@ray.remote(num_cpus=1)
def _apply_dedup_task(src: Path, dst: Path, stats: Path, drops: dict, h: str) -> dict:
    return dedup.apply_dedup(src, dst, stats, drops, h)


@ray.remote(num_cpus=1)
def _tokenize_task(src: Path, tokens_dir: Path, tok: TokenizeConfig) -> list[dict]:
    from pipeline.data.tokenize import tokenize_file  # lazy: the clean step works without it

    return tokenize_file(src, tokens_dir, tok, shard_tokens=tok.shard_tokens)


def _run_clean(cfg: DataConfig, units: list[Unit], cleaned_dir: Path) -> dict:
    cleaned_dir.mkdir(parents=True, exist_ok=True)
    if n := remove_stale_temps(cleaned_dir):
        log.info("removed %d temporary files left by an interrupted run in %s", n, cleaned_dir)
    h = clean_hash(cfg)
    # the decontam index is built once and shared through the object store, never per task
    index = ray.put(build_index(cfg.decontam)) if cfg.decontam.enabled else None
    # absolute paths: a worker on another node (or in another working directory) finds the same files
    calls = [(Unit(u.path.resolve(), u.byte_range), cleaned_dir.resolve(), cfg, h, index) for u in units]
    results = _run_tasks(_clean_task, calls, _in_flight(cfg.ray), "clean", lambda s: s["totals"]["in"])
    return summarize_clean({u.name: stats for u, stats in zip(units, results)})


def _run_dedup(cfg: DataConfig, units: list[Unit], out: Path) -> dict:
    """Find duplicates over every cleaned shard (partition tasks), then rewrite each shard without them."""
    cleaned, deduped = out / "cleaned", out / "deduped"
    deduped.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(deduped)
    order = sorted(units, key=unit_name)  # shard index = position in name order: the keep rule's order
    sigs = [sig_path(cleaned, src).resolve() for src in order]
    missing = [str(p) for p in sigs if not p.is_file()]
    if missing:
        raise DataError(
            f"dedup signatures missing: {', '.join(missing)}; run the clean step with dedup in steps"
        )
    h = config_hash({"clean": clean_hash(cfg), "dedup": cfg.dedup, "shards": [unit_name(s) for s in order]})
    targets = [deduped_paths(deduped, src) for src in order]
    if all(_dedup_done(stats, h) for _, stats in targets) and (deduped / "clusters.json").is_file():
        log.info("dedup: every shard already done with this config, skipped")
        return _summarize_dedup(order, targets, _read_json(deduped / "clusters.json"), skipped=True)
    parts = cfg.dedup.partitions or _in_flight(cfg.ray)
    calls = [(sigs, p, parts, cfg.dedup.exact, cfg.dedup.near) for p in range(parts)]
    found = _run_tasks(_find_dups_task, calls, _in_flight(cfg.ray), "dedup: find", lambda r: 0)
    drops = dedup.merge_partitions(found, len(order))
    clusters = dedup.cluster_stats(found)
    calls = [
        (shard_paths(cleaned, src)[0].resolve(), dst.resolve(), stats.resolve(), drops[i], h)
        for i, (src, (dst, stats)) in enumerate(zip(order, targets))
        if not _dedup_done(stats, h)
    ]
    _run_tasks(_apply_dedup_task, calls, _in_flight(cfg.ray), "dedup: write", lambda s: s["counts"]["in"])
    write_json(deduped / "clusters.json", clusters)
    return _summarize_dedup(order, targets, clusters, skipped=False)


def deduped_paths(deduped_dir: Path, src: str | Path | Unit) -> tuple[Path, Path]:
    """(`<stem>.jsonl.zst`, `<stem>.stats.json`) in `deduped_dir` for input `src`."""
    stem = unit_name(src)
    return deduped_dir / f"{stem}.jsonl.zst", deduped_dir / f"{stem}.stats.json"


def _read_json(path: Path) -> dict | None:
    import json

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


def _summarize_dedup(order: list[Path], targets: list, clusters: dict, skipped: bool) -> dict:
    shards = {unit_name(src): _read_json(stats)["counts"] for src, (_, stats) in zip(order, targets)}
    totals = Counts.merge([Counts.from_dict(c) for c in shards.values()])
    return {
        "totals": totals.to_dict(),
        "clusters": clusters,
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
        "stage_stats": _sum_stage_stats(shards),
        "shards": shards,
    }


def _sum_stage_stats(shards: dict[str, dict]) -> dict:
    total: dict = {}
    for stats in shards.values():
        add_stats(total, stats.get("stage_stats", {}))
    return total


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


# --- quality_model keep=top_fraction: one cut over the whole job's scores (quality_model.py) ---
def _top_fraction(cfg: DataConfig) -> bool:
    return cfg.quality_model.enabled and cfg.quality_model.keep == "top_fraction"


def _selects(cfg: DataConfig) -> bool:
    """Run the cut in this job: after the clean or dedup step (a tokenize-only run reads its result)."""
    return _top_fraction(cfg) and bool({"clean", "dedup"} & set(cfg.steps))


def _last_folder(cfg: DataConfig, out: Path) -> Path:
    """Where the step before tokenize left its shards: selected/, deduped/ or cleaned/."""
    if _top_fraction(cfg):
        return out / "selected"
    return out / ("deduped" if "dedup" in cfg.steps else "cleaned")


@ray.remote(num_cpus=1)
def _score_counts_task(src: Path) -> dict:
    return quality_model.shard_score_counts(src)


@ray.remote(num_cpus=1)
def _select_task(src: Path, dst: Path, stats: Path, threshold: float, h: str) -> dict:
    return quality_model.select_shard(src, dst, stats, threshold, h)


def _run_select(cfg: DataConfig, units: list[Unit], out: Path) -> dict:
    """Score counts of every shard -> one job-wide cut -> every shard rewritten into selected/."""
    folder, selected = out / ("deduped" if "dedup" in cfg.steps else "cleaned"), out / "selected"
    selected.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(selected)
    order = sorted(units, key=unit_name)
    srcs = [shard_paths(folder, u)[0].resolve() for u in order]
    limit = _in_flight(cfg.ray)
    counts = _run_tasks(_score_counts_task, [(p,) for p in srcs], limit, "select: scores", lambda r: 0)
    threshold, cut = quality_model.top_fraction_threshold(counts, cfg.quality_model.top_fraction)
    h = config_hash({"inputs": [sha256_file(p) for p in srcs], "threshold": threshold})
    calls = [
        (src, *[p.resolve() for p in deduped_paths(selected, u)], threshold, h) for src, u in zip(srcs, order)
    ]
    results = _run_tasks(_select_task, calls, limit, "select: write", lambda r: r["counts"]["in"])
    totals = Counts.merge([Counts.from_dict(r["counts"]) for r in results])
    return {"totals": totals.to_dict(), "cut": cut, "top_fraction": cfg.quality_model.top_fraction}


def _run_tokenize(cfg: DataConfig, inputs: list[Path], units: list[Unit], out: Path) -> dict:
    from pipeline.data.manifest import write_manifest  # lazy, like tokenize_file

    cleaned = [shard_paths(_last_folder(cfg, out), u)[0] for u in units]
    missing = [str(p) for p in cleaned if not p.is_file()]
    if missing:
        raise DataError(
            f"cleaned shards missing: {', '.join(missing)}; run the clean step first (steps=[clean,tokenize])"
        )
    tokens_dir = out / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(tokens_dir)
    tok = replace(cfg.tokenize, tokenizer=Path(cfg.tokenize.tokenizer).resolve())
    calls = [(src.resolve(), tokens_dir.resolve(), tok) for src in cleaned]
    per_shard = _run_tasks(_tokenize_task, calls, _in_flight(cfg.ray), "tokenize", lambda e: 1)
    entries = [entry for shard_entries in per_shard for entry in shard_entries]
    lineage = {"inputs": [{"name": p.name, "bytes": _size(p)} for p in inputs]}
    manifest = write_manifest(
        tokens_dir, entries, tokenizer_dir=Path(cfg.tokenize.tokenizer), config=to_dict(cfg), lineage=lineage
    )
    return {"manifest": str(manifest), "entries": len(entries)}


def _in_flight(ray_cfg: RayConfig) -> int:
    return ray_cfg.num_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_tasks(task, calls: list[tuple], limit: int, desc: str, docs_of: Callable[[object], int]) -> list:
    """Run `task.remote(*call)` for every call, at most `limit` at once; results in call order.

    Calls are submitted largest input first (the first argument is a path), so one big file
    does not start last and leave the other workers idle at the end.

    A task failing with a GristmillError (e.g. a shard over max_error_fraction) does not stop
    the others; once all are done the failures are raised together as one DataError.
    """
    results: list = [None] * len(calls)
    pending: dict = {}
    failures: list[tuple[int, str]] = []
    todo = iter(sorted(enumerate(calls), key=lambda ic: -_size(ic[1][0])))
    docs, start = 0, time.perf_counter()
    with progress(total=len(calls), desc=desc, unit="shard") as bar:
        while True:
            while len(pending) < limit and (nxt := next(todo, None)) is not None:
                pending[task.remote(*nxt[1])] = nxt[0]
            if not pending:
                break
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
                docs += docs_of(results[i])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if not isinstance(cause, GristmillError):
                    raise
                failures.append((i, str(cause)))
            bar.set_postfix(docs_per_s=f"{docs / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
            bar.update(1)
    if failures:
        raise DataError(
            f"{len(failures)} of {len(calls)} shards failed: " + " | ".join(m for _, m in sorted(failures))
        )
    return results


def _size(first_arg: object) -> int:
    """Bytes of a task's input (a file, a folder or a byte range), 0 when its first argument is none."""
    if isinstance(first_arg, Unit):
        r = first_arg.byte_range
        return _size(first_arg.path) if r is None else r[1] - r[0]
    if not isinstance(first_arg, Path) or not first_arg.exists():
        return 0
    if first_arg.is_dir():
        return sum(p.stat().st_size for p in first_arg.rglob("*") if p.is_file())
    return first_arg.stat().st_size


def _log_funnel(report: dict) -> None:
    clean = report.get("clean")
    if clean:
        for c in clean["stages"]:
            log.info(
                "  %-10s in %8d  kept %8d  dropped %s  errors %s",
                c["name"],
                c["in"],
                c["kept"],
                c["dropped"] or "-",
                c["errors"] or "-",
            )
        t = clean["totals"]
        log.info(
            "clean: %d documents in, %d kept (%.1f%%), %d shards (%d already done), %.1f MB -> %.1f MB",
            t["in"],
            t["kept"],
            100 * t["kept"] / max(t["in"], 1),
            len(clean["shards"]),
            clean["shards_skipped"],
            clean["bytes_in"] / 1e6,
            clean["bytes_out"] / 1e6,
        )
    if "dedup" in report:
        d = report["dedup"]
        log.info(
            "dedup: %d in, %d kept, dropped %s, %d clusters",
            d["totals"]["in"],
            d["totals"]["kept"],
            d["totals"]["dropped"] or "-",
            d["clusters"]["clusters"],
        )
    if "tokenize" in report:
        log.info(
            "tokenize: %d shard entries, manifest %s",
            report["tokenize"]["entries"],
            report["tokenize"]["manifest"],
        )
    log.info("report: %.1f s", report["seconds"])
