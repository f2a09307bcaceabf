"""The job report in human form: `report.md` (the funnel as tables) and `report.png` (a bar chart).

`funnel(report)` flattens `report.json` into one row per stage (documents in, kept, dropped by
reason, errors), the clean stages first and dedup last, so every consumer reads the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_write


def funnel(report: dict) -> list[dict]:
    """[{name, in, kept, dropped, errors}] in the order the documents went through."""
    rows = list(report.get("clean", {}).get("stages", []))
    if "dedup" in report:
        rows.append({"name": "dedup", **report["dedup"]["totals"]})
    if "select" in report:
        rows.append({"name": "quality_top_fraction", **report["select"]["totals"]})
    return rows


def write_reports(out: Path, report: dict) -> None:
    """Write `report.md` and `report.png` next to `report.json` (atomically)."""
    with atomic_write(out / "report.md", "w") as fh:
        fh.write(render_markdown(report))
    rows = funnel(report)
    if rows:
        write_funnel_png(out / "report.png", rows, report.get("name", "data"))


def _fmt_reasons(reasons: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"


def render_markdown(report: dict) -> str:
    """The funnel, totals, dedup clusters and per-shard lines as Markdown."""
    lines = [f"# Data-prep report: {report.get('name', 'data')}", ""]
    lines += [f"Steps: {', '.join(report.get('steps', []))}; {report.get('seconds', 0)} s.", ""]
    clean = report.get("clean")
    if clean:
        t = clean["totals"]
        lines += [
            f"Documents in: {t['in']:,} ({clean['bytes_in'] / 1e6:.2f} MB); "
            f"kept after cleaning: {t['kept']:,} ({clean['bytes_out'] / 1e6:.2f} MB compressed).",
            "",
        ]
    lines += ["## Funnel", "", "| stage | in | kept | dropped | errors |", "|---|---:|---:|---|---|"]
    for row in funnel(report):
        lines.append(
            f"| {row['name']} | {row['in']:,} | {row['kept']:,} | {_fmt_reasons(row['dropped'])} "
            f"| {_fmt_reasons(row['errors'])} |"
        )
    lines += _dedup_section(report.get("dedup"))
    lines += _decontam_section((clean or {}).get("stage_stats", {}).get("decontam"))
    lines += _select_section(report.get("select"))
    lines += _shard_section(clean)
    return "\n".join(lines) + "\n"


def _dedup_section(d: dict | None) -> list[str]:
    if not d:
        return []
    c = d["clusters"]
    hist = ", ".join(f"{k}: {v}" for k, v in c["size_histogram"].items()) or "-"
    return [
        "",
        "## Dedup",
        "",
        f"{c['clusters']:,} duplicate clusters holding {c['documents_in_clusters']:,} documents "
        f"(largest {c['largest']}); of every group of equal or near-equal documents the first (by shard "
        f"name, then position) is kept. Cluster sizes: {hist}.",
    ]


def _decontam_section(stats: dict | None) -> list[str]:
    """Documents matching each evaluation set, per input source (dropped or flagged, as configured)."""
    if not stats or not stats.get("hits"):
        return (
            ["", "## Decontamination", "", "No document shares an n-gram with an evaluation set."]
            if stats is not None
            else []
        )
    out = ["", "## Decontamination", "", "| evaluation set | input source | documents |", "|---|---|---:|"]
    for name, per_source in sorted(stats["hits"].items()):
        out += [f"| {name} | {src} | {n:,} |" for src, n in sorted(per_source.items())]
    return out


def _select_section(sel: dict | None) -> list[str]:
    if not sel:
        return []
    c = sel["cut"]
    return [
        "",
        "## Quality model: top fraction",
        "",
        f"Kept the best {sel['top_fraction']:.0%} of {c['scored']:,} scored documents: score >= {c['threshold']} "
        f"keeps {c['kept']:,} (target {c['target']:,}; ties at the cut are all kept).",
    ]


def _shard_section(clean: dict | None) -> list[str]:
    if not clean:
        return []
    out = [
        "",
        "## Shards",
        "",
        "| shard | format | in | kept | errors | skipped |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, s in sorted(clean["shards"].items()):
        t = s["totals"]
        out.append(
            f"| {name} | {s.get('format', '')} | {t['in']:,} | {t['kept']:,} | {_fmt_reasons(t['errors'])} "
            f"| {'yes' if s.get('skipped') else ''} |"
        )
    return out


def write_funnel_png(path: Path, rows: list[dict], title: str) -> None:
    """Horizontal bars: documents entering each stage, split into kept / dropped / errors."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows][::-1]
    kept = [r["kept"] for r in rows][::-1]
    dropped = [sum(r["dropped"].values()) for r in rows][::-1]
    errors = [sum(r["errors"].values()) for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(names, kept, color="#4c72b0", label="kept")
    ax.barh(names, dropped, left=kept, color="#dd8452", label="dropped")
    ax.barh(names, errors, left=[k + d for k, d in zip(kept, dropped)], color="#c44e52", label="errors")
    ax.set_xlabel("documents")
    ax.set_title(f"{title}: documents per stage")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
