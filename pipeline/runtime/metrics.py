"""Metrics sink: `metrics.jsonl` (one JSON object per row) plus TensorBoard events, rank 0 only.

Other ranks get a writer that does nothing, so the loop calls it unconditionally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from pipeline import dist
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append rows to run_dir/metrics.jsonl (flushed per row) and scalars to run_dir/tb/."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: dict | None = None):
        """`wandb`: keyword arguments for `wandb.init` (project, mode, name, config), or None for no W&B."""
        self.enabled = dist.is_main()
        self._fh = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        if wandb:
            self._wandb = _start_wandb(run_dir, wandb)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError as exc:  # tensorboard is optional at run time
                log.warning("TensorBoard disabled (%s)", exc)

    def write(self, row: dict) -> None:
        """Write one row; numbers that are not finite become null in JSON."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None and "step" in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None and "step" in row:
            nums = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb.log(nums, step=row["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, settings: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "train.wandb_project", "is set but wandb is not installed: pip install wandb"
        ) from None
    # resume="allow" with a run id fixed by the run dir: a resumed run appends to the same W&B run.
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(dir=str(run_dir), id=run_id, resume="allow", **settings)


def read_metrics(run_dir: Path) -> list[dict]:
    """All rows of run_dir/metrics.jsonl (for tests and reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
