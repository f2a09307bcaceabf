"""The data-prep job on Ray: the only module that imports ray.

`prepare_data` validates the inputs before anything starts, starts a local Ray instance (or
joins `ray.address`, or one already running in this process) and runs the configured steps in
order (`steps.STEPS`: clean, dedup, tokenize). A step is a plain function of a `Job`, which
gives it Ray through two methods:

- `Job.map(fn, calls, desc)` runs `fn(*call)` as one Ray task per call (module-level `fn`, at
  most `ray.num_cpus` in flight, largest input first), retries a task whose worker died
  (`ray.max_retries`), shows a progress bar with docs/s and an ETA from input bytes, and
  returns the results in call order. A task that raises a GristmillError does not stop the
  others; the failures are raised together at the end.
- `Job.share(name, obj)` puts `obj` in the object store once; `Job.shared(name)` is its
  reference, which a call passes as an argument so every task reads the same copy (numpy
  arrays without a copy).

Work is split by input file (multistream dumps: stream ranges) and each output is named after
its input, so the bytes written never depend on how many workers ran (DESIGN invariant 2).
"""

from __future__ import annotations

import glob
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from pipeline.config import save_config
from pipeline.data.config import TRAIN_HINT, DataConfig, RayConfig
from pipeline.data.formats import FORMATS, detect_format
from pipeline.data.readers import input_stem
from pipeline.data.report import write_reports
from pipeline.data.shards import Unit
from pipeline.errors import ConfigError, DataError, GristmillError
from pipeline.io import write_json
from pipeline.log import progress

log = logging.getLogger(__name__)
SINGLE_STREAM_WARN_BYTES = 64 << 20  # a single-stream .bz2 larger than this gets a warning, not info


def prepare_data(cfg: DataConfig) -> dict:
    """Run the configured steps and return the report (also written to `output_dir/report.json`)."""
    from pipeline.data.steps import STEPS, log_funnel

    inputs = resolve_inputs(cfg.inputs)
    units = work_units(inputs, cfg)
    _check_tokenizer(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    start = time.perf_counter()
    started = start_ray(cfg.ray)
    try:
        job = Job(cfg, inputs, units, out)
        report: dict = {"name": cfg.name, "steps": list(cfg.steps), "inputs": [str(p) for p in inputs]}
        for step in cfg.steps:
            step_start = time.perf_counter()
            report[step] = STEPS[step](job)
            report[step]["seconds"] = round(time.perf_counter() - step_start, 2)
    finally:
        if started:
            ray.shutdown()
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "report.json", report)
    write_reports(out, report)
    log_funnel(report)
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
    """One unit per input, except formats that split a file (multistream Wikipedia: stream ranges)."""
    units: list[Unit] = []
    for path in inputs:
        fmt = FORMATS[detect_format(path) if cfg.format == "auto" else cfg.format]
        ranges = fmt.split(path, cfg.read) if fmt.split else None
        if ranges is None:
            _note_one_task(path, fmt.name)
            units.append(Unit(path))
        else:
            units += [Unit(path, r) for r in ranges]
    return units


def _note_one_task(path: Path, fmt: str) -> None:
    """Say when a Wikipedia dump will be read by one task, and how to split it."""
    if fmt != "wikipedia" or not path.name.endswith(".bz2"):
        return
    size = path.stat().st_size
    level = logging.WARNING if size > SINGLE_STREAM_WARN_BYTES else logging.INFO
    log.log(
        level,
        "%s (%.0f MB): a single bz2 stream without a multistream index beside it, so one task reads it "
        "all; for a full dump use the multistream files (pages-articles-multistream.xml.bz2 with its "
        "-index.txt.bz2), which split into one task per read.streams_per_task streams",
        path.name,
        size / 1e6,
    )


def _check_tokenizer(cfg: DataConfig) -> None:
    tok = cfg.tokenize.tokenizer
    if "tokenize" in cfg.steps and (tok is None or not (Path(tok) / "tokenizer.model").is_file()):
        raise ConfigError("tokenize.tokenizer", f"{tok} has no tokenizer.model; {TRAIN_HINT}")


def start_ray(ray_cfg: RayConfig) -> bool:
    """Join or start Ray with the configured memory settings; True when this call started it."""
    if ray.is_initialized():
        return False
    ray.init(**ray_init_kwargs(ray_cfg))
    return True


def ray_init_kwargs(ray_cfg: RayConfig) -> dict:
    """`ray.init` arguments for the config: join `address`, or start a local instance with its settings."""
    if ray_cfg.address:
        return {"address": ray_cfg.address, "logging_level": logging.WARNING}
    kwargs: dict = {"num_cpus": ray_cfg.num_cpus, "include_dashboard": False}
    if ray_cfg.object_store_memory:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory
    if ray_cfg.spill_dir:
        spill = {"type": "filesystem", "params": {"directory_path": str(Path(ray_cfg.spill_dir).resolve())}}
        kwargs["_system_config"] = {"object_spilling_config": json.dumps(spill)}
    return kwargs


@ray.remote
def _call(fn: Callable, *args):
    return fn(*args)


class Job:
    """What a step gets: the config, inputs, work units and output folder, and Ray (`map`, `share`)."""

    def __init__(self, cfg: DataConfig, inputs: list[Path], units: list[Unit], out: Path):
        self.cfg, self.inputs, self.units, self.out = cfg, inputs, units, out
        self._shared: dict[str, ray.ObjectRef] = {}

    @property
    def workers(self) -> int:
        """Tasks kept in flight: `ray.num_cpus`, else the cluster's CPUs."""
        return self.cfg.ray.num_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))

    def share(self, name: str, obj: object) -> None:
        """Put `obj` in the object store once, for every task of the job (pass `shared(name)` in a call)."""
        self._shared[name] = ray.put(obj)

    def shared(self, name: str) -> ray.ObjectRef:
        """The reference `share(name, ...)` made; as a task argument it arrives as the object itself."""
        return self._shared[name]

    def map(
        self,
        fn: Callable,
        calls: Sequence[tuple],
        desc: str,
        sizes: Sequence[int] | None = None,
        docs_of: Callable[[object], int] | None = None,
    ) -> list:
        """`fn(*call)` for every call as Ray tasks; results in call order (see the module docstring).

        `sizes` (input bytes per call) orders the calls largest first and drives the ETA;
        `docs_of(result)` gives the documents a result stands for, for the docs/s figure."""
        sizes = list(sizes) if sizes is not None else [1] * len(calls)
        remote = _call.options(
            num_cpus=1,
            max_retries=self.cfg.ray.max_retries,
            retry_exceptions=False,
            name=getattr(fn, "__name__", type(fn).__name__),
        )
        limit = self.workers
        todo = iter(sorted(range(len(calls)), key=lambda i: -sizes[i]))
        results: list = [None] * len(calls)
        pending: dict = {}
        failures: list[tuple[int, str]] = []
        docs, start = 0, time.perf_counter()
        unit = {"unit": "B", "unit_scale": True} if sum(sizes) > len(calls) else {"unit": "task"}
        with progress(total=sum(sizes), desc=desc, **unit) as bar:
            while True:
                while len(pending) < limit and (i := next(todo, None)) is not None:
                    pending[remote.remote(fn, *calls[i])] = i
                if not pending:
                    break
                [ref], _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ref)
                failure = self._result(ref, calls[i], desc, results, i)
                if failure:
                    failures.append((i, failure))
                elif docs_of is not None:
                    docs += docs_of(results[i])
                    rate = docs / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(docs_per_s=f"{rate:.0f}", refresh=False)
                bar.update(sizes[i])  # bytes done: tqdm's rate and ETA are in input bytes
        if failures:
            raise DataError(
                f"{desc}: {len(failures)} of {len(calls)} tasks failed: "
                + " | ".join(m for _, m in sorted(failures))
            )
        return results

    def _result(self, ref, call: tuple, desc: str, results: list, i: int) -> str | None:
        """Store task i's result; return the message of a GristmillError it raised (others propagate)."""
        try:
            results[i] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(getattr(exc, "cause", None), GristmillError):
                raise
            return str(exc.cause)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as exc:
            raise DataError(
                f"{desc}: the task for {str(call[0])[:200]} lost its worker {self.cfg.ray.max_retries + 1} times "
                f"({type(exc).__name__}); if it ran out of memory, give Ray fewer CPUs per node "
                "(ray.num_cpus) or smaller tasks (read.streams_per_task, dedup.task_memory_mb)"
            ) from exc
        return None
