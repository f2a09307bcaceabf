"""A run's curves as one PNG: loss (train and validation), learning rate, throughput, gradient norm.

Reads `runs/<name>/metrics.jsonl` (and config.yaml for the title); matplotlib with the Agg
backend, so it works on a headless node. Rows written by a resumed run are kept in step order,
the last row of a step winning (a redone step after a crash replaces the first attempt).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import atomic_write
from pipeline.runtime.metrics import read_metrics


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, last row per step, skipping rows without a number."""
    by_step = {
        r["step"]: r[key]
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    }
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def _title(run_dir: Path) -> str:
    title = run_dir.name
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        d = (yaml.safe_load(cfg.read_text()) or {}).get("derived", {})
        if d:
            title += f"  ({d.get('num_params', 0) / 1e6:,.1f}M params, {d.get('world_size')} ranks, {d.get('tokens_per_step')} tokens/step)"
    return title


def render_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's curves to `out` (default run_dir/report.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not any("loss" in r for r in rows):
        raise DataError(f"{run_dir}/metrics.jsonl: no training rows to plot")
    out = Path(out) if out else run_dir / "report.png"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_loss, ax_lr), (ax_tput, ax_norm) = axes
    ax_loss.plot(*_series(rows, "loss"), label="train", color="tab:blue")
    ev_steps, ev = _series(rows, "eval_loss")
    if ev_steps:
        ax_loss.plot(ev_steps, ev, "o-", label="validation", color="tab:orange")
    ax_loss.set(title="loss (per target token)", xlabel="step", ylabel="nats")
    ax_loss.legend()
    ax_lr.plot(*_series(rows, "lr"), color="tab:green")
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_tput.plot(*_series(rows, "tokens_per_s_per_device"), color="tab:purple", label="tokens/s per device")
    ax_tput.set(title="throughput", xlabel="step", ylabel="tokens/s per device")
    mfu_steps, mfu = _series(rows, "mfu")
    if mfu_steps:
        twin = ax_tput.twinx()
        twin.plot(mfu_steps, [100 * m for m in mfu], color="tab:gray", alpha=0.6)
        twin.set_ylabel("MFU %")
    ax_norm.plot(*_series(rows, "grad_norm"), color="tab:red")
    ax_norm.set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    skipped = _skipped_steps(rows)
    for s in skipped:
        ax_norm.axvline(s, color="black", alpha=0.3, linestyle=":")
    fig.suptitle(_title(run_dir) + (f"; {len(skipped)} skipped non-finite steps" if skipped else ""))
    with atomic_write(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return out


def _skipped_steps(rows: list[dict]) -> list[int]:
    """Steps where the count of skipped non-finite steps went up."""
    steps, counts = _series(rows, "skipped_nonfinite")
    return [s for s, prev, cur in zip(steps[1:], counts, counts[1:]) if cur > prev] + (
        [steps[0]] if counts and counts[0] > 0 else []
    )
