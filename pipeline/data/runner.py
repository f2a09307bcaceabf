"""The data-prep job on Ray: one task per input file to clean, one per cleaned shard to tokenize.

This is the only module that imports ray. It validates the inputs before anything starts,
starts a local Ray instance (or joins `ray.address`, or one already running in this process),
keeps at most `ray.num_cpus` tasks in flight, and sums the per-shard counters into
`report.json`. Work is split by input file and each output is named after its input, so the
bytes written never depend on how many workers ran (DESIGN invariant 2).
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray

from pipeline.config import save_config, to_dict
from pipeline.data.config import TRAIN_HINT, CleanConfig, DataConfig, RayConfig, TokenizeConfig
from pipeline.data.document import Counts
from pipeline.data.readers import input_stem
from pipeline.data.shards import clean_file, clean_hash, shard_paths
from pipeline.errors import ConfigError, DataError, GristmillError
from pipeline.io import remove_stale_temps, write_json
from pipeline.log import progress

log = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig) -> dict:
    """Run the configured steps and return the report (also written to `output_dir/report.json`)."""
    inputs = resolve_inputs(cfg.inputs)
    _check_tokenizer(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start = time.perf_counter()
    started = _start_ray(cfg.ray)
    try:
        report: dict = {"name": cfg.name, "steps": list(cfg.steps), "inputs": [str(p) for p in inputs]}
        if "clean" in cfg.steps:
            report["clean"] = _run_clean(cfg, inputs, out / "cleaned")
        if "tokenize" in cfg.steps:
            report["tokenize"] = _run_tokenize(cfg, inputs, out)
    finally:
        if started:
            ray.shutdown()
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "report.json", report)
    _log_funnel(report)
    return report


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand files and globs (sorted) into input files; DataError naming a missing file or empty glob."""
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        if any(ch in pattern for ch in "*?["):
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


def _check_tokenizer(cfg: DataConfig) -> None:
    tok = cfg.tokenize.tokenizer
    if "tokenize" in cfg.steps and (tok is None or not (Path(tok) / "tokenizer.model").is_file()):
        raise ConfigError("tokenize.tokenizer", f"{tok} has no tokenizer.model; {TRAIN_HINT}")


def _start_ray(ray_cfg: RayConfig) -> bool:
    """Join or start Ray; True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if ray_cfg.address:
        ray.init(address=ray_cfg.address)
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=False)
    return True


@ray.remote(num_cpus=1)
def _clean_task(
    src: Path, cleaned_dir: Path, fmt: str, clean: CleanConfig, cfg_hash: str, max_err: float
) -> dict:
    return clean_file(src, cleaned_dir, fmt=fmt, clean=clean, cfg_hash=cfg_hash, max_error_fraction=max_err)


@ray.remote(num_cpus=1)
def _tokenize_task(src: Path, tokens_dir: Path, tok: TokenizeConfig) -> list[dict]:
    from pipeline.data.tokenize import tokenize_file  # lazy: the clean step works without it

    return tokenize_file(src, tokens_dir, tok)


def _run_clean(cfg: DataConfig, inputs: list[Path], cleaned_dir: Path) -> dict:
    cleaned_dir.mkdir(parents=True, exist_ok=True)
    if n := remove_stale_temps(cleaned_dir):
        log.info("removed %d temporary files left by an interrupted run in %s", n, cleaned_dir)
    h = clean_hash(cfg)
    # absolute paths: a worker on another node (or in another working directory) finds the same files
    calls = [
        (src.resolve(), cleaned_dir.resolve(), cfg.format, cfg.clean, h, cfg.max_error_fraction)
        for src in inputs
    ]
    results = _run_tasks(_clean_task, calls, _in_flight(cfg.ray), "clean", lambda s: s["totals"]["in"])
    return summarize_clean({input_stem(src): stats for src, stats in zip(inputs, results)})


def summarize_clean(shards: dict[str, dict]) -> dict:
    """Sum per-shard stats into per-stage and total counters for the report."""
    stages: dict[str, Counts] = {}
    for stats in shards.values():
        for entry in stats["stages"]:
            stages.setdefault(entry["name"], Counts()).add(Counts.from_dict(entry))
    totals = Counts.merge([Counts.from_dict(s["totals"]) for s in shards.values()])
    return {
        "stages": [{"name": name, **c.to_dict()} for name, c in stages.items()],
        "totals": totals.to_dict(),
        "bytes_in": sum(s["bytes_in"] for s in shards.values()),
        "bytes_out": sum(s["bytes_out"] for s in shards.values()),
        "shards_skipped": sum(bool(s.get("skipped")) for s in shards.values()),
        "shards": shards,
    }


def _run_tokenize(cfg: DataConfig, inputs: list[Path], out: Path) -> dict:
    from pipeline.data.manifest import write_manifest  # lazy, like tokenize_file

    cleaned = [shard_paths(out / "cleaned", src)[0] for src in inputs]
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
    lineage = {"inputs": [{"name": p.name, "bytes": p.stat().st_size} for p in inputs]}
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
    todo = iter(sorted(enumerate(calls), key=lambda ic: -Path(ic[1][0]).stat().st_size))
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
    if "tokenize" in report:
        log.info(
            "tokenize: %d shard entries, manifest %s",
            report["tokenize"]["entries"],
            report["tokenize"]["manifest"],
        )
    log.info("report: %.1f s", report["seconds"])
