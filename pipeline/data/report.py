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
        rows.append({"name": "select", **report["select"]["totals"]})
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
    lines += _language_section(clean)
    lines += _noted_section(clean)
    lines += _dedup_section(report.get("dedup"))
    lines += _quality_section(clean, report.get("select"))
    lines += _decontam_section((clean or {}).get("decontam"))
    lines += _shard_section(clean)
    lines += _web_section(clean)
    return "\n".join(lines) + "\n"


def language_rates(clean: dict | None) -> dict[str, dict]:
    """Per language, over the per-language quality rules: documents entering the first rule, kept
    after the last, the keep rate, and the rules that had no settings for it (not applied)."""
    rows = [r for r in (clean or {}).get("stages", []) if r.get("languages")]
    out: dict[str, dict] = {}
    for lang in sorted({lang for r in rows for lang in r["languages"]}):
        tallies = [(r["name"], r["languages"].get(lang)) for r in rows]
        tallies = [(name, t) for name, t in tallies if t]
        n_in, kept = tallies[0][1]["in"], tallies[-1][1]["kept"]
        out[lang] = {
            "in": n_in,
            "kept": kept,
            "rate": round(kept / n_in, 4) if n_in else None,
            "not_applied": [name for name, t in tallies if t.get("not_applied")],
        }
    return out


def _language_section(clean: dict | None) -> list[str]:
    rates = language_rates(clean)
    if not rates:
        return []
    from pipeline.data.words import splitter_name

    out = [
        "",
        "## Quality rules per language",
        "",
        "Documents the per-language rules saw (after language ID; skipped sources excluded), kept after "
        "the last rule. A rule with no settings for a language is not applied to it.",
        "",
        "| language | words split by | in | kept | keep rate | rules not applied |",
        "|---|---|---:|---:|---:|---|",
    ]
    for lang, r in sorted(rates.items(), key=lambda kv: -kv[1]["in"]):
        rate = f"{r['rate']:.1%}" if r["rate"] is not None else "-"
        missing = ", ".join(r["not_applied"]) or "-"
        out.append(f"| {lang} | {splitter_name(lang)} | {r['in']:,} | {r['kept']:,} | {rate} | {missing} |")
    return out


def _noted_section(clean: dict | None) -> list[str]:
    """Repairs and flags (Counts.noted) per stage: replaced surrogates, BOMs, markup-leak lines."""
    rows = [(r["name"], r.get("noted", {})) for r in (clean or {}).get("stages", [])]
    leaks = sum(noted.get("markup_leak_lines", 0) for _, noted in rows)
    out = [
        "",
        "## Repairs and flags",
        "",
        f"Wiki markup-leak lines (`{{{{`, `}}}}`, `[[`, `]]`, `| key =`): {leaks:,}.",
    ]
    for name, noted in rows:
        if noted:
            out.append(f"- {name}: {_fmt_reasons(noted)}")
    return out


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


def _quality_section(clean: dict | None, select: dict | None) -> list[str]:
    """The learned quality score's funnel: scored, dropped by threshold, the job-wide cut."""
    row = next((r for r in (clean or {}).get("stages", []) if r["name"] == "quality_model"), None)
    if row is None and not select:
        return []
    out = ["", "## Learned quality score", ""]
    if row is not None:
        unscored = row.get("noted", {}).get("unscored", 0)
        out.append(
            f"Clean step: {row['in']:,} documents in, {row['in'] - unscored - sum(row['errors'].values()):,} "
            f"scored, {unscored:,} of skipped sources passed unscored, "
            f"{row['dropped'].get('low_quality', 0):,} dropped below the threshold."
        )
    if select:
        c = select["cut"]
        out += [
            "",
            f"Select step: the best {c['top_fraction']:.0%} of {c['scored']:,} scored documents "
            f"(target {c['target']:,}): score >= {c['threshold']:.6f} keeps {c['kept']:,} (ties at the cut "
            f"are kept); {select['totals']['kept']:,} documents out, unscored ones included.",
        ]
        if c["tenths"]:
            out += ["", "| score | " + " | ".join(f"{i / 10:.1f}-" for i in range(10)) + " |"]
            out += [
                "|---|" + "---:|" * 10,
                "| documents | " + " | ".join(f"{n:,}" for n in c["tenths"]) + " |",
            ]
    return out


def _decontam_section(sets: dict | None) -> list[str]:
    """Per evaluation set: what was indexed, then the documents that matched it per input file."""
    if sets is None:
        return []
    out = [
        "",
        "## Decontamination",
        "",
        "| evaluation set | records | texts | too short | n-grams | matched |",
    ]
    out.append("|---|---:|---:|---:|---:|---:|")
    for name, st in sets.items():
        matched = sum(st["matched"].values())
        out.append(
            f"| {name} | {st['records']:,} | {st['texts']:,} | {st['too_short']:,} | {st['ngrams']:,} | {matched:,} |"
        )
    rows = [(name, src, n) for name, st in sets.items() for src, n in sorted(st["matched"].items())]
    if rows:
        out += ["", "| evaluation set | input file | documents matched |", "|---|---|---:|"]
        out += [f"| {name} | {src} | {n:,} |" for name, src, n in rows]
    return out


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


def web_rows(clean: dict | None) -> list[dict]:
    """Per WARC input file, where its HTTP responses went: seen, not 200, not HTML, HTML, body errors,
    no main content, extracted (the reader's `http_*` reasons and the html stage; see warc.py)."""
    rows = []
    for name, s in sorted((clean or {}).get("shards", {}).items()):
        stages = {e["name"]: e for e in s["stages"]}
        if s.get("format") != "warc" or "read" not in stages:
            continue
        read, html = stages["read"], stages.get("html", {"kept": stages["read"]["kept"], "dropped": {}})
        dropped = read["dropped"]
        body_errors = sum(n for k, n in read["errors"].items() if k.startswith("http_"))
        row = {"file": name, "records": read["in"], "status": dropped.get("http_status", 0)}
        row["content_type"] = dropped.get("http_content_type", 0)
        row["html"] = read["kept"] + body_errors
        row["responses"] = row["html"] + row["status"] + row["content_type"]
        row["body_errors"] = body_errors
        row["no_main_content"] = sum(html["dropped"].values())
        row["extracted"] = html["kept"]
        rows.append(row)
    return rows


def _web_section(clean: dict | None) -> list[str]:
    rows = web_rows(clean)
    if not rows:
        return []
    out = [
        "",
        "## WARC inputs",
        "",
        "HTTP responses per file, and where they stopped: status not 200, content type not HTML, body "
        "that did not decode, no main content; the rest were extracted.",
        "",
        "| file | records | HTTP responses | status | content type | HTML | body errors | no main content "
        "| extracted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("records", "responses", "status", "content_type", "html", "body_errors", "no_main_content")
    for r in rows:
        out.append(f"| {r['file']} | " + " | ".join(f"{r[k]:,}" for k in (*keys, "extracted")) + " |")
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
